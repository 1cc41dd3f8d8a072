package tsdb

import (
	"fmt"
	"math"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// Once the store has been idle, the writer compacts the staged batches it
// deleted out of Pebble's files: no compaction would start on its own.
func TestIdleStoreCompactsStaged(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	var clock atomic.Int64
	clock.Store(testNow.UnixMilli())
	// A long hold keeps every row open until Flush, so that the staged
	// batches reach Pebble's files first; with Pebble's own compactions
	// off, only the writer's removes them.
	db, err := Open(Options{Dir: t.TempDir(), Schema: s, NoSync: true, RetentionInterval: -1, HeadHold: 24 * time.Hour, noCompactions: true,
		now: func() time.Time { return time.UnixMilli(clock.Load()) }})
	if err != nil {
		t.Fatal(err)
	}
	defer closeTest(t, db)
	// Some 6 MB of staged batches: a delta every second of the last hour
	// for 200 cells, in batches of a minute.
	start := testNow.Add(-time.Hour).Truncate(time.Hour)
	seq := uint64(0)
	for m := range 60 {
		var ds []Delta
		for sec := range 60 {
			for c := range 200 {
				ts := start.Add(time.Duration(m)*time.Minute + time.Duration(sec)*time.Second)
				ds = append(ds, Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", fmt.Sprintf("h%d", c), "GET"}, Time: ts.UnixMilli(), Sum: float64(c) + float64(sec)/7, Count: 3})
			}
		}
		seq++
		if _, err := db.Apply(BatchID{Source: "s", Seq: seq}, ds); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.pdb.Flush(); err != nil { // the staged batches into files
		t.Fatal(err)
	}
	if err := db.Flush(); err != nil { // every group written, its staged batches deleted
		t.Fatal(err)
	}
	staged := func() uint64 {
		n, err := db.pdb.EstimateDiskUsage(stagedKey(0), stagedKey(math.MaxUint64))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := staged()
	if before < 1<<20 {
		t.Fatalf("staged batches take %d bytes of files before the compaction; the test needs more", before)
	}
	db.compactStaged()
	if got := staged(); got != before {
		t.Fatalf("the staged batches were compacted while the store was busy: %d bytes, were %d", got, before)
	}
	clock.Add(stagedCompactIdle.Milliseconds())
	db.compactStaged()
	if got := staged(); got > before/100 {
		t.Errorf("staged batches take %d bytes of files after an idle compaction, %d before", got, before)
	}
}

// Pebble's obsolete log files are deleted, not kept for reuse: each new
// memtable starts a log file, and of those only the live one stays.
func TestObsoleteLogsAreDeleted(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	dir := t.TempDir()
	db := openTest(t, dir, s)
	defer closeTest(t, db)
	for i := range 6 {
		d := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", fmt.Sprintf("h%d", i), "GET"}, Time: testNow.UnixMilli(), Sum: 1, Count: 1}
		if _, err := db.Apply(BatchID{}, []Delta{d}); err != nil {
			t.Fatal(err)
		}
		if err := db.pdb.Flush(); err != nil { // a new memtable, a new log file
			t.Fatal(err)
		}
	}
	logs, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil {
		t.Fatal(err)
	}
	if len(logs) != 1 {
		t.Errorf("the store holds %d log files, want the live one: %v", len(logs), logs)
	}
}

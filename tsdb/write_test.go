package tsdb

import (
	"fmt"
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The rows of the finest resolution of a host row that ended before the
// store's clock (a backfill) are written together, once all are closed: each
// cell gets one merge operand for the host row, not one per finest row, so
// compactions have nothing to fold. The test schema pairs 1s with 10s: ten
// finest rows of 6 minutes in a host row of an hour.
func TestHostRowWrittenOnce(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	hostStart := time.Date(2026, 3, 4, 3, 0, 0, 0, time.UTC) // ended two hours before testNow
	apply := func(seq int, ts time.Time, sum float64) {
		t.Helper()
		d := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: ts.UnixMilli(), Sum: sum, Count: 1}
		if _, err := db.Apply(BatchID{Source: "s", Seq: uint64(seq)}, []Delta{d}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		apply(i+1, hostStart.Add(time.Duration(i)*6*time.Minute+time.Minute), float64(i+1))
	}
	// A delta half an hour after the host row closes every row of it.
	apply(11, hostStart.Add(90*time.Minute), 100)
	if err := db.writeDue(false); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(db.metrics.groupsWritten.WithLabelValues("closed")); got != 10 {
		t.Fatalf("%v groups written, want the host row's 10", got)
	}
	if got := testutil.ToFloat64(db.metrics.operands); got != 2 {
		t.Errorf("%v merge operands written, want 2: one for the host row (10s) and one for the 1m row", got)
	}
	for res, want := range []int{10, 10, 10} {
		steps, err := db.Steps(res, "requests", finest, 0, hostStart.UnixMilli(), hostStart.Add(time.Hour).UnixMilli()-1, nil)
		if err != nil {
			t.Fatal(err)
		}
		sum := 0.0
		for _, st := range steps {
			sum += st.Sum
		}
		if len(steps) != want || sum != 55 {
			t.Errorf("resolution %d: %d steps summing to %v, want %d summing to 55", res, len(steps), sum, want)
		}
	}
}

// The host row the clock is in is written row by row as each closes: its
// other rows may be an hour away.
func TestOpenHostRowWrittenByRow(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	db, err := Open(Options{Dir: t.TempDir(), Schema: s, NoSync: true, RetentionInterval: -1, HeadHold: time.Second, now: func() time.Time { return testNow }})
	if err != nil {
		t.Fatal(err)
	}
	defer closeTest(t, db)
	// testNow is 05:06:07: the finest row of 05:00 has closed, the host
	// row of 05:00 to 06:00 has not.
	for i, ts := range []time.Time{testNow.Add(-5 * time.Minute), testNow.Add(-2 * time.Second)} {
		d := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: ts.UnixMilli(), Sum: 1, Count: 1}
		if _, err := db.Apply(BatchID{Source: "s", Seq: uint64(i + 1)}, []Delta{d}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.writeDue(false); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(db.metrics.groupsWritten.WithLabelValues("closed")); got != 1 {
		t.Errorf("%v groups written, want the closed row's 1", got)
	}
}

// Once the store has been idle, the writer compacts the staged batches it
// deleted out of Pebble's files: no compaction would start on its own.
func TestIdleStoreCompactsStaged(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	var clock atomic.Int64
	clock.Store(testNow.UnixMilli())
	db := openTestAt(t, t.TempDir(), s, func() time.Time { return time.UnixMilli(clock.Load()) })
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

package tsdb

import (
	"math"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/dimsum/dimsum/schema"
)

// TestRetentionPass walks one cell through its life: written, expired at
// the finer resolutions, forgotten, written again, and its source
// forgotten, with the store reopened in between.
func TestRetentionPass(t *testing.T) {
	s := testSchema(t) // 1s:10h, 10s:2d, 1m:30d
	code := cuboidOf(t, s, "errors", "code")
	clock := testNow
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	open := func() *DB {
		db, err := Open(Options{Dir: dir, Schema: s, NoSync: true, RetentionInterval: -1, Registerer: reg, now: func() time.Time { return clock }})
		if err != nil {
			t.Fatal(err)
		}
		return db
	}
	db := open()
	defer func() { _ = db.Close() }()
	apply := func(source string, values ...string) bool {
		t.Helper()
		var deltas []Delta
		for _, v := range values {
			deltas = append(deltas, Delta{Family: "errors", Cuboid: code, Values: []string{v}, Time: clock.UnixMilli(), Sum: 1, Count: 1})
		}
		applied, err := db.Apply(BatchID{Source: source, Seq: 1}, deltas)
		if err != nil {
			t.Fatal(err)
		}
		// Written while fresh: the writer writes no row already expired.
		if err := db.Flush(); err != nil {
			t.Fatal(err)
		}
		return applied
	}
	cells := func() map[string]uint32 {
		t.Helper()
		cs, err := db.Cells("errors", code, nil)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]uint32{}
		for _, c := range cs {
			out[c.Values[0]] = c.ID
		}
		return out
	}
	stepsAt := func(res int, id uint32) int {
		t.Helper()
		steps, err := db.Steps(res, "errors", code, id, math.MinInt64, math.MaxInt64, nil)
		if err != nil {
			t.Fatal(err)
		}
		return len(steps)
	}
	pass := func() RetentionStats {
		t.Helper()
		st, err := db.RunRetention()
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	start := clock.UnixMilli()
	apply("k-old", "500", "502")
	clock = clock.Add(20 * 24 * time.Hour)
	apply("k-new", "503")
	ids := cells()
	if len(ids) != 3 {
		t.Fatalf("cells %v", ids)
	}

	// 20 days on, the old cells' 1s and 10s rows are gone, their 1m rows
	// remain: they are still listed and readable at 1m.
	if st := pass(); st.Rows != 2*1 || st.Cells != 0 || st.Sources != 0 {
		t.Fatalf("first pass: %+v", st)
	}
	if got := cells(); len(got) != 3 {
		t.Fatalf("cells after the first pass: %v", got)
	}
	if stepsAt(0, ids["500"]) != 0 || stepsAt(1, ids["500"]) != 0 || stepsAt(2, ids["500"]) != 1 {
		t.Fatal("old cell: want steps at 1m only")
	}
	if stepsAt(0, ids["503"]) != 1 {
		t.Fatal("new cell lost its 1s step")
	}

	// 31 days after the old cells' data, their last rows go: the cells
	// and their source are forgotten, through a reopen.
	clock = time.UnixMilli(start).Add(31 * 24 * time.Hour)
	st := pass()
	if st.Cells != 2 || st.Sources != 1 {
		t.Fatalf("second pass: %+v", st)
	}
	closeTest(t, db)
	db = open()
	if got := cells(); len(got) != 1 || got["503"] != ids["503"] {
		t.Fatalf("cells after the old ones were forgotten: %v", got)
	}
	values, err := db.LabelValues("errors", code, "code", math.MinInt64, math.MaxInt64, 0, nil)
	if err != nil || !slices.Equal(values, []string{"503"}) {
		t.Fatalf("label values %q, %v", values, err)
	}
	if got := testutil.ToFloat64(db.metrics.cells); got != 1 {
		t.Fatalf("dimsum_tsdb_cells = %v, want 1", got)
	}
	// The forgotten source applies again; a new cell takes the lowest
	// free ID.
	if !apply("k-old", "502", "504") {
		t.Fatal("a batch of a forgotten source was refused")
	}
	again := cells()
	if len(again) != 3 || again["503"] != ids["503"] {
		t.Fatalf("cells written again: %v", again)
	}
	free := []uint32{ids["500"], ids["502"]}
	slices.Sort(free)
	if got := []uint32{again["502"], again["504"]}; !slices.Equal(got, free) {
		t.Fatalf("new cells got IDs %v, want the freed %v", got, free)
	}
	if stepsAt(0, again["502"]) != 1 || stepsAt(2, again["502"]) != 1 {
		t.Fatal("a cell written again lost its steps")
	}
	if got := testutil.ToFloat64(db.metrics.retentionPasses); got != 0 {
		t.Fatalf("passes counted across a reopen: %v", got)
	}
	// A pass with nothing to do changes nothing.
	if st := pass(); st != (RetentionStats{}) {
		t.Fatalf("idle pass: %+v", st)
	}
	if got := testutil.ToFloat64(db.metrics.retentionPasses); got != 1 {
		t.Fatalf("dimsum_tsdb_retention_passes_total = %v, want 1", got)
	}
}

// TestRetentionLoop runs the periodic pass with a short interval and waits
// for it to forget an expired cell.
func TestRetentionLoop(t *testing.T) {
	s := testSchema(t)
	code := cuboidOf(t, s, "errors", "code")
	old := testNow.Add(-40 * 24 * time.Hour)
	var clock atomic.Int64
	clock.Store(old.UnixMilli())
	db, err := Open(Options{Dir: t.TempDir(), Schema: s, NoSync: true, RetentionInterval: time.Millisecond, now: func() time.Time { return time.UnixMilli(clock.Load()) }})
	if err != nil {
		t.Fatal(err)
	}
	defer closeTest(t, db)
	// Written when it was fresh; then the clock jumps 40 days, beyond
	// every retention.
	if _, err := db.Apply(BatchID{}, []Delta{{Family: "errors", Cuboid: code, Values: []string{"500"}, Time: old.UnixMilli(), Sum: 1, Count: 1}}); err != nil {
		t.Fatal(err)
	}
	clock.Store(testNow.UnixMilli())
	deadline := time.Now().Add(time.Minute)
	for {
		cells, err := db.Cells("errors", code, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(cells) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the periodic pass did not forget the expired cell within a minute")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestRetentionRemovedResolution drops a resolution from the schema: its
// rows go at the next pass, and a cell whose only data was there is
// forgotten.
func TestRetentionRemovedResolution(t *testing.T) {
	full := testSchema(t) // 1s:10h, 10s:2d, 1m:30d
	fine, err := schema.Parse([]byte(strings.Replace(testSchemaYAML, `"1s:10h", "10s:2d", "1m:30d"`, `"1s:10h", "10s:2d"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	clock := testNow
	now := func() time.Time { return clock }
	db := openTestAt(t, dir, full, now)
	code := cuboidOf(t, full, "errors", "code")
	put := func(source, value string) {
		t.Helper()
		d := []Delta{{Family: "errors", Cuboid: code, Values: []string{value}, Time: clock.UnixMilli(), Sum: 1, Count: 1}}
		if _, err := db.Apply(BatchID{Source: source}, d); err != nil {
			t.Fatal(err)
		}
		if err := db.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	put("old", "500")
	clock = clock.Add(3 * 24 * time.Hour) // "500" now has data at 1m only
	put("new", "503")
	closeTest(t, db)

	db = openTestAt(t, dir, fine, now)
	defer closeTest(t, db)
	st, err := db.RunRetention()
	if err != nil {
		t.Fatal(err)
	}
	// The expired 1s and 10s rows of "500", and both cells' 1m rows (three
	// days apart, so two rows of 6h).
	if st.Rows != 4 || st.Cells != 1 {
		t.Fatalf("pass: %+v, want the cell with only 1m data forgotten", st)
	}
	cs, err := db.Cells("errors", code, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 || cs[0].Values[0] != "503" {
		t.Fatalf("cells after the pass: %+v", cs)
	}
	steps, err := db.removedSteps()
	if err != nil || len(steps) != 0 {
		t.Fatalf("steps of removed resolutions left after the pass: %v, %v", steps, err)
	}
	// A second pass finds nothing more to delete.
	if st, err := db.RunRetention(); err != nil || st.Rows != 0 || st.Cells != 0 {
		t.Fatalf("second pass: %+v, %v", st, err)
	}
}

// crashInProcess stops db as a crash would once everything committed is on
// disk: the head is not written and nothing else is either.
func crashInProcess(t *testing.T, db *DB) {
	t.Helper()
	db.state.Lock()
	db.state.closed = true
	db.state.Unlock()
	db.stopRetention()
	db.stopWriter()
	db.metrics.unregister()
	if err := db.pdb.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestReplayAfterOrphanForgotten: a row held in the head until every
// resolution's retention passed it is written as nothing, and the next
// retention pass forgets its cell, while the staged batch that holds it
// stays for an older row still open. After a crash, Open replays that
// batch: it leaves the forgotten cell's entry out instead of refusing the
// store as corrupt.
func TestReplayAfterOrphanForgotten(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	db, dir, now := orphanOld(t, s)
	if st, err := db.RunRetention(); err != nil || st.Cells != 1 {
		t.Fatalf("retention pass: %+v, %v; want old's cell forgotten", st, err)
	}
	if len(db.head.open) != 1 {
		t.Fatalf("%d open groups, want live's", len(db.head.open))
	}
	crashInProcess(t, db)

	db, err := Open(Options{Dir: dir, Schema: s, NoSync: true, RetentionInterval: -1, now: now})
	if err != nil {
		t.Fatalf("Open after the crash: %v", err)
	}
	defer closeTest(t, db)
	cells, err := db.Cells("requests", finest, nil)
	if err != nil || len(cells) != 1 || cells[0].Values[1] != "live" {
		t.Fatalf("cells after the crash: %v, %v; want only live's", cells, err)
	}
	steps, err := db.Steps(0, "requests", finest, cells[0].ID, math.MinInt64, math.MaxInt64, nil)
	if err != nil || len(steps) != 1 || steps[0].Sum != 1 {
		t.Errorf("live's steps after the crash: %v, %v", steps, err)
	}
}

// TestOrphanForgottenAfterRestart: the orphaned cell of a row written as
// nothing is known only in memory; when the store stops before a
// retention pass, the first pass after Open still forgets it.
func TestOrphanForgottenAfterRestart(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	db, dir, now := orphanOld(t, s)
	closeTest(t, db)

	db = openTestAt(t, dir, s, now)
	defer closeTest(t, db)
	if st, err := db.RunRetention(); err != nil || st.Cells != 1 {
		t.Fatalf("retention pass after Open: %+v, %v; want old's cell forgotten", st, err)
	}
	cells, err := db.Cells("requests", finest, nil)
	if err != nil || len(cells) != 1 || cells[0].Values[1] != "live" {
		t.Fatalf("cells: %v, %v; want only live's", cells, err)
	}
}

// orphanOld opens a store in a new directory whose head held the row of a
// cell "old" until every retention passed it, and then wrote it as
// nothing, while the row of a cell "live" is still open; its clock is now.
func orphanOld(t *testing.T, s *schema.Schema) (db *DB, dir string, now func() time.Time) {
	t.Helper()
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	var clock atomic.Int64
	clock.Store(testNow.UnixMilli())
	now = func() time.Time { return time.UnixMilli(clock.Load()) }
	dir = t.TempDir()
	db = openTestAt(t, dir, s, now)
	longest := 30 * 24 * time.Hour.Milliseconds()
	// live's row is still open when the writer runs, 7h on.
	live := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "live", "GET"}, Time: testNow.Add(7 * time.Hour).UnixMilli(), Sum: 1, Count: 1}
	old := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "old", "GET"}, Time: testNow.UnixMilli() - longest + time.Hour.Milliseconds(), Sum: 1, Count: 1}

	// The writer is held off while old's row passes every retention.
	db.write.Lock()
	for i, d := range []Delta{live, old} {
		if _, err := db.Apply(BatchID{Source: "s", Seq: uint64(i + 1)}, []Delta{d}); err != nil {
			db.write.Unlock()
			t.Fatal(err)
		}
	}
	clock.Add(7 * time.Hour.Milliseconds()) // past the end of old's 6h row at 1m
	db.write.Unlock()
	if err := db.writeDue(false); err != nil {
		t.Fatal(err)
	}
	return db, dir, now
}

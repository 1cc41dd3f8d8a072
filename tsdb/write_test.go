package tsdb

import (
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

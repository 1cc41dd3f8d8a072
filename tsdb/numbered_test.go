package tsdb

import (
	"fmt"
	"math"
	"testing"
	"time"
)

// TestNumberedCells applies batches whose cells carry their sender's
// numbers: the store remembers each existing cell by its number, finds it
// by that number in the next batch, takes a number that names another
// cell than it remembers (a sender numbering wrongly) as a lookup, never as
// that cell, and forgets every number once cells are removed, whose IDs
// may name other cells later.
func TestNumberedCells(t *testing.T) {
	s := testSchema(t)
	code := cuboidOf(t, s, "errors", "code")
	clock := testNow
	db := openTestAt(t, t.TempDir(), s, func() time.Time { return clock })
	defer closeTest(t, db)
	dict := []string{"errors"}
	for c := range 10 {
		dict = append(dict, fmt.Sprint(500+c))
	}
	seq := uint64(0)
	// apply applies one count to each code, code c under number[c].
	apply := func(number func(c int) uint32) {
		t.Helper()
		var deltas []DictDelta
		for c := range 10 {
			deltas = append(deltas, DictDelta{Family: 0, Cuboid: code, Values: []uint32{uint32(1 + c)}, Time: clock.UnixMilli(), Sum: float64(c), Count: 1, Number: number(c)})
		}
		seq++
		if _, err := db.ApplyDict(BatchID{Source: "agg/1", Seq: seq, Numbering: 7}, dict, deltas); err != nil {
			t.Fatal(err)
		}
	}
	// totals returns each code's sum and count.
	totals := func() map[string]Step {
		t.Helper()
		if err := db.Flush(); err != nil {
			t.Fatal(err)
		}
		cs, err := db.Cells("errors", code, nil)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]Step{}
		for _, c := range cs {
			steps, err := db.Steps(0, "errors", code, c.ID, math.MinInt64, math.MaxInt64, nil)
			if err != nil {
				t.Fatal(err)
			}
			var sum Step
			for _, st := range steps {
				sum.Sum += st.Sum
				sum.Count += st.Count
			}
			out[c.Values[0]] = sum
		}
		return out
	}
	remembered := func() int {
		db.apply.Lock()
		defer db.apply.Unlock()
		src := db.apply.numbered.sources["agg/1"]
		if src == nil {
			return 0
		}
		n := 0
		for _, sl := range src.slots {
			if sl.id != 0 {
				n++
			}
		}
		return n
	}
	byCode := func(c int) uint32 { return uint32(c) + 1 }
	apply(byCode) // new cells: nothing to remember yet
	apply(byCode) // existing ones: remembered
	if n := remembered(); n != 10 {
		t.Fatalf("%d cells remembered by number, want 10", n)
	}
	apply(byCode)
	// A sender that gives each code another's number: the cells stay
	// right, and are remembered under their new numbers.
	apply(func(c int) uint32 { return uint32(9-c) + 1 })
	got := totals()
	for c := range 10 {
		if want := (Step{Sum: float64(4 * c), Count: 4}); got[fmt.Sprint(500+c)] != want {
			t.Errorf("code %d holds %+v, want %+v", 500+c, got[fmt.Sprint(500+c)], want)
		}
	}
	// Past every retention, the cells are removed: their numbers go.
	clock = clock.Add(40 * 24 * time.Hour)
	if st, err := db.RunRetention(); err != nil || st.Cells != 10 {
		t.Fatalf("retention: %+v, %v; want the 10 cells removed", st, err)
	}
	if n := remembered(); n != 0 {
		t.Errorf("%d cells remembered by number after their removal, want none", n)
	}
}

package tsdb

import (
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/prometheus/model/labels"
)

func TestCells(t *testing.T) {
	s := testSchema(t)
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)

	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	dcTxn := cuboidOf(t, s, "requests", "dc", "txn")
	cells := map[string][][]string{
		"finest": {
			{"d1", "h1", "GET"},
			{"d1", "h2", "POST"},
			{"d2", "h3", "GET"},
			{"d2", "h4", ""}, // an empty value reads as a missing label
			{"d10", "h5", "GET"},
		},
		"dcTxn": {{"d1", "GET"}, {"d2", ""}},
	}
	var deltas []Delta
	for name, cub := range map[string]uint16{"finest": uint16(finest), "dcTxn": uint16(dcTxn)} {
		for _, v := range cells[name] {
			deltas = append(deltas, Delta{Family: "requests", Cuboid: schema.CuboidID(cub), Values: v, Time: testNow.UnixMilli(), Sum: 1, Count: 1})
		}
	}
	if _, err := db.Apply(BatchID{}, deltas); err != nil {
		t.Fatal(err)
	}

	m := func(mt labels.MatchType, name, value string) *labels.Matcher {
		return labels.MustNewMatcher(mt, name, value)
	}
	for _, tc := range []struct {
		name     string
		cuboid   schema.CuboidID
		matchers []*labels.Matcher
		want     []string // values joined by ","
	}{
		{"no matcher", finest, nil, []string{"d1,h1,GET", "d1,h2,POST", "d10,h5,GET", "d2,h3,GET", "d2,h4,"}},
		{"equal", finest, []*labels.Matcher{m(labels.MatchEqual, "dc", "d1")}, []string{"d1,h1,GET", "d1,h2,POST"}},
		{"equal no match", finest, []*labels.Matcher{m(labels.MatchEqual, "dc", "d3")}, nil},
		{"equal empty", finest, []*labels.Matcher{m(labels.MatchEqual, "txn", "")}, []string{"d2,h4,"}},
		{"not equal", finest, []*labels.Matcher{m(labels.MatchNotEqual, "dc", "d1")}, []string{"d10,h5,GET", "d2,h3,GET", "d2,h4,"}},
		{"not equal empty", finest, []*labels.Matcher{m(labels.MatchNotEqual, "txn", "")}, []string{"d1,h1,GET", "d1,h2,POST", "d10,h5,GET", "d2,h3,GET"}},
		{"regexp anchored", finest, []*labels.Matcher{m(labels.MatchRegexp, "dc", "d1")}, []string{"d1,h1,GET", "d1,h2,POST"}},
		{"regexp alternation", finest, []*labels.Matcher{m(labels.MatchRegexp, "host", "h1|h3")}, []string{"d1,h1,GET", "d2,h3,GET"}},
		{"regexp matching empty", finest, []*labels.Matcher{m(labels.MatchRegexp, "txn", "GET|")}, []string{"d1,h1,GET", "d10,h5,GET", "d2,h3,GET", "d2,h4,"}},
		{"regexp dot star", finest, []*labels.Matcher{m(labels.MatchRegexp, "txn", ".*")}, []string{"d1,h1,GET", "d1,h2,POST", "d10,h5,GET", "d2,h3,GET", "d2,h4,"}},
		{"regexp dot plus", finest, []*labels.Matcher{m(labels.MatchRegexp, "txn", ".+")}, []string{"d1,h1,GET", "d1,h2,POST", "d10,h5,GET", "d2,h3,GET"}},
		{"not regexp", finest, []*labels.Matcher{m(labels.MatchNotRegexp, "dc", "d1.*")}, []string{"d2,h3,GET", "d2,h4,"}},
		{"not regexp empty", finest, []*labels.Matcher{m(labels.MatchNotRegexp, "txn", "")}, []string{"d1,h1,GET", "d1,h2,POST", "d10,h5,GET", "d2,h3,GET"}},
		{"several", finest, []*labels.Matcher{m(labels.MatchRegexp, "dc", "d.*"), m(labels.MatchNotEqual, "host", "h1"), m(labels.MatchEqual, "txn", "GET")}, []string{"d10,h5,GET", "d2,h3,GET"}},
		{"metric name ignored", finest, []*labels.Matcher{m(labels.MatchEqual, labels.MetricName, "other_total"), m(labels.MatchEqual, "dc", "d2")}, []string{"d2,h3,GET", "d2,h4,"}},
		// Labels the cuboid lacks read as the empty string.
		{"absent label equal empty", dcTxn, []*labels.Matcher{m(labels.MatchEqual, "host", "")}, []string{"d1,GET", "d2,"}},
		{"absent label equal value", dcTxn, []*labels.Matcher{m(labels.MatchEqual, "host", "h1")}, nil},
		{"absent label not equal empty", dcTxn, []*labels.Matcher{m(labels.MatchNotEqual, "host", "")}, nil},
		{"absent label not equal value", dcTxn, []*labels.Matcher{m(labels.MatchNotEqual, "host", "h1")}, []string{"d1,GET", "d2,"}},
		{"absent label regexp matching empty", dcTxn, []*labels.Matcher{m(labels.MatchRegexp, "host", "h1|")}, []string{"d1,GET", "d2,"}},
		{"absent label regexp", dcTxn, []*labels.Matcher{m(labels.MatchRegexp, "host", "h.*")}, nil},
		{"absent label not regexp", dcTxn, []*labels.Matcher{m(labels.MatchNotRegexp, "host", "h.*")}, []string{"d1,GET", "d2,"}},
		{"absent label not regexp matching empty", dcTxn, []*labels.Matcher{m(labels.MatchNotRegexp, "host", ".*")}, nil},
		{"unknown label", finest, []*labels.Matcher{m(labels.MatchEqual, "zone", "")}, []string{"d1,h1,GET", "d1,h2,POST", "d10,h5,GET", "d2,h3,GET", "d2,h4,"}},
		{"unknown label value", finest, []*labels.Matcher{m(labels.MatchEqual, "zone", "z")}, nil},
		{"empty cuboid", cuboidOf(t, s, "requests", "dc"), nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := db.Cells("requests", tc.cuboid, tc.matchers)
			if err != nil {
				t.Fatal(err)
			}
			var joined []string
			for _, c := range got {
				joined = append(joined, strings.Join(c.Values, ","))
			}
			if !slices.Equal(joined, tc.want) {
				t.Fatalf("got %q, want %q", joined, tc.want)
			}
		})
	}

	t.Run("returned values are copies", func(t *testing.T) {
		got, err := db.Cells("requests", finest, nil)
		if err != nil {
			t.Fatal(err)
		}
		got[0].Values[0] = "mutated"
		again, err := db.Cells("requests", finest, nil)
		if err != nil {
			t.Fatal(err)
		}
		if again[0].Values[0] != "d1" {
			t.Fatalf("editing a returned cell changed the dictionary: %q", again[0].Values)
		}
	})
}

// TestConcurrentReads runs Cells and Steps while Apply adds cells and rows,
// for the race detector; every read must succeed and see only committed
// cells.
func TestConcurrentReads(t *testing.T) {
	s := testSchema(t)
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")

	var wg sync.WaitGroup
	done := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				cells, err := db.Cells("requests", finest, nil)
				if err != nil {
					t.Error(err)
					return
				}
				for _, c := range cells {
					steps, err := db.Steps(0, "requests", finest, c.ID, 0, testNow.UnixMilli(), nil)
					if err != nil {
						t.Error(err)
						return
					}
					if len(steps) == 0 {
						t.Errorf("cell %v is visible before its data", c.Values)
						return
					}
				}
			}
		}()
	}
	for i := range 200 {
		d := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h" + string(rune('a'+i%26)), string(rune('A' + i/26))}, Time: testNow.UnixMilli() - int64(i)*1000, Sum: 1, Count: 1}
		if _, err := db.Apply(BatchID{}, []Delta{d}); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	wg.Wait()
}

// TestLabelValuesInCoarseRow asks for the label values of a range the
// finest resolution no longer keeps, whose row of the next resolution
// holds a step before the range's start: the cell counts (the range is
// answered to the row) whether its step is still in the head or written.
func TestLabelValuesInCoarseRow(t *testing.T) {
	s := testSchema(t)
	code := cuboidOf(t, s, "errors", "code")
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	r := db.res[1]
	row := r.Row(testNow.UnixMilli() - 20*3600e3)
	start := row * r.rowSpanMs
	delta := Delta{Family: "errors", Cuboid: code, Values: []string{"500"}, Time: start + 60e3, Sum: 1, Count: 1}
	if _, err := db.Apply(BatchID{}, []Delta{delta}); err != nil {
		t.Fatal(err)
	}
	mint, maxt := start+30*60e3, start+90*60e3
	for _, when := range []string{"held", "written"} {
		values, err := db.LabelValues("errors", code, "code", mint, maxt, 0, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(values, []string{"500"}) {
			t.Fatalf("%s: values %q, want [500]", when, values)
		}
		if err := db.Flush(); err != nil {
			t.Fatal(err)
		}
	}
}

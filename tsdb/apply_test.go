package tsdb

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/client_golang/prometheus"
)

func TestApplyBadInput(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	now := testNow.UnixMilli()
	good := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: 1, Count: 1}
	for _, tc := range []struct {
		name string
		bad  Delta
		want string
	}{
		{"unknown family", Delta{Family: "nope", Values: []string{"x"}, Time: now}, `unknown family "nope"`},
		{"unknown cuboid", Delta{Family: "requests", Cuboid: 99, Values: []string{"x"}, Time: now}, "no cuboid 99"},
		{"too few values", Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1"}, Time: now}, "2 values"},
		{"too many values", Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET", "x"}, Time: now}, "4 values"},
		{"values for the apex", Delta{Family: "requests", Cuboid: 0, Values: []string{"d1"}, Time: now}, "1 values"},
		{"NaN sum", Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: math.NaN()}, "not finite"},
		{"infinite sum", Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: math.Inf(-1)}, "not finite"},
		{"negative counter sum", Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: -1}, "negative"},
		{"the largest time", Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: math.MaxInt64, Sum: 1}, "past the latest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := openTest(t, t.TempDir(), s)
			defer closeTest(t, db)
			// A good delta before the bad one must not be written either.
			applied, err := db.Apply(BatchID{Source: "k", Seq: 1}, []Delta{good, tc.bad})
			if !errors.Is(err, ErrBadInput) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "delta 1") {
				t.Fatalf("got %v, want ErrBadInput naming delta 1 and %q", err, tc.want)
			}
			if applied {
				t.Fatal("applied=true on error")
			}
			if cells, err := db.Cells("requests", finest, nil); err != nil || len(cells) != 0 {
				t.Fatalf("cells after a refused batch: %v, %v", cells, err)
			}
			// The refused batch's identity was not recorded.
			if applied, err := db.Apply(BatchID{Source: "k", Seq: 1}, []Delta{good}); err != nil || !applied {
				t.Fatalf("retry with good input: applied=%v, %v", applied, err)
			}
			if cells, err := db.Cells("requests", finest, nil); err != nil || len(cells) != 1 || cells[0].ID != 0 {
				t.Fatalf("cells: %v, %v", cells, err)
			}
		})
	}
}

func TestReadBadInput(t *testing.T) {
	s := testSchema(t)
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"Cells unknown family", func() error { _, err := db.Cells("nope", 0, nil); return err }()},
		{"Cells unknown cuboid", func() error { _, err := db.Cells("requests", 99, nil); return err }()},
		{"Steps unknown family", func() error { _, err := db.Steps(0, "nope", 0, 0, 0, 1, nil); return err }()},
		{"Steps unknown cuboid", func() error { _, err := db.Steps(0, "errors", 2, 0, 0, 1, nil); return err }()},
		{"Steps negative resolution", func() error { _, err := db.Steps(-1, "errors", 0, 0, 0, 1, nil); return err }()},
		{"Steps resolution beyond schema", func() error { _, err := db.Steps(3, "errors", 0, 0, 0, 1, nil); return err }()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !errors.Is(tc.err, ErrBadInput) {
				t.Fatalf("got %v, want ErrBadInput", tc.err)
			}
		})
	}
}

func TestIdempotency(t *testing.T) {
	s := testSchema(t)
	code := cuboidOf(t, s, "errors", "code")
	now := testNow.UnixMilli()
	d := []Delta{{Family: "errors", Cuboid: code, Values: []string{"500"}, Time: now, Sum: 2, Count: 1}}
	dir := t.TempDir()
	db := openTest(t, dir, s)
	apply := func(source string, seq uint64, want bool) {
		t.Helper()
		applied, err := db.Apply(BatchID{Source: source, Seq: seq}, d)
		if err != nil || applied != want {
			t.Fatalf("Apply(%s, %d): applied=%v, %v; want applied=%v", source, seq, applied, err, want)
		}
	}
	apply("a", 0, true)
	apply("a", 0, false)
	apply("a", 2, true) // 1 is still on its way
	apply("a", 1, true)
	apply("a", 2, false)
	apply("b", 0, true) // sources count apart
	apply("", 0, true)  // no identity: always applied
	apply("", 0, true)
	closeTest(t, db)
	db = openTest(t, dir, s)
	defer closeTest(t, db)
	apply("a", 1, false)
	apply("b", 0, false)
	apply("a", 3, true)
	steps, err := db.Steps(0, "errors", code, 0, now-1000, now, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []Step{{T: now / 1000 * 1000, Sum: 14, Count: 7}}
	if !stepsEqual(steps, want) {
		t.Fatalf("steps %v, want %v", steps, want)
	}
}

// TestRetention places deltas beyond the retention of the finer resolutions:
// they must reach only the resolutions that still keep their step.
func TestRetention(t *testing.T) {
	s := testSchema(t) // 1s:10h, 10s:2d, 1m:30d
	code := cuboidOf(t, s, "errors", "code")
	now := testNow.UnixMilli()
	hour := time.Hour.Milliseconds()
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	for _, tc := range []struct {
		name  string
		age   int64
		wants []bool // per resolution
	}{
		{"fresh", 0, []bool{true, true, true}},
		{"just inside the finest", 10 * hour, []bool{true, true, true}},
		{"beyond the finest", 10*hour + 1, []bool{false, true, true}},
		{"beyond the middle", 48*hour + 10e3, []bool{false, false, true}}, // a whole 10s step
		{"beyond all", 30*24*hour + 1, []bool{false, false, false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			value := "r-" + tc.name
			if _, err := db.Apply(BatchID{}, []Delta{{Family: "errors", Cuboid: code, Values: []string{value}, Time: now - tc.age, Sum: 1, Count: 1}}); err != nil {
				t.Fatal(err)
			}
			cells, err := db.Cells("errors", code, nil)
			if err != nil {
				t.Fatal(err)
			}
			var id uint32
			found := false
			for _, c := range cells {
				if c.Values[0] == value {
					id, found = c.ID, true
				}
			}
			if want := tc.wants[len(tc.wants)-1]; found != want {
				t.Fatalf("cell exists: %v, want %v (a cell with no retained data must not be created)", found, want)
			}
			if !found {
				return
			}
			for res, want := range tc.wants {
				steps, err := db.Steps(res, "errors", code, id, math.MinInt64, math.MaxInt64, nil)
				if err != nil {
					t.Fatal(err)
				}
				if got := len(steps) == 1; got != want {
					t.Errorf("resolution %d: steps %v, want present=%v", res, steps, want)
				}
			}
		})
	}
}

func TestClosed(t *testing.T) {
	s := testSchema(t)
	db := openTest(t, t.TempDir(), s)
	closeTest(t, db)
	if _, err := db.Apply(BatchID{}, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Apply: %v", err)
	}
	if _, err := db.Cells("errors", 1, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Cells: %v", err)
	}
	if _, err := db.Steps(0, "errors", 1, 0, 0, 1, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Steps: %v", err)
	}
	if err := db.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("Close: %v", err)
	}
}

func TestOptions(t *testing.T) {
	s := testSchema(t)
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"no dir", Options{Schema: s}, "Dir is required"},
		{"no schema", Options{Dir: "x"}, "Schema is required"},
		{"negative cache", Options{Dir: "x", Schema: s, CacheSize: -1}, "CacheSize"},
		{"no resolutions", Options{Dir: "x", Schema: &schema.Schema{}}, "no resolutions"},
		{"negative idempotency horizon", Options{Dir: "x", Schema: s, IdempotencyHorizon: -time.Hour}, "IdempotencyHorizon"},
		{"negative head bound", Options{Dir: "x", Schema: s, HeadMaxBytes: -1}, "HeadMaxBytes"},
		{"negative head hold", Options{Dir: "x", Schema: s, HeadHold: -time.Second}, "HeadHold"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.EnsureDefaults()
			if err := tc.opts.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
	var o Options
	o.EnsureDefaults()
	o.Schema = s
	o.EnsureDefaults()
	if o.CacheSize != DefaultCacheSize || o.Logger == nil || o.now == nil || o.RetentionInterval != DefaultRetentionInterval || o.IdempotencyHorizon != 30*24*time.Hour ||
		o.HeadMaxBytes != DefaultHeadMaxBytes || o.HeadHold != DefaultHeadHold {
		t.Fatalf("defaults not applied: %+v", o)
	}
}

// TestMetrics checks that the DB registers its metrics, counts into them,
// and unregisters them on Close so that a reopen can register again.
func TestMetrics(t *testing.T) {
	s := testSchema(t)
	code := cuboidOf(t, s, "errors", "code")
	reg := prometheus.NewRegistry()
	dir := t.TempDir()
	for range 2 {
		db, err := Open(Options{Dir: dir, Schema: s, Registerer: reg, NoSync: true, now: func() time.Time { return testNow }})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Apply(BatchID{Source: "k"}, []Delta{{Family: "errors", Cuboid: code, Values: []string{"500"}, Time: testNow.UnixMilli(), Sum: 1, Count: 1}}); err != nil {
			t.Fatal(err)
		}
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]float64{}
		for _, f := range families {
			m := f.GetMetric()[0]
			switch {
			case m.Counter != nil:
				got[f.GetName()] = m.Counter.GetValue()
			case m.Gauge != nil:
				got[f.GetName()] = m.Gauge.GetValue()
			}
		}
		if got["dimsum_tsdb_cells"] != 1 {
			t.Fatalf("dimsum_tsdb_cells = %v, want 1", got["dimsum_tsdb_cells"])
		}
		closeTest(t, db)
	}
}

// TestFutureDeltaKeepsClock: a delta ahead of the store's clock (from an
// aggregator whose clock runs ahead) moves the head's data clock only up to
// the store's own, so the rows still being written do not fall due.
func TestFutureDeltaKeepsClock(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	now := testNow.UnixMilli()
	ahead := now + 2*time.Hour.Milliseconds()
	for i, ts := range []int64{now, ahead} {
		if _, err := db.Apply(BatchID{Source: "s", Seq: uint64(i + 1)}, []Delta{{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: ts, Sum: 1, Count: 1}}); err != nil {
			t.Fatal(err)
		}
	}
	db.head.mu.Lock()
	clock := db.head.clock
	db.head.mu.Unlock()
	if clock > now {
		t.Errorf("the head's clock is %d, %s past the store's: a delta from a clock ahead closes the rows being written", clock, time.Duration(clock-now)*time.Millisecond)
	}
}

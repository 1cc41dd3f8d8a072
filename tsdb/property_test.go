package tsdb

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/dimsum/dimsum/schema"
)

// modelKey addresses one cell-step in the in-memory model of the cube.
type modelKey struct {
	res    int
	family string
	cuboid schema.CuboidID
	cell   string // values joined by "\x00"
	t      int64  // step start
}

// model is the cube as a plain map: what the store must read back.
type model struct {
	s     *schema.Schema
	now   int64
	steps map[modelKey]Step
}

func (m *model) apply(deltas []Delta) {
	for _, d := range deltas {
		for res, r := range m.s.Resolutions {
			if d.Time < m.now-r.Retention.Milliseconds() {
				continue
			}
			// Test times are positive, so the remainder rounds down.
			step := r.Step.Milliseconds()
			k := modelKey{res, d.Family, d.Cuboid, strings.Join(d.Values, "\x00"), d.Time - d.Time%step}
			st := m.steps[k]
			st.T = k.t
			st.Sum += d.Sum
			st.Count += d.Count
			m.steps[k] = st
		}
	}
}

// series returns the model's steps of one cell at one resolution, by time.
func (m *model) series(res int, family string, cuboid schema.CuboidID, cell string) []Step {
	var out []Step
	for k, st := range m.steps {
		if k.res == res && k.family == family && k.cuboid == cuboid && k.cell == cell {
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b Step) int { return int(a.T - b.T) })
	return out
}

// cells returns the model's cells of one cuboid.
func (m *model) cells(family string, cuboid schema.CuboidID) []string {
	var out []string
	for k := range m.steps {
		if k.family == family && k.cuboid == cuboid && !slices.Contains(out, k.cell) {
			out = append(out, k.cell)
		}
	}
	slices.Sort(out)
	return out
}

var labelDomain = map[string][]string{
	"dc":   {"d1", "d2", ""},
	"host": {"h1", "h2", "h3", "h4"},
	"txn":  {"GET", "POST", "PUT /a b"},
	"code": {"500", "502", "503"},
}

func randomDelta(rng *rand.Rand, s *schema.Schema, now int64) Delta {
	fam := s.Families[rng.IntN(len(s.Families))]
	cuboids := fam.Cuboids()
	c := cuboids[rng.IntN(len(cuboids))]
	values := make([]string, len(c.Labels))
	for i, l := range c.Labels {
		values[i] = labelDomain[l][rng.IntN(len(labelDomain[l]))]
	}
	// Most deltas are recent; some are beyond the finest retention (10h)
	// and a few beyond the middle one (2d).
	var age int64
	switch p := rng.IntN(10); {
	case p < 6:
		age = rng.Int64N(3 * 3600e3)
	case p < 8:
		age = rng.Int64N(10 * 3600e3)
	default:
		age = rng.Int64N(3 * 24 * 3600e3)
	}
	// Multiples of 1/4 add exactly in any order, so the model can demand
	// bit-equal sums whatever order Pebble merges operands in.
	return Delta{
		Family: fam.Name,
		Cuboid: c.ID,
		Values: values,
		Time:   now - age,
		Sum:    float64(rng.IntN(4000)) / 4,
		Count:  uint64(rng.IntN(5)),
	}
}

type batch struct {
	key     []byte
	keyTime int64
	deltas  []Delta
}

// TestProperty applies random batches in random order, with retries, a
// reopen and flushes along the way, and checks that every resolution reads
// back what a plain map holds and that coarse steps sum their fine steps.
func TestProperty(t *testing.T) {
	for seed := uint64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			testProperty(t, seed)
		})
	}
}

func testProperty(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, seed*7919))
	s := testSchema(t)
	now := testNow.UnixMilli()
	m := &model{s: s, now: now, steps: map[modelKey]Step{}}

	var batches []batch
	for i := range 250 {
		b := batch{keyTime: now - rng.Int64N(3600e3)}
		if rng.IntN(10) > 0 {
			b.key = fmt.Appendf(nil, "agg-%d/seq-%d", rng.IntN(3), i)
		}
		for range 1 + rng.IntN(30) {
			b.deltas = append(b.deltas, randomDelta(rng, s, now))
		}
		batches = append(batches, b)
	}
	// The schedule holds every batch once, in random order, and retries of
	// keyed batches at random later places.
	var schedule []int
	for _, i := range rng.Perm(len(batches)) {
		schedule = append(schedule, i)
	}
	for i, b := range batches {
		if b.key != nil && rng.IntN(3) == 0 {
			schedule = slices.Insert(schedule, rng.IntN(len(schedule)+1), i)
		}
	}

	dir := t.TempDir()
	db := openTest(t, dir, s)
	defer func() { _ = db.Close() }()
	seen := map[int]bool{}
	for n, i := range schedule {
		b := batches[i]
		keyTime := b.keyTime
		if seen[i] {
			keyTime += rng.Int64N(1000) // a retry is recognised by its key alone
		}
		applied, err := db.Apply(b.key, keyTime, b.deltas)
		if err != nil {
			t.Fatal(err)
		}
		if want := !seen[i]; applied != want {
			t.Fatalf("batch %d (key %q): applied=%v, want %v", i, b.key, applied, want)
		}
		if applied {
			m.apply(b.deltas)
		}
		seen[i] = true
		switch {
		case n == len(schedule)/2:
			closeTest(t, db)
			db = openTest(t, dir, s)
			verify(t, db, m, rng)
		case n%40 == 39:
			// Flushed memtables leave operands in several sstables, which
			// the compaction below merges.
			if err := db.pdb.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	verify(t, db, m, rng)
	if err := db.pdb.Compact(context.Background(), []byte{0}, []byte{0xff}, false); err != nil {
		t.Fatal(err)
	}
	verify(t, db, m, rng)
	closeTest(t, db)
	db = openTest(t, dir, s)
	verify(t, db, m, rng)
}

// verify checks db against the model.
func verify(t *testing.T, db *DB, m *model, rng *rand.Rand) {
	t.Helper()
	for _, fam := range m.s.Families {
		for _, c := range fam.Cuboids() {
			cells, err := db.Cells(fam.Name, c.ID, nil)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			ids := map[uint32]bool{}
			for _, cell := range cells {
				got = append(got, strings.Join(cell.Values, "\x00"))
				if ids[cell.ID] || int(cell.ID) >= len(cells) {
					t.Fatalf("%s/%d: cell IDs are not dense and distinct: %v", fam.Name, c.ID, cells)
				}
				ids[cell.ID] = true
			}
			if want := m.cells(fam.Name, c.ID); !slices.Equal(got, want) {
				t.Fatalf("%s/%d: cells %q, want %q", fam.Name, c.ID, got, want)
			}
			for _, cell := range cells {
				key := strings.Join(cell.Values, "\x00")
				series := make([][]Step, len(m.s.Resolutions))
				for res := range m.s.Resolutions {
					steps, err := db.Steps(res, fam.Name, c.ID, cell.ID, math.MinInt64, math.MaxInt64, nil)
					if err != nil {
						t.Fatal(err)
					}
					want := m.series(res, fam.Name, c.ID, key)
					if !stepsEqual(steps, want) {
						t.Fatalf("%s/%d %q res %d:\n got %v\nwant %v", fam.Name, c.ID, cell.Values, res, steps, want)
					}
					series[res] = steps
					// A random window reads the model's steps within it.
					if len(want) > 0 {
						mint := want[rng.IntN(len(want))].T - rng.Int64N(2*m.s.Resolutions[res].Step.Milliseconds())
						maxt := mint + rng.Int64N(int64(m.s.Resolutions[res].RowSpan().Milliseconds())*2)
						var inWindow []Step
						for _, st := range want {
							if st.T >= mint && st.T <= maxt {
								inWindow = append(inWindow, st)
							}
						}
						got, err := db.Steps(res, fam.Name, c.ID, cell.ID, mint, maxt, nil)
						if err != nil {
							t.Fatal(err)
						}
						if !stepsEqual(got, inWindow) {
							t.Fatalf("%s/%d %q res %d [%d, %d]:\n got %v\nwant %v", fam.Name, c.ID, cell.Values, res, mint, maxt, got, inWindow)
						}
					}
				}
				checkDownsampled(t, m, series)
			}
		}
	}
}

// checkDownsampled checks that each coarse step equals the sum of the finer
// steps it covers, wherever the finer resolution still retains them.
func checkDownsampled(t *testing.T, m *model, series [][]Step) {
	t.Helper()
	for res := 1; res < len(series); res++ {
		fine, coarse := m.s.Resolutions[res-1], m.s.Resolutions[res]
		cutoff := m.now - fine.Retention.Milliseconds()
		for _, c := range series[res] {
			if c.T < cutoff {
				continue
			}
			var sum Step
			for _, f := range series[res-1] {
				if f.T >= c.T && f.T < c.T+coarse.Step.Milliseconds() {
					sum.Sum += f.Sum
					sum.Count += f.Count
				}
			}
			if sum.Sum != c.Sum || sum.Count != c.Count {
				t.Fatalf("res %d step %d holds %v/%d, its res %d steps sum to %v/%d", res, c.T, c.Sum, c.Count, res-1, sum.Sum, sum.Count)
			}
		}
	}
}

// stepsEqual compares steps bit for bit.
func stepsEqual(a, b []Step) bool {
	return slices.EqualFunc(a, b, func(x, y Step) bool {
		return x.T == y.T && x.Count == y.Count && math.Float64bits(x.Sum) == math.Float64bits(y.Sum)
	})
}

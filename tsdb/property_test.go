package tsdb

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/prometheus/model/labels"
)

// modelKey addresses one cell-step in the in-memory model of the cube.
type modelKey struct {
	res    int
	family string
	cuboid schema.CuboidID
	cell   string // values joined by "\x00"
	t      int64  // step start
}

// model is the cube as a plain map: what the store must read back. steps
// holds every cell-step written and not yet deleted by a retention pass;
// reads see only those within retention of now.
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

// expire is a retention pass at m.now: whole rows that end before the
// retention go.
func (m *model) expire() {
	for k := range m.steps {
		r := m.s.Resolutions[k.res]
		if r.Row(k.t) < r.Row(m.now-r.Retention.Milliseconds()) {
			delete(m.steps, k)
		}
	}
}

// readable reports whether a step is within its resolution's retention.
func (m *model) readable(k modelKey) bool {
	r := m.s.Resolutions[k.res]
	return k.t+r.Step.Milliseconds() > m.now-r.Retention.Milliseconds()
}

// series returns the model's readable steps of one cell at one resolution,
// by time.
func (m *model) series(res int, family string, cuboid schema.CuboidID, cell string) []Step {
	var out []Step
	for k, st := range m.steps {
		if k.res == res && k.family == family && k.cuboid == cuboid && k.cell == cell && m.readable(k) {
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b Step) int { return int(a.T - b.T) })
	return out
}

// cells returns the model's cells of one cuboid: those with a step in a
// row that no retention pass deleted.
func (m *model) cells(family string, cuboid schema.CuboidID) []string {
	return m.cellsIn(family, cuboid, func(modelKey) bool { return true })
}

func (m *model) cellsIn(family string, cuboid schema.CuboidID, keep func(modelKey) bool) []string {
	var out []string
	for k := range m.steps {
		if k.family == family && k.cuboid == cuboid && keep(k) && !slices.Contains(out, k.cell) {
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

// rolledUp returns d, taken to the finest cuboid of its family, and its
// roll-up into every other cuboid.
func rolledUp(f *schema.Family, d Delta) []Delta {
	from, _ := f.Cuboid(d.Cuboid)
	finest := f.Finest()
	values := make([]string, len(finest.Labels))
	for i, l := range finest.Labels {
		if j := slices.Index(from.Labels, l); j >= 0 {
			values[i] = d.Values[j]
		} else {
			values[i] = labelDomain[l][0]
		}
	}
	var out []Delta
	for _, c := range f.Cuboids() {
		r := d
		r.Cuboid, r.Values = c.ID, nil
		for _, l := range c.Labels {
			r.Values = append(r.Values, values[slices.Index(finest.Labels, l)])
		}
		out = append(out, r)
	}
	return out
}

type batch struct {
	id     BatchID
	deltas []Delta
}

// TestProperty applies random batches in random order, with retries, a
// reopen and flushes along the way, and checks that every resolution reads
// back what a plain map holds, through Steps and Scan, that coarse steps
// sum their fine steps, and that random matchers and the label API select
// what a brute-force evaluation over the model selects. Then it moves the
// clock beyond each retention, runs retention passes, writes again (old
// cells among the new) and checks the same, across reopens.
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
	clock := testNow
	m := &model{s: s, now: clock.UnixMilli(), steps: map[modelKey]Step{}}
	dir := t.TempDir()
	open := func() *DB { return openTestAt(t, dir, s, func() time.Time { return clock }) }
	db := open()
	defer func() { _ = db.Close() }()
	// aliases and materialized count what the store did with its
	// alias rows, so that the test shows it exercised them.
	var aliases, materialized float64
	count := func() {
		aliases += testutil.ToFloat64(db.metrics.aliasRows)
		materialized += testutil.ToFloat64(db.metrics.aliasesMaterialized)
	}
	reopen := func() {
		count()
		closeTest(t, db)
		db = open()
	}
	hour := time.Hour
	// Each round writes around the clock, then moves it on and runs a
	// retention pass: beyond the finest retention (10h), the middle one
	// (2d), and every one (30d), which forgets every cell written before.
	for round, advance := range []time.Duration{11 * hour, 50 * hour, 31 * 24 * hour} {
		applyRandom(t, func() *DB { return db }, m, rng, round, reopen)
		verify(t, db, m, rng)
		clock = clock.Add(advance)
		m.now = clock.UnixMilli()
		// Reads hide expired steps before any pass deletes them.
		verify(t, db, m, rng)
		st, err := db.RunRetention()
		if err != nil {
			t.Fatal(err)
		}
		before := 0
		for _, fam := range s.Families {
			for _, c := range fam.Cuboids() {
				before += len(m.cells(fam.Name, c.ID))
			}
		}
		m.expire()
		after := 0
		for _, fam := range s.Families {
			for _, c := range fam.Cuboids() {
				after += len(m.cells(fam.Name, c.ID))
			}
		}
		if st.Rows == 0 || st.Cells != before-after || (round == 2 && (after != 0 || st.Sources == 0)) {
			t.Fatalf("round %d: retention pass %+v; the model went from %d to %d cells", round, st, before, after)
		}
		verify(t, db, m, rng)
		reopen()
		verify(t, db, m, rng)
	}
	applyRandom(t, func() *DB { return db }, m, rng, 3, reopen)
	verify(t, db, m, rng)
	if err := db.pdb.Compact(context.Background(), []byte{0}, []byte{0xff}, false); err != nil {
		t.Fatal(err)
	}
	verify(t, db, m, rng)
	reopen()
	verify(t, db, m, rng)
	if count(); aliases == 0 || materialized == 0 {
		t.Fatalf("the store wrote %v alias rows and materialized %v: the test no longer exercises them", aliases, materialized)
	}
	t.Logf("%v alias rows written, %v materialized", aliases, materialized)
}

// applyRandom applies random batches at the model's clock, in random order,
// with retries of batches with an identity, a reopen halfway, head flushes
// (so that rows are written part by part, and a row read half from the
// head and half from Pebble) and Pebble flushes.
func applyRandom(t *testing.T, db func() *DB, m *model, rng *rand.Rand, round int, reopen func()) {
	t.Helper()
	var batches []batch
	for i := range 80 {
		var b batch
		if rng.IntN(10) > 0 {
			b.id = BatchID{Source: fmt.Sprintf("agg-%d", rng.IntN(3)), Seq: uint64(1000*round + i)}
		}
		for range 1 + rng.IntN(30) {
			d := randomDelta(rng, m.s, m.now)
			if rng.IntN(2) == 0 {
				// As a combiner's flushes carry them: rolled up into
				// every cuboid, so that coarse cells with one child in
				// a row are stored as aliases of it.
				b.deltas = append(b.deltas, rolledUp(m.s.Family(d.Family), d)...)
				continue
			}
			b.deltas = append(b.deltas, d)
		}
		batches = append(batches, b)
	}
	// The schedule holds every batch once, in random order, and retries of
	// keyed batches at random later places.
	schedule := rng.Perm(len(batches))
	for i, b := range batches {
		if b.id.Source != "" && rng.IntN(3) == 0 {
			schedule = slices.Insert(schedule, rng.IntN(len(schedule)+1), i)
		}
	}
	seen := map[int]bool{}
	for n, i := range schedule {
		b := batches[i]
		applied, err := db().Apply(b.id, b.deltas)
		if err != nil {
			t.Fatal(err)
		}
		if want := !seen[i]; applied != want {
			t.Fatalf("batch %d (%+v): applied=%v, want %v", i, b.id, applied, want)
		}
		if applied {
			m.apply(b.deltas)
		}
		seen[i] = true
		switch {
		case n == len(schedule)/2:
			reopen()
			verify(t, db(), m, rng)
		case n%40 == 39:
			// Flushed memtables leave operands in several sstables, which
			// compactions merge.
			if err := db().pdb.Flush(); err != nil {
				t.Fatal(err)
			}
		case n%15 == 14:
			if err := db().Flush(); err != nil {
				t.Fatal(err)
			}
			verify(t, db(), m, rng)
		}
	}
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
				if ids[cell.ID] {
					t.Fatalf("%s/%d: cell IDs are not distinct: %v", fam.Name, c.ID, cells)
				}
				ids[cell.ID] = true
			}
			if want := m.cells(fam.Name, c.ID); !slices.Equal(got, want) {
				t.Fatalf("%s/%d: cells %q, want %q", fam.Name, c.ID, got, want)
			}
			for res := range m.s.Resolutions {
				verifyResolution(t, db, m, rng, res, fam, c.ID, cells)
			}
			verifyMatchers(t, db, m, rng, fam, c)
		}
	}
}

// verifyResolution checks Steps and Scan of every cell of one cuboid at one
// resolution against the model, over all time and over a random window.
func verifyResolution(t *testing.T, db *DB, m *model, rng *rand.Rand, res int, fam *schema.Family, cuboid schema.CuboidID, cells []Cell) {
	t.Helper()
	r := m.s.Resolutions[res]
	want := map[uint32][]Step{}
	var mint, maxt int64 = math.MaxInt64, math.MinInt64
	for _, cell := range cells {
		w := m.series(res, fam.Name, cuboid, strings.Join(cell.Values, "\x00"))
		steps, err := db.Steps(res, fam.Name, cuboid, cell.ID, math.MinInt64, math.MaxInt64, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !stepsEqual(steps, w) {
			t.Fatalf("%s/%d %q res %d:\n got %v\nwant %v", fam.Name, cuboid, cell.Values, res, steps, w)
		}
		if len(w) > 0 {
			want[cell.ID] = w
			mint, maxt = min(mint, w[0].T), max(maxt, w[len(w)-1].T)
		}
	}
	if res > 0 {
		for _, cell := range cells {
			var series [2][]Step
			for i := range series {
				var err error
				if series[i], err = db.Steps(res-1+i, fam.Name, cuboid, cell.ID, math.MinInt64, math.MaxInt64, nil); err != nil {
					t.Fatal(err)
				}
			}
			checkDownsampled(t, m, res, series[0], series[1])
		}
	}
	// A random window, by Steps and by Scan of every cell and of a subset.
	if len(want) == 0 {
		return
	}
	lo := mint - rng.Int64N(2*r.Step.Milliseconds())
	hi := lo + rng.Int64N(max(maxt-lo, 1)+r.RowSpan().Milliseconds())
	windows := [][2]int64{{math.MinInt64, math.MaxInt64}, {lo, hi}}
	for _, w := range windows {
		inWindow := map[uint32][]Step{}
		for id, steps := range want {
			for _, st := range steps {
				if st.T >= w[0] && st.T <= w[1] {
					inWindow[id] = append(inWindow[id], st)
				}
			}
		}
		var subset []uint32
		for _, cell := range cells {
			if rng.IntN(3) == 0 {
				subset = append(subset, cell.ID)
			}
		}
		subset = append(subset, math.MaxUint32) // names no cell
		for _, ids := range [][]uint32{nil, subset} {
			got := map[uint32][]Step{}
			prev := int64(-1)
			err := db.Scan(res, fam.Name, cuboid, ids, w[0], w[1], func(cell uint32, steps []Step) error {
				if int64(cell) <= prev {
					t.Fatalf("Scan called back cell %d after %d", cell, prev)
				}
				prev = int64(cell)
				got[cell] = slices.Clone(steps) // steps is reused
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for id, steps := range inWindow {
				if ids != nil && !slices.Contains(ids, id) {
					continue
				}
				if !stepsEqual(got[id], steps) {
					t.Fatalf("%s/%d cell %d res %d Scan [%d, %d]:\n got %v\nwant %v", fam.Name, cuboid, id, res, w[0], w[1], got[id], steps)
				}
				delete(got, id)
			}
			if len(got) > 0 {
				t.Fatalf("%s/%d res %d Scan [%d, %d] read cells the model has no steps for: %v", fam.Name, cuboid, res, w[0], w[1], got)
			}
			for id, steps := range inWindow {
				st, err := db.Steps(res, fam.Name, cuboid, id, w[0], w[1], nil)
				if err != nil {
					t.Fatal(err)
				}
				if !stepsEqual(st, steps) {
					t.Fatalf("%s/%d cell %d res %d Steps [%d, %d]:\n got %v\nwant %v", fam.Name, cuboid, id, res, w[0], w[1], st, steps)
				}
			}
		}
	}
}

// verifyMatchers checks Cells, LabelNames and LabelValues with random
// matchers against a brute-force evaluation over the model's cells.
func verifyMatchers(t *testing.T, db *DB, m *model, rng *rand.Rand, fam *schema.Family, c schema.Cuboid) {
	t.Helper()
	all := m.cells(fam.Name, c.ID)
	for range 4 {
		var ms []*labels.Matcher
		for range 1 + rng.IntN(3) {
			ms = append(ms, randomMatcher(rng, fam))
		}
		want := bruteForce(all, c.Labels, ms)
		cells, err := db.Cells(fam.Name, c.ID, ms)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, cell := range cells {
			got = append(got, strings.Join(cell.Values, "\x00"))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s/%d %v: cells %q, want %q", fam.Name, c.ID, ms, got, want)
		}

		// The label API over the whole time range.
		wantNames, wantValues := labelsOf(want, c.Labels)
		limit := rng.IntN(3)
		names, err := db.LabelNames(fam.Name, c.ID, math.MinInt64, math.MaxInt64, limit, ms)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(names, limited(wantNames, limit)) {
			t.Fatalf("%s/%d %v limit %d: label names %q, want %q", fam.Name, c.ID, ms, limit, names, limited(wantNames, limit))
		}
		for _, l := range append(slices.Clone(c.Labels), "zone") {
			values, err := db.LabelValues(fam.Name, c.ID, l, math.MinInt64, math.MaxInt64, limit, ms)
			if err != nil {
				t.Fatal(err)
			}
			if w := limited(wantValues[l], limit); !slices.Equal(values, w) {
				t.Fatalf("%s/%d %v limit %d: values of %s %q, want %q", fam.Name, c.ID, ms, limit, l, values, w)
			}
		}

		// The label API over a time range: the cells with a step in a row
		// of the finest resolution that keeps the range's start.
		span := time.Duration(1+rng.IntN(20)) * time.Hour
		mint := m.now - rng.Int64N(int64(40*time.Hour/time.Millisecond))
		maxt := mint + span.Milliseconds()
		res := len(m.s.Resolutions) - 1
		for i, r := range m.s.Resolutions {
			if mint >= m.now-r.Retention.Milliseconds() {
				res = i
				break
			}
		}
		r := m.s.Resolutions[res]
		inRange := m.cellsIn(fam.Name, c.ID, func(k modelKey) bool {
			return k.res == res && r.Row(k.t) >= r.Row(mint) && r.Row(k.t) <= r.Row(maxt)
		})
		wantNames, wantValues = labelsOf(bruteForce(inRange, c.Labels, ms), c.Labels)
		names, err = db.LabelNames(fam.Name, c.ID, mint, maxt, 0, ms)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(names, wantNames) {
			t.Fatalf("%s/%d %v [%d, %d]: label names %q, want %q", fam.Name, c.ID, ms, mint, maxt, names, wantNames)
		}
		for _, l := range c.Labels {
			values, err := db.LabelValues(fam.Name, c.ID, l, mint, maxt, 0, ms)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(values, wantValues[l]) {
				t.Fatalf("%s/%d %v [%d, %d]: values of %s %q, want %q", fam.Name, c.ID, ms, mint, maxt, l, values, wantValues[l])
			}
		}
	}
}

// randomMatcher draws a matcher on a label of the family or on one no
// family has, with values and expressions that match the empty string as
// often as not.
func randomMatcher(rng *rand.Rand, fam *schema.Family) *labels.Matcher {
	names := append(slices.Clone(fam.Labels), "zone")
	name := names[rng.IntN(len(names))]
	domain := append(slices.Clone(labelDomain[name]), "", "nope")
	v := domain[rng.IntN(len(domain))]
	types := []labels.MatchType{labels.MatchEqual, labels.MatchNotEqual, labels.MatchRegexp, labels.MatchNotRegexp}
	mt := types[rng.IntN(len(types))]
	if mt == labels.MatchRegexp || mt == labels.MatchNotRegexp {
		w := domain[rng.IntN(len(domain))]
		patterns := []string{
			v, v + "|" + w, ".*", ".+", "", v + ".*", "(?i)" + v, v + "|", "[a-z]+[0-9]", "h[13]|d2", "P.*|G.*",
		}
		v = patterns[rng.IntN(len(patterns))]
	}
	return labels.MustNewMatcher(mt, name, v)
}

// bruteForce evaluates matchers over cells (values joined by "\x00") the
// way Prometheus evaluates them over series: a missing label reads "".
func bruteForce(cells, cuboidLabels []string, ms []*labels.Matcher) []string {
	var out []string
cells:
	for _, cell := range cells {
		values := strings.Split(cell, "\x00")
		if len(cuboidLabels) == 0 {
			values = nil
		}
		for _, m := range ms {
			v := ""
			if i := slices.Index(cuboidLabels, m.Name); i >= 0 {
				v = values[i]
			}
			if !m.Matches(v) {
				continue cells
			}
		}
		out = append(out, cell)
	}
	return out
}

// labelsOf returns the label names held with a non-empty value by some
// cell, and each label's distinct non-empty values, all sorted.
func labelsOf(cells, cuboidLabels []string) ([]string, map[string][]string) {
	values := map[string][]string{}
	for _, cell := range cells {
		if len(cuboidLabels) == 0 {
			continue
		}
		for i, v := range strings.Split(cell, "\x00") {
			if l := cuboidLabels[i]; v != "" && !slices.Contains(values[l], v) {
				values[l] = append(values[l], v)
			}
		}
	}
	var names []string
	for l, vs := range values {
		names = append(names, l)
		slices.Sort(vs)
	}
	slices.Sort(names)
	return names, values
}

func limited(s []string, limit int) []string {
	if limit > 0 && len(s) > limit {
		return s[:limit]
	}
	return s
}

// checkDownsampled checks that each step of resolution res equals the sum
// of the steps of resolution res-1 it covers, wherever the finer resolution
// still keeps them.
func checkDownsampled(t *testing.T, m *model, res int, fineSteps, coarseSteps []Step) {
	t.Helper()
	fine, coarse := m.s.Resolutions[res-1], m.s.Resolutions[res]
	cutoff := m.now - fine.Retention.Milliseconds()
	for _, c := range coarseSteps {
		if c.T < cutoff {
			continue
		}
		var sum Step
		for _, f := range fineSteps {
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

// stepsEqual compares steps bit for bit.
func stepsEqual(a, b []Step) bool {
	return slices.EqualFunc(a, b, func(x, y Step) bool {
		return x.T == y.T && x.Count == y.Count && math.Float64bits(x.Sum) == math.Float64bits(y.Sum)
	})
}

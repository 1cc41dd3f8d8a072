package query

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/util/annotations"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

// Reader is what the query layer needs of the cube store.
type Reader interface {
	// Cells returns the cells of a cuboid whose labels satisfy every
	// matcher; a matcher on a label the cuboid lacks sees "".
	Cells(family string, cuboid schema.CuboidID, ms []*labels.Matcher) ([]tsdb.Cell, error)
	// Scan calls fn, in ascending cell ID order, for each listed cell with
	// stored steps at resolution index res whose start lies in [mint,
	// maxt], with those steps ascending. fn must not keep steps.
	Scan(res int, family string, cuboid schema.CuboidID, cells []uint32, mint, maxt int64, fn func(cell uint32, steps []tsdb.Step) error) error
	// LabelNames and LabelValues answer from the index, over the cells the
	// matchers select that hold data in [mint, maxt] ([math.MinInt64,
	// math.MaxInt64]: any time), at most limit of them (0: all).
	LabelNames(family string, cuboid schema.CuboidID, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error)
	LabelValues(family string, cuboid schema.CuboidID, name string, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error)
}

// Source gives each query the Reader it reads through. One store is its own
// view (Local); a cluster's combiners are not: cell IDs are per store, so
// every read of one query must go to the same replica of a shard, and the
// view is where that choice is kept.
type Source interface {
	// Open returns the view one query reads through. Its reads stop when
	// ctx is done. With partial false, a read that cannot reach part of the
	// cube fails with an error wrapping ErrUnavailable; with partial true it
	// answers from the rest, and Warnings says what is missing.
	Open(ctx context.Context, partial bool) View
}

// View is the Reader of one query. Its methods may be called from several
// goroutines at once.
type View interface {
	Reader
	// Warnings says what the answers read so far lack; nil when nothing.
	Warnings() annotations.Annotations
	// Close ends the query's reads.
	Close()
}

// ErrUnavailable marks a read that could not reach part of the cube when
// the query asked for a complete answer. The API reports it with errorType
// "unavailable" and status 503.
var ErrUnavailable = errors.New("query: unavailable")

// Local is the Source of a single store, which answers every query whole:
// its view is the Reader itself.
func Local(r Reader) Source { return &local{r} }

type local struct{ Reader }

func (l *local) Open(context.Context, bool) View { return l }
func (*local) Warnings() annotations.Annotations { return nil }
func (*local) Close()                            {}

// The two views of a counter family, as metric name suffixes.
const (
	// TotalSuffix names the cumulative view, for rate and increase.
	TotalSuffix = "_total"
	// DeltaSuffix names the per-step view: each sample is the exact count of
	// its step.
	DeltaSuffix = "_delta"
)

// Limits bound what one query may read. The zero value bounds nothing.
type Limits struct {
	// MaxSeries bounds the series one query reads from the store, over all
	// its selectors. 0 means no limit.
	MaxSeries int
	// MaxSamples bounds the samples one query synthesizes, over all its
	// selectors. 0 means no limit.
	MaxSamples int
}

// Queryable is a storage.Queryable that synthesizes both views of every
// counter family from the stored deltas of its cuboids.
type Queryable struct {
	schema *schema.Schema
	source Source
	// partial is what a querier opening its own view asks of it.
	partial bool
	// view, when set, is the view every querier reads through: the API
	// opens one per request, with the request's context.
	view   View
	limits Limits
	now    func() time.Time
	// resolutions are those a selection may read: all of the schema's,
	// unless a query caps them.
	resolutions []schema.Resolution
}

// NewQueryable returns the Prometheus-facing view of the cube; now is the
// clock (nil for time.Now).
func NewQueryable(s *schema.Schema, r Reader, limits Limits, now func() time.Time) *Queryable {
	return NewSourceQueryable(s, Local(r), true, limits, now)
}

// NewSourceQueryable returns the Prometheus-facing view of a cube read
// through src. Each querier opens a view of its own, with partial as the
// answer it accepts; as storage.Queryable gives Querier no context, that
// view's reads are bounded only by the source's own timeouts.
func NewSourceQueryable(s *schema.Schema, src Source, partial bool, limits Limits, now func() time.Time) *Queryable {
	if now == nil {
		now = time.Now
	}
	return &Queryable{schema: s, source: src, partial: partial, limits: limits, now: now, resolutions: s.Resolutions}
}

// withView returns a Queryable whose queriers all read through v.
func (q *Queryable) withView(v View) *Queryable {
	c := *q
	c.view = v
	return &c
}

// WithMaxResolution returns a Queryable that reads no resolution coarser
// than step: 0 reads only the finest. Older data than the finest allowed
// resolution keeps is then absent.
func (q *Queryable) WithMaxResolution(step time.Duration) *Queryable {
	c := *q
	n := 1
	for n < len(q.schema.Resolutions) && q.schema.Resolutions[n].Step <= step {
		n++
	}
	c.resolutions = q.schema.Resolutions[:n]
	return &c
}

// Querier implements storage.Queryable.
func (q *Queryable) Querier(mint, maxt int64) (storage.Querier, error) {
	if q.view != nil {
		return &querier{q: q, view: q.view, mint: mint, maxt: maxt}, nil
	}
	return &querier{q: q, view: q.source.Open(context.Background(), q.partial), owned: true, mint: mint, maxt: maxt}, nil
}

// querier reads one query's selections. The engine may call Select from
// several goroutines, so the limits are counted atomically.
type querier struct {
	q    *Queryable
	view View
	// owned is true when the querier opened its view, and so closes it.
	owned      bool
	mint, maxt int64
	series     atomic.Int64
	samples    atomic.Int64
}

func (q *querier) Close() error {
	if q.owned {
		q.view.Close()
	}
	return nil
}

// view is one metric name a family is visible as.
type view struct {
	fam   *schema.Family
	name  string
	total bool
}

// views returns the metric names the name matchers select.
func (q *querier) views(ms []*labels.Matcher) []view {
	var out []view
	for _, f := range q.q.schema.Families {
		for _, v := range []view{{f, f.Name + TotalSuffix, true}, {f, f.Name + DeltaSuffix, false}} {
			if matchesName(ms, v.name) {
				out = append(out, v)
			}
		}
	}
	return out
}

func matchesName(ms []*labels.Matcher, name string) bool {
	for _, m := range ms {
		if m.Name == labels.MetricName && !m.Matches(name) {
			return false
		}
	}
	return true
}

// Resolution picks the resolution a selection reads: the coarsest whose step
// is at most the query step and at most half the range of the range
// selector, as docs/grafana.md ("How a resolution is chosen") says, and
// then no finer than one whose retention still holds the selection's
// start. A selection with neither a step nor a range reads the finest.
func Resolution(rs []schema.Resolution, step, rng, start, now int64) int {
	res := 0
	if step > 0 || rng > 0 {
		for i, r := range rs {
			s := r.Step.Milliseconds()
			if (step > 0 && s > step) || (rng > 0 && 2*s > rng) {
				break
			}
			res = i
		}
	}
	for res < len(rs)-1 && start < now-rs[res].Retention.Milliseconds() {
		res++
	}
	return res
}

// span is the part of a selection a querier reads: a resolution, and the
// starts of the first and last steps whose samples fall in the selection.
type span struct {
	res         int
	r           schema.Resolution
	first, last int64
	maxt        int64
}

// span picks the resolution and the steps of the selection [mint, maxt]:
// those whose end lies in [mint, maxt], and the open one holding maxt. A
// step ending at mint is in: the engine asks for a range [t-R, t] from
// t-R+1, which holds a sample at t-R+1. It reports false when no step
// falls in it.
func (q *querier) span(mint, maxt, stepHint, rangeHint int64) (span, bool) {
	now := q.q.now().UnixMilli()
	res := Resolution(q.q.resolutions, stepHint, rangeHint, mint, now)
	r := q.q.resolutions[res]
	// Nothing older than the resolution's retention is kept.
	mint = max(mint, now-r.Retention.Milliseconds())
	if mint > maxt {
		return span{}, false
	}
	sp := span{res: res, r: r, first: r.StepStart(mint - 1), last: r.StepStart(maxt), maxt: maxt}
	if sp.last == maxt {
		sp.last -= r.Step.Milliseconds()
	}
	return sp, sp.last >= sp.first
}

// eachLive calls fn for every cell of the selected views that holds data in
// the span, with its stored steps, and the cuboid the cell belongs to: the
// finest one, unless the planner's internal matcher names another. fn must
// not keep steps. A storage failure comes back as a promql.ErrStorage, which
// the API reports as an internal error.
func (q *querier) eachLive(ctx context.Context, sp span, ms []*labels.Matcher, fn func(v view, cub schema.Cuboid, c tsdb.Cell, steps []tsdb.Step) error) error {
	planned, ms, err := plannedCuboid(ms)
	if err != nil {
		return err
	}
	for _, v := range q.views(ms) {
		cub := v.fam.Finest()
		if planned >= 0 {
			var ok bool
			if cub, ok = v.fam.Cuboid(schema.CuboidID(planned)); !ok {
				return fmt.Errorf("query: family %q has no cuboid %d", v.fam.Name, planned)
			}
		}
		cells, err := q.view.Cells(v.fam.Name, cub.ID, ms)
		if err != nil {
			return promql.ErrStorage{Err: err}
		}
		if len(cells) == 0 {
			continue
		}
		if err := q.touch(len(cells)); err != nil {
			return err
		}
		var fnErr error
		err = scanCells(ctx, q.view, sp.res, v.fam.Name, cub.ID, cells, sp.first, sp.last, func(c tsdb.Cell, steps []tsdb.Step) error {
			fnErr = fn(v, cub, c, steps)
			return fnErr
		})
		switch {
		case fnErr != nil:
			return fnErr
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			return promql.ErrStorage{Err: err}
		}
	}
	return nil
}

// scanCells calls fn, in ascending cell ID order, for each of the cells
// with stored steps at resolution res whose start lies in [mint, maxt], as
// Reader.Scan does, but with the cell itself rather than its ID. It stops
// with ctx's error once ctx is done. fn must not keep steps.
func scanCells(ctx context.Context, rd Reader, res int, family string, cuboid schema.CuboidID, cells []tsdb.Cell, mint, maxt int64, fn func(c tsdb.Cell, steps []tsdb.Step) error) error {
	ids := make([]uint32, len(cells))
	byID := make(map[uint32]int, len(cells))
	for i, c := range cells {
		ids[i] = c.ID
		byID[c.ID] = i
	}
	return rd.Scan(res, family, cuboid, ids, mint, maxt, func(id uint32, steps []tsdb.Step) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		return fn(cells[byID[id]], steps)
	})
}

// touch counts the cells a query reads against its limit.
func (q *querier) touch(n int) error {
	if limit := q.q.limits.MaxSeries; limit > 0 && q.series.Add(int64(n)) > int64(limit) {
		return fmt.Errorf("query: the query reads more than %d series; narrow the matchers, or aggregate them with sum", limit)
	}
	return nil
}

// plannedCuboid takes the planner's internal matcher out of ms and returns
// the cuboid it names, or -1 when there is none.
func plannedCuboid(ms []*labels.Matcher) (int, []*labels.Matcher, error) {
	i := slices.IndexFunc(ms, func(m *labels.Matcher) bool { return m.Name == cuboidLabel })
	if i < 0 {
		return -1, ms, nil
	}
	m := ms[i]
	id, err := strconv.ParseUint(m.Value, 10, 16)
	if err != nil || m.Type != labels.MatchEqual {
		return 0, nil, fmt.Errorf("query: malformed planner matcher %s", m)
	}
	return int(id), slices.Delete(slices.Clone(ms), i, i+1), nil
}

// Select synthesizes the series of the selection. Every series of one
// selection has the same timestamps: the end of each step of the chosen
// resolution in (mint, maxt], plus maxt itself holding the step still open
// when maxt is not a step end.
func (q *querier) Select(ctx context.Context, _ bool, hints *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
	mint, maxt := q.mint, q.maxt
	var stepHint, rangeHint int64
	if hints != nil {
		mint, maxt = max(mint, hints.Start), min(maxt, hints.End)
		stepHint, rangeHint = hints.Step, hints.Range
	}
	sp, ok := q.span(mint, maxt, stepHint, rangeHint)
	if !ok {
		return storage.EmptySeriesSet()
	}
	var out []storage.Series
	if hints != nil && hints.Func == "series" {
		// The series API wants labels only.
		err := q.eachLive(ctx, sp, ms, func(v view, cub schema.Cuboid, c tsdb.Cell, _ []tsdb.Step) error {
			out = append(out, &series{lset: seriesLabels(v.name, cub.Labels, c.Values)})
			return nil
		})
		return q.sorted(out, err)
	}

	step := sp.r.Step.Milliseconds()
	n := (sp.last-sp.first)/step + 1
	maxSamples := int64(q.q.limits.MaxSamples)
	if maxSamples <= 0 {
		maxSamples = math.MaxInt64
	}
	if n > maxSamples {
		return storage.ErrSeriesSet(fmt.Errorf("query: the selection spans %d steps of %s, more than the %d samples a query may hold; narrow the range or widen the step", n, sp.r.Step, maxSamples))
	}
	ts := make([]int64, n)
	for i := range ts {
		ts[i] = min(sp.first+int64(i+1)*step, sp.maxt)
	}
	err := q.eachLive(ctx, sp, ms, func(v view, cub schema.Cuboid, c tsdb.Cell, steps []tsdb.Step) error {
		// Every series is synthesized here, before the engine counts
		// samples, so the engine's limit is enforced while building.
		if q.samples.Add(n) > maxSamples {
			return fmt.Errorf("query: the query would synthesize more than the %d samples it may hold; narrow the range or the matchers", maxSamples)
		}
		vals := make([]float64, len(ts))
		var total float64
		for _, s := range steps {
			vals[(s.T-sp.first)/step] += s.Sum
			total += s.Sum
		}
		if v.total {
			// The running total starts from twice the series' own total
			// over the selection. Prometheus' rate extrapolates towards
			// the counter's zero point when the first sample is small
			// next to the increase (durationToZero in promql's
			// extrapolatedRate), which would differ series by series and
			// break linearity. With this base the first sample is at
			// least twice any window's increase, so the zero point is
			// always at least two average sample intervals away, beyond
			// the 1.1 intervals the start may be extrapolated by.
			acc := 2 * total
			for i := range vals {
				acc += vals[i]
				vals[i] = acc
			}
		}
		out = append(out, &series{lset: seriesLabels(v.name, cub.Labels, c.Values), ts: ts, vals: vals})
		return nil
	})
	return q.sorted(out, err)
}

// sorted returns the selection's series, with the warnings of the view.
func (q *querier) sorted(out []storage.Series, err error) storage.SeriesSet {
	if err != nil {
		return storage.ErrSeriesSet(err)
	}
	slices.SortFunc(out, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
	return &seriesSet{list: out, i: -1, warnings: q.view.Warnings()}
}

func seriesLabels(name string, names, values []string) labels.Labels {
	b := labels.NewScratchBuilder(len(names) + 1)
	b.Add(labels.MetricName, name)
	for i, n := range names {
		b.Add(n, values[i])
	}
	b.Sort()
	return b.Labels()
}

// unbounded reports whether the querier's range is the whole of time, as
// the label APIs ask without start and end.
func (q *querier) unbounded() bool { return q.mint <= math.MinInt64/2 && q.maxt >= math.MaxInt64/2 }

// errEnough stops a scan that has found what it looks for.
var errEnough = errors.New("query: enough")

// eachInRange calls fn with each cell that has a sample in the querier's
// range, among the cells the matchers select of the smallest cuboid of v's
// family that keeps the label keep ("" for none) and every label the
// matchers name. A cell of that cuboid has a sample where one of its finest
// cells does, so the answer is the one Select gives the series API, from
// fewer cells. The index alone cannot answer this: it knows which rows
// hold a cell's data, and a row spans many steps. fn returning errEnough
// ends the scan early, without an error.
func (q *querier) eachInRange(ctx context.Context, v view, keep string, ms []*labels.Matcher, fn func(cub schema.Cuboid, c tsdb.Cell) error) error {
	sp, ok := q.span(q.mint, q.maxt, 0, 0)
	if !ok {
		return nil
	}
	need := map[string]bool{}
	if keep != "" {
		need[keep] = true
	}
	for _, m := range ms {
		if _, ok := v.fam.LabelIndex(m.Name); ok {
			need[m.Name] = true
		}
	}
	cub := smallestCuboid(v.fam, need)
	cells, err := q.view.Cells(v.fam.Name, cub.ID, ms)
	if err != nil || len(cells) == 0 {
		return err
	}
	err = scanCells(ctx, q.view, sp.res, v.fam.Name, cub.ID, cells, sp.first, sp.last, func(c tsdb.Cell, _ []tsdb.Step) error { return fn(cub, c) })
	if errors.Is(err, errEnough) {
		return nil
	}
	return err
}

// hasSeries reports whether any series of v the matchers select has a
// sample in the querier's range.
func (q *querier) hasSeries(ctx context.Context, v view, ms []*labels.Matcher) (bool, error) {
	if q.unbounded() {
		names, err := q.view.LabelNames(v.fam.Name, v.fam.Finest().ID, math.MinInt64, math.MaxInt64, 1, ms)
		return len(names) > 0, err
	}
	found := false
	err := q.eachInRange(ctx, v, "", ms, func(schema.Cuboid, tsdb.Cell) error { found = true; return errEnough })
	return found, err
}

// LabelNames returns the label names of the series the matchers select.
// Every event carries a non-empty value for each label of its family, so a
// family with a selected series has all of them.
func (q *querier) LabelNames(ctx context.Context, _ *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	set := map[string]struct{}{}
	for _, v := range q.views(ms) {
		ok, err := q.hasSeries(ctx, v, ms)
		if err != nil {
			return nil, nil, err
		}
		if ok {
			set[labels.MetricName] = struct{}{}
			for _, n := range v.fam.Labels {
				set[n] = struct{}{}
			}
		}
	}
	return slices.Sorted(maps.Keys(set)), q.view.Warnings(), nil
}

// LabelValues returns the values of one label over the series the matchers
// select: from the index over all of time, and from the stored steps over a
// bounded range.
func (q *querier) LabelValues(ctx context.Context, name string, hints *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	limit := 0
	if hints != nil {
		limit = hints.Limit
	}
	set := map[string]struct{}{}
	for _, v := range q.views(ms) {
		if name == labels.MetricName {
			// A view is a value when any of its series is selected.
			ok, err := q.hasSeries(ctx, v, ms)
			if err != nil {
				return nil, nil, err
			}
			if ok {
				set[v.name] = struct{}{}
			}
			continue
		}
		if _, ok := v.fam.LabelIndex(name); !ok {
			continue
		}
		var vals []string
		var err error
		if q.unbounded() {
			vals, err = q.view.LabelValues(v.fam.Name, v.fam.Finest().ID, name, math.MinInt64, math.MaxInt64, limit, ms)
		} else {
			err = q.eachInRange(ctx, v, name, ms, func(cub schema.Cuboid, c tsdb.Cell) error {
				vals = append(vals, c.Values[slices.Index(cub.Labels, name)])
				return nil
			})
		}
		if err != nil {
			return nil, nil, err
		}
		for _, val := range vals {
			set[val] = struct{}{}
		}
	}
	out := slices.Sorted(maps.Keys(set))
	if limit > 0 && len(out) > limit {
		out = out[:limit]
	}
	return out, q.view.Warnings(), nil
}

type seriesSet struct {
	list     []storage.Series
	i        int
	warnings annotations.Annotations
}

func (s *seriesSet) Next() bool                        { s.i++; return s.i < len(s.list) }
func (s *seriesSet) At() storage.Series                { return s.list[s.i] }
func (*seriesSet) Err() error                          { return nil }
func (s *seriesSet) Warnings() annotations.Annotations { return s.warnings }

// series is one synthesized series. Its timestamps are shared with every
// other series of the selection.
type series struct {
	lset labels.Labels
	ts   []int64
	vals []float64
}

func (s *series) Labels() labels.Labels { return s.lset }

func (s *series) Iterator(it chunkenc.Iterator) chunkenc.Iterator {
	if si, ok := it.(*sampleIterator); ok {
		*si = sampleIterator{ts: s.ts, vals: s.vals, i: -1}
		return si
	}
	return &sampleIterator{ts: s.ts, vals: s.vals, i: -1}
}

// sampleIterator walks float samples in Prometheus' iterator shape.
type sampleIterator struct {
	ts   []int64
	vals []float64
	i    int
}

func (it *sampleIterator) Next() chunkenc.ValueType {
	if it.i+1 >= len(it.ts) {
		it.i = len(it.ts)
		return chunkenc.ValNone
	}
	it.i++
	return chunkenc.ValFloat
}

func (it *sampleIterator) Seek(t int64) chunkenc.ValueType {
	if it.i < 0 {
		it.i = 0
	}
	if it.i >= len(it.ts) {
		return chunkenc.ValNone
	}
	if it.ts[it.i] < t {
		n, _ := slices.BinarySearch(it.ts[it.i:], t)
		it.i += n
	}
	if it.i >= len(it.ts) {
		return chunkenc.ValNone
	}
	return chunkenc.ValFloat
}

func (it *sampleIterator) At() (int64, float64) { return it.ts[it.i], it.vals[it.i] }
func (it *sampleIterator) AtT() int64           { return it.ts[it.i] }
func (*sampleIterator) AtST() int64             { return 0 }
func (*sampleIterator) Err() error              { return nil }

func (*sampleIterator) AtHistogram(*histogram.Histogram) (int64, *histogram.Histogram) {
	panic("query: a synthesized counter series has no histograms")
}

func (*sampleIterator) AtFloatHistogram(*histogram.FloatHistogram) (int64, *histogram.FloatHistogram) {
	panic("query: a synthesized counter series has no histograms")
}

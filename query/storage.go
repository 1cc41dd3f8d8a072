package query

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
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
	// Steps appends the stored steps of one cell at resolution index res
	// whose start lies in [mint, maxt], ascending.
	Steps(res int, family string, cuboid schema.CuboidID, cell uint32, mint, maxt int64, dst []tsdb.Step) ([]tsdb.Step, error)
}

// The two views of a counter family, as metric name suffixes.
const (
	// TotalSuffix names the cumulative view, for rate and increase.
	TotalSuffix = "_total"
	// DeltaSuffix names the per-step view: each sample is the exact count of
	// its step.
	DeltaSuffix = "_delta"
)

// Queryable is a storage.Queryable that synthesizes both views of every
// counter family from the stored deltas of its finest cuboid.
type Queryable struct {
	schema *schema.Schema
	reader Reader
	now    func() time.Time
}

// NewQueryable returns the Prometheus-facing view of the cube.
func NewQueryable(s *schema.Schema, r Reader, now func() time.Time) *Queryable {
	if now == nil {
		now = time.Now
	}
	return &Queryable{schema: s, reader: r, now: now}
}

// Querier implements storage.Queryable.
func (q *Queryable) Querier(mint, maxt int64) (storage.Querier, error) {
	return &querier{q: q, mint: mint, maxt: maxt}, nil
}

type querier struct {
	q          *Queryable
	mint, maxt int64
}

func (*querier) Close() error { return nil }

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
// selector, as DESIGN.md says, and then no finer than one whose retention
// still holds the selection's start. A selection with neither a step nor a
// range reads the finest.
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
	now := q.q.now().UnixMilli()
	res := Resolution(q.q.schema.Resolutions, stepHint, rangeHint, mint, now)
	r := q.q.schema.Resolutions[res]
	step := r.Step.Milliseconds()
	// Nothing older than the resolution's retention is kept.
	mint = max(mint, now-r.Retention.Milliseconds())
	if mint > maxt {
		return storage.EmptySeriesSet()
	}

	// Steps whose end lies in (mint, maxt], and the open one holding maxt.
	first := r.StepStart(mint)
	last := r.StepStart(maxt)
	if last == maxt {
		last -= step
	}
	if last < first {
		return storage.EmptySeriesSet()
	}
	if hints != nil && hints.Func == "series" {
		return q.labelsOnly(res, first, last, ms)
	}
	if steps := (last-first)/step + 1; steps > maxSelectSteps {
		return storage.ErrSeriesSet(fmt.Errorf("query: the selection spans %d steps of %s, more than %d; narrow the range or widen the step", steps, r.Step, maxSelectSteps))
	}
	n := int((last-first)/step) + 1
	ts := make([]int64, n)
	for i := range ts {
		ts[i] = min(first+int64(i+1)*step, maxt)
	}

	var out []storage.Series
	var steps []tsdb.Step
	for _, v := range q.views(ms) {
		cells, err := q.q.reader.Cells(v.fam.Name, v.fam.Finest().ID, ms)
		if err != nil {
			return storage.ErrSeriesSet(err)
		}
		cub := v.fam.Finest()
		for _, c := range cells {
			if err := ctx.Err(); err != nil {
				return storage.ErrSeriesSet(err)
			}
			steps, err = q.q.reader.Steps(res, v.fam.Name, cub.ID, c.ID, first, last, steps[:0])
			if err != nil {
				return storage.ErrSeriesSet(err)
			}
			if len(steps) == 0 {
				continue
			}
			vals := make([]float64, n)
			var total float64
			for _, s := range steps {
				vals[(s.T-first)/step] += s.Sum
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
		}
	}
	slices.SortFunc(out, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
	return &seriesSet{list: out, i: -1}
}

// maxSelectSteps bounds the samples synthesized per series of one selection;
// the resolution rule keeps real queries far below it (a year at 1h is 8,760).
const maxSelectSteps = 1 << 20

// labelsOnly returns the series of the selection that hold data in it,
// without samples, for the series API.
func (q *querier) labelsOnly(res int, first, last int64, ms []*labels.Matcher) storage.SeriesSet {
	var out []storage.Series
	var steps []tsdb.Step
	for _, v := range q.views(ms) {
		cub := v.fam.Finest()
		cells, err := q.q.reader.Cells(v.fam.Name, cub.ID, ms)
		if err != nil {
			return storage.ErrSeriesSet(err)
		}
		for _, c := range cells {
			steps, err = q.q.reader.Steps(res, v.fam.Name, cub.ID, c.ID, first, last, steps[:0])
			if err != nil {
				return storage.ErrSeriesSet(err)
			}
			if len(steps) > 0 {
				out = append(out, &series{lset: seriesLabels(v.name, cub.Labels, c.Values)})
			}
		}
	}
	slices.SortFunc(out, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
	return &seriesSet{list: out, i: -1}
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

// LabelNames returns the label names of the series the matchers select.
func (q *querier) LabelNames(_ context.Context, _ *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	set := map[string]struct{}{}
	for _, v := range q.views(ms) {
		cells, err := q.q.reader.Cells(v.fam.Name, v.fam.Finest().ID, ms)
		if err != nil {
			return nil, nil, err
		}
		if len(cells) == 0 {
			continue
		}
		set[labels.MetricName] = struct{}{}
		for _, l := range v.fam.Labels {
			set[l] = struct{}{}
		}
	}
	return sortedKeys(set), nil, nil
}

// LabelValues returns the values of one label over the series the matchers
// select.
func (q *querier) LabelValues(_ context.Context, name string, hints *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	set := map[string]struct{}{}
	for _, v := range q.views(ms) {
		cells, err := q.q.reader.Cells(v.fam.Name, v.fam.Finest().ID, ms)
		if err != nil {
			return nil, nil, err
		}
		if len(cells) == 0 {
			continue
		}
		if name == labels.MetricName {
			set[v.name] = struct{}{}
			continue
		}
		i := slices.Index(v.fam.Finest().Labels, name)
		if i < 0 {
			continue
		}
		for _, c := range cells {
			set[c.Values[i]] = struct{}{}
		}
	}
	out := sortedKeys(set)
	if hints != nil && hints.Limit > 0 && len(out) > hints.Limit {
		out = out[:hints.Limit]
	}
	return out, nil, nil
}

func sortedKeys(set map[string]struct{}) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// IsView reports whether a metric name is one of the views of a family.
func IsView(s *schema.Schema, name string) (*schema.Family, bool) {
	for _, suffix := range []string{TotalSuffix, DeltaSuffix} {
		if f := s.Family(strings.TrimSuffix(name, suffix)); f != nil && strings.HasSuffix(name, suffix) {
			return f, true
		}
	}
	return nil, false
}

type seriesSet struct {
	list []storage.Series
	i    int
}

func (s *seriesSet) Next() bool                      { s.i++; return s.i < len(s.list) }
func (s *seriesSet) At() storage.Series              { return s.list[s.i] }
func (*seriesSet) Err() error                        { return nil }
func (*seriesSet) Warnings() annotations.Annotations { return nil }

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

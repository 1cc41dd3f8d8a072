package query

import (
	"cmp"
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

// A cube slice answers an analyst's question directly from the stored
// deltas: the exact sums and counts of one family's events that match some
// filters, per group of labels, over a time range aligned to whole steps.
// docs/slices.md describes the requests.

// Measures a slice can report for each group.
const (
	measureSum   = "sum"   // the sum of the events' values
	measureCount = "count" // the number of events
	measureRate  = "rate"  // the sum per second of the range or step
	measureShare = "share" // the sum as a fraction of all matching groups' sum
)

var allMeasures = []string{measureSum, measureCount, measureRate, measureShare}

// inputError is a malformed or impossible slice request: bad_data, 400.
func inputError(format string, args ...any) error {
	return &apiError{typ: errBadData, err: fmt.Errorf(format, args...)}
}

// sliceRequest is a parsed and checked slice question.
type sliceRequest struct {
	fam   *schema.Family
	where []*labels.Matcher
	// by are the group labels, parents included, in family label order.
	by         []string
	start, end int64 // requested, unix ms, end exclusive
	// step is the length of each point of a series; 0 asks for one total
	// per group.
	step time.Duration
	// res is the resolution to read, or -1 to let the range choose.
	res      int
	measures []string
	order    string // a measure
	desc     bool
	limit    int // 0: no limit
	offset   int
	// partial accepts an answer without the parts of the cube that cannot
	// be read.
	partial bool
}

// Point is one step of a group's series.
type Point struct {
	T      float64            `json:"t"` // unix seconds of the step's start
	Values map[string]float64 `json:"values"`
}

// Group is one row of a slice.
type Group struct {
	Labels map[string]string  `json:"labels"`
	Values map[string]float64 `json:"values"`
	// Series holds the points of the group when the slice has a step.
	Series []Point `json:"series,omitempty"`
}

// Rest sums the groups the limit and offset left out.
type Rest struct {
	Groups int `json:"groups"`
	Group
}

// SliceRange is the time range a slice covers.
type SliceRange struct {
	// Start and End are the covered range, unix seconds, end exclusive.
	Start float64 `json:"start"`
	End   float64 `json:"end"`
	// RequestedStart and RequestedEnd are what the request asked for.
	RequestedStart float64 `json:"requestedStart"`
	RequestedEnd   float64 `json:"requestedEnd"`
	// Alignment says how the requested range was widened to whole steps.
	Alignment string `json:"alignment"`
}

// Slice is the answer to a slice request.
type Slice struct {
	Family string `json:"family"`
	// Cuboid names the labels of the cuboid the answer was read from.
	Cuboid     []string   `json:"cuboid"`
	Resolution string     `json:"resolution"`
	Step       string     `json:"step,omitempty"`
	Range      SliceRange `json:"range"`
	Where      []string   `json:"where"`
	By         []string   `json:"by"`
	Measures   []string   `json:"measures"`
	Order      string     `json:"order"`
	// TotalGroups counts every group with data, before limit and offset.
	TotalGroups int     `json:"totalGroups"`
	Groups      []Group `json:"groups"`
	Rest        *Rest   `json:"rest,omitempty"`
	// Total sums every group.
	Total Group `json:"total"`
	// Warnings say what the answer lacks: the shards of the cube no
	// replica answered for, when the request accepts a partial answer.
	Warnings []string `json:"warnings,omitempty"`
}

// accum holds one group's sums and counts per point.
type accum struct {
	values []string
	sum    []float64
	count  []uint64
}

func (g *accum) add(o *accum) {
	for i := range g.sum {
		g.sum[i] += o.sum[i]
		g.count[i] += o.count[i]
	}
}

func (g *accum) total() (sum float64, count uint64) {
	for i := range g.sum {
		sum += g.sum[i]
		count += g.count[i]
	}
	return sum, count
}

// runSlice reads the slice from the smallest cuboid covering its labels.
func runSlice(ctx context.Context, s *schema.Schema, rd View, req sliceRequest, now time.Time, maxGroups int) (*Slice, error) {
	need := map[string]bool{}
	for _, l := range req.by {
		need[l] = true
	}
	for _, m := range req.where {
		need[m.Name] = true
	}
	cub := smallestCuboid(req.fam, need)

	res, err := sliceResolution(s.Resolutions, req, now.UnixMilli())
	if err != nil {
		return nil, err
	}
	r := s.Resolutions[res]
	// Points are as long as the step asked for, or one point spans the
	// whole range; either way the range is widened to whole steps of the
	// resolution, so every stored step lies wholly in or out of it.
	grid := r
	if req.step > 0 {
		grid = schema.Resolution{Step: req.step}
	}
	unit := grid.Step.Milliseconds()
	start := grid.StepStart(req.start)
	end := grid.StepStart(req.end)
	if end < req.end {
		end += unit
	}
	width := end - start
	if req.step > 0 {
		width = unit
	}
	points := int((end - start) / width)
	if points > maxPoints {
		return nil, inputError("the range holds %d steps of %s, more than %d; widen the step or narrow the range", points, model.Duration(req.step), maxPoints)
	}

	cells, err := rd.Cells(req.fam.Name, cub.ID, req.where)
	if err != nil {
		return nil, err
	}
	slots := make([]int, len(req.by))
	for i, l := range req.by {
		slots[i] = slices.Index(cub.Labels, l)
	}
	groups := map[string]*accum{}
	var order []*accum
	var key strings.Builder
	err = scanCells(ctx, rd, res, req.fam.Name, cub.ID, cells, start, end-1, func(c tsdb.Cell, steps []tsdb.Step) error {
		key.Reset()
		for _, slot := range slots {
			key.WriteString(c.Values[slot])
			key.WriteByte(0xff)
		}
		g := groups[key.String()]
		if g == nil {
			if len(groups) == maxGroups {
				return &apiError{typ: errExec, err: fmt.Errorf("the slice has more than %d groups, the limit (max_groups); narrow the filters or group by coarser levels", maxGroups)}
			}
			g = &accum{values: make([]string, len(slots)), sum: make([]float64, points), count: make([]uint64, points)}
			for i, slot := range slots {
				g.values[i] = c.Values[slot]
			}
			groups[key.String()] = g
			order = append(order, g)
		}
		for _, st := range steps {
			i := (st.T - start) / width
			g.sum[i] += st.Sum
			g.count[i] += st.Count
		}
		return nil
	})
	if err != nil {
		return nil, err
	}

	all := &accum{sum: make([]float64, points), count: make([]uint64, points)}
	for _, g := range order {
		all.add(g)
	}
	sortGroups(order, req.order, req.desc)
	lo := min(req.offset, len(order))
	hi := len(order)
	if req.limit > 0 {
		hi = min(hi, lo+req.limit)
	}
	out := &Slice{
		Family:     req.fam.Name,
		Cuboid:     slices.Clone(cub.Labels),
		Resolution: model.Duration(r.Step).String(),
		Range: SliceRange{
			Start: seconds(start), End: seconds(end),
			RequestedStart: seconds(req.start), RequestedEnd: seconds(req.end),
			Alignment: alignment(req, start, end, r),
		},
		Where:       matcherStrings(req.where),
		By:          req.by,
		Measures:    req.measures,
		Order:       req.order,
		TotalGroups: len(order),
		Groups:      []Group{},
	}
	if out.Cuboid == nil {
		out.Cuboid = []string{}
	}
	if req.desc {
		out.Order = "-" + req.order
	}
	if req.step > 0 {
		out.Step = model.Duration(req.step).String()
	}
	for _, g := range order[lo:hi] {
		out.Groups = append(out.Groups, req.group(g, all, start, width))
	}
	if left := len(order) - (hi - lo); left > 0 {
		rest := &accum{sum: make([]float64, points), count: make([]uint64, points)}
		for _, g := range slices.Concat(order[:lo], order[hi:]) {
			rest.add(g)
		}
		out.Rest = &Rest{Groups: left, Group: req.group(rest, all, start, width)}
	}
	out.Total = req.group(all, all, start, width)
	if ws := rd.Warnings(); len(ws) > 0 {
		out.Warnings, _ = ws.AsStrings("", 0, 0)
		slices.Sort(out.Warnings)
	}
	return out, nil
}

// group renders one row with the requested measures.
func (req *sliceRequest) group(g, all *accum, start, width int64) Group {
	out := Group{Labels: map[string]string{}}
	for i, v := range g.values {
		out.Labels[req.by[i]] = v
	}
	sum, count := g.total()
	allSum, _ := all.total()
	out.Values = req.values(sum, count, allSum, float64(width*int64(len(g.sum))))
	if req.step > 0 {
		out.Series = make([]Point, len(g.sum))
		for i := range g.sum {
			out.Series[i] = Point{T: seconds(start + int64(i)*width), Values: req.values(g.sum[i], g.count[i], all.sum[i], float64(width))}
		}
	}
	return out
}

func (req *sliceRequest) values(sum float64, count uint64, allSum, widthMs float64) map[string]float64 {
	out := make(map[string]float64, len(req.measures))
	for _, m := range req.measures {
		out[m] = measure(m, sum, count, allSum, widthMs)
	}
	return out
}

func measure(m string, sum float64, count uint64, allSum, widthMs float64) float64 {
	switch m {
	case measureCount:
		return float64(count)
	case measureRate:
		return sum / (widthMs / 1000)
	case measureShare:
		if allSum == 0 {
			return 0
		}
		return sum / allSum
	default:
		return sum
	}
}

// sortGroups orders groups by a measure over the whole range, ties broken
// by labels ascending so that paging is stable. Rate and share order as the
// sum does.
func sortGroups(gs []*accum, by string, desc bool) {
	type keyed struct {
		g *accum
		v float64
	}
	ks := make([]keyed, len(gs))
	for i, g := range gs {
		sum, count := g.total()
		ks[i] = keyed{g, sum}
		if by == measureCount {
			ks[i].v = float64(count)
		}
	}
	slices.SortFunc(ks, func(a, b keyed) int {
		c := cmp.Compare(a.v, b.v)
		if desc {
			c = -c
		}
		if c == 0 {
			c = slices.Compare(a.g.values, b.g.values)
		}
		return c
	})
	for i := range ks {
		gs[i] = ks[i].g
	}
}

// sliceResolution picks the resolution a slice reads. A series reads the
// coarsest resolution whose step is at most the requested step, and a total
// the coarsest whose steps align the requested start and end exactly (the
// finest when none does), so that it is widened the least; either is then
// no finer than one whose retention still holds the start. A resolution
// the request forces is read as it is. The step must be a multiple of the
// resolution's step.
func sliceResolution(rs []schema.Resolution, req sliceRequest, now int64) (int, error) {
	res := req.res
	if res < 0 {
		res = Resolution(rs, req.step.Milliseconds(), 0, req.start, now)
		for req.step == 0 && res+1 < len(rs) && aligned(rs[res+1], req.start) && aligned(rs[res+1], req.end) {
			res++
		}
	}
	r := rs[res]
	if req.step > 0 && req.step%r.Step != 0 {
		why := "the resolution the slice reads"
		if req.res < 0 && req.step >= rs[0].Step {
			why = fmt.Sprintf("the resolution that still holds data from %s", time.UnixMilli(req.start).UTC().Format(time.RFC3339))
		}
		return 0, inputError("step %s is not a multiple of %s, the step of %s; use a multiple of %s", model.Duration(req.step), model.Duration(r.Step), why, model.Duration(r.Step))
	}
	return res, nil
}

func aligned(r schema.Resolution, t int64) bool { return r.StepStart(t) == t }

func alignment(req sliceRequest, start, end int64, r schema.Resolution) string {
	what := fmt.Sprintf("whole %s steps of the %s resolution", model.Duration(r.Step), model.Duration(r.Step))
	if req.step > 0 {
		what = fmt.Sprintf("whole %s steps", model.Duration(req.step))
	}
	if start == req.start && end == req.end {
		return "none: the range is made of " + what
	}
	return fmt.Sprintf("widened to %s (epoch-aligned): start rounded down, end rounded up", what)
}

func seconds(ms int64) float64 { return float64(ms) / 1000 }

func matcherStrings(ms []*labels.Matcher) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Name + m.Type.String() + m.Value
	}
	return out
}

// parseWhere reads comma-separated filters: name=value, name!=value,
// name=~regexp, name!~regexp, and the sets name=a|b|c and name!=a|b|c.
// Commas inside (), [] or {} belong to a regular expression.
func parseWhere(fam *schema.Family, s string) ([]*labels.Matcher, error) {
	var out []*labels.Matcher
	for _, f := range splitTop(s) {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		i := strings.IndexAny(f, "=!")
		if i <= 0 {
			return nil, inputError("filter %q: want label=value, label!=value, label=~regexp or label!~regexp", f)
		}
		name := strings.TrimSpace(f[:i])
		op, val := f[i:], ""
		var typ labels.MatchType
		switch {
		case strings.HasPrefix(op, "=~"):
			typ, val = labels.MatchRegexp, op[2:]
		case strings.HasPrefix(op, "!~"):
			typ, val = labels.MatchNotRegexp, op[2:]
		case strings.HasPrefix(op, "!="):
			typ, val = labels.MatchNotEqual, op[2:]
		case strings.HasPrefix(op, "="):
			typ, val = labels.MatchEqual, op[1:]
		default:
			return nil, inputError("filter %q: want label=value, label!=value, label=~regexp or label!~regexp", f)
		}
		if _, ok := fam.LabelIndex(name); !ok {
			return nil, inputError("filter %q: family %q has no label %q (it has %s)", f, fam.Name, name, strings.Join(fam.Labels, ", "))
		}
		if (typ == labels.MatchEqual || typ == labels.MatchNotEqual) && strings.Contains(val, "|") {
			set := strings.Split(val, "|")
			for i := range set {
				set[i] = regexp.QuoteMeta(set[i])
			}
			val = strings.Join(set, "|")
			typ = map[labels.MatchType]labels.MatchType{labels.MatchEqual: labels.MatchRegexp, labels.MatchNotEqual: labels.MatchNotRegexp}[typ]
		}
		m, err := labels.NewMatcher(typ, name, val)
		if err != nil {
			return nil, inputError("filter %q: %v", f, err)
		}
		out = append(out, m)
	}
	return out, nil
}

// splitTop splits s at the commas outside brackets.
func splitTop(s string) []string {
	var out []string
	depth, from := 0, 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case '(', '[', '{':
			depth++
		case ')', ']', '}':
			depth--
		case ',':
			if depth == 0 {
				out = append(out, s[from:i])
				from = i + 1
			}
		}
	}
	return append(out, s[from:])
}

// groupLabels expands a group-by list: each level brings the levels above
// it in its hierarchy, as the lattice keeps them. The answer is in family
// label order.
func groupLabels(fam *schema.Family, by []string) ([]string, error) {
	keep := map[string]bool{}
	for _, l := range by {
		d, lvl, ok := levelOf(fam, l)
		if !ok {
			return nil, inputError("cannot group by %q: family %q has no label %q (it has %s)", l, fam.Name, l, strings.Join(fam.Labels, ", "))
		}
		for _, p := range fam.Dimensions[d].Levels[:lvl+1] {
			keep[p] = true
		}
	}
	out := []string{}
	for _, l := range fam.Labels {
		if keep[l] {
			out = append(out, l)
		}
	}
	return out, nil
}

// levelOf finds a label's dimension and its depth in it.
func levelOf(fam *schema.Family, label string) (dim, level int, ok bool) {
	for d, dm := range fam.Dimensions {
		if i := slices.Index(dm.Levels, label); i >= 0 {
			return d, i, true
		}
	}
	return 0, 0, false
}

// dimensionOf finds a dimension by its name ("datacenter/cluster/host") or
// by one of its levels.
func dimensionOf(fam *schema.Family, name string) (int, error) {
	for d, dm := range fam.Dimensions {
		if dm.Name == name {
			return d, nil
		}
	}
	if d, _, ok := levelOf(fam, name); ok {
		return d, nil
	}
	names := make([]string, len(fam.Dimensions))
	for i, dm := range fam.Dimensions {
		names[i] = dm.Name
	}
	return 0, inputError("family %q has no dimension %q (it has %s)", fam.Name, name, strings.Join(names, ", "))
}

package query

import (
	"fmt"
	"math"
	"slices"
	"strconv"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"

	"github.com/dimsum/dimsum/schema"
)

// cuboidLabel names the internal matcher through which the planner points a
// selector at a rolled-up cuboid. Users cannot send it: the API refuses every
// query and match[] selector that names it.
const cuboidLabel = "__dimsum_cuboid__"

// checkReserved refuses a user's expression that names the internal label.
func checkReserved(node parser.Node) error {
	var err error
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok && err == nil {
			err = reservedMatcher(vs.LabelMatchers)
		}
		return err
	})
	return err
}

func reservedMatcher(ms []*labels.Matcher) error {
	for _, m := range ms {
		if m.Name == cuboidLabel {
			return fmt.Errorf("label %q is reserved for the query planner", cuboidLabel)
		}
	}
	return nil
}

// plan rewrites, in place, each sum by/without over a chain of linear
// functions of one selector so that the selector reads the smallest cuboid
// covering the grouping and every label its matchers name. The sum of a
// rolled-up cell's series equals the sum of its finest cells' series (see
// docs/architecture.md, "4. Query"), so the answer does not change; only
// fewer series are read. Every other selector reads the finest cuboid.
func plan(s *schema.Schema, node parser.Node) {
	if agg, ok := node.(*parser.AggregateExpr); ok && agg.Op == parser.SUM {
		if vs, counter := linearSelector(agg.Expr); vs != nil {
			pointAtCuboid(s, agg, vs, counter)
		}
	}
	for _, c := range parser.Children(node) {
		plan(s, c)
	}
}

// pointAtCuboid adds the internal matcher to vs when a cuboid coarser than
// the finest covers the labels the sum needs. counter tells that a counter
// function reads vs, which is linear only over the cumulative view.
func pointAtCuboid(s *schema.Schema, agg *parser.AggregateExpr, vs *parser.VectorSelector, counter bool) {
	v, ok := selectorView(s, vs)
	if !ok || (counter && !v.total) {
		return
	}
	need := map[string]bool{}
	for _, l := range v.fam.Labels {
		if slices.Contains(agg.Grouping, l) != agg.Without {
			need[l] = true
		}
	}
	for _, m := range vs.LabelMatchers {
		if _, ok := v.fam.LabelIndex(m.Name); ok {
			need[m.Name] = true
		}
	}
	best := smallestCuboid(v.fam, need)
	if best.ID != v.fam.Finest().ID {
		vs.LabelMatchers = append(vs.LabelMatchers, labels.MustNewMatcher(labels.MatchEqual, cuboidLabel, strconv.Itoa(int(best.ID))))
	}
}

// smallestCuboid returns the materialized cuboid with the fewest labels
// that keeps every label in need: the finest when no smaller one does.
func smallestCuboid(f *schema.Family, need map[string]bool) schema.Cuboid {
	best := f.Finest()
	for _, c := range f.Cuboids() {
		if len(c.Labels) < len(best.Labels) && covers(c, need) {
			best = c
		}
	}
	return best
}

func covers(c schema.Cuboid, need map[string]bool) bool {
	n := 0
	for _, l := range c.Labels {
		if need[l] {
			n++
		}
	}
	return n == len(need)
}

// selectorView returns the one view a selector names by an equality matcher
// on the metric name. A selector that may match several views is not
// planned.
func selectorView(s *schema.Schema, vs *parser.VectorSelector) (view, bool) {
	for _, m := range vs.LabelMatchers {
		if m.Name != labels.MetricName || m.Type != labels.MatchEqual {
			continue
		}
		for _, f := range s.Families {
			switch m.Value {
			case f.Name + TotalSuffix:
				return view{f, m.Value, true}, true
			case f.Name + DeltaSuffix:
				return view{f, m.Value, false}, true
			}
		}
	}
	return view{}, false
}

// Functions that are linear in their argument's values when every series
// of the argument has samples at the same timestamps, as synthesized series
// do. The counter functions are linear only over the cumulative view read
// directly: over anything else their reset handling is not.
var (
	linearFuncs  = []string{"delta", "idelta", "sum_over_time", "avg_over_time", "last_over_time"}
	counterFuncs = []string{"rate", "increase", "irate"}
)

// linearSelector returns the selector at the bottom of e when e is a chain of
// linear operations over that one selector, and nil otherwise. counter
// reports that a counter function reads the selector.
func linearSelector(e parser.Expr) (vs *parser.VectorSelector, counter bool) {
	switch e := e.(type) {
	case *parser.ParenExpr:
		return linearSelector(e.Expr)
	case *parser.UnaryExpr:
		return linearSelector(e.Expr)
	case *parser.VectorSelector:
		return e, false
	case *parser.MatrixSelector:
		return linearSelector(e.VectorSelector)
	case *parser.SubqueryExpr:
		return linearSelector(e.Expr)
	case *parser.Call:
		if len(e.Args) != 1 {
			return nil, false
		}
		switch {
		case slices.Contains(linearFuncs, e.Func.Name):
			return linearSelector(e.Args[0])
		case slices.Contains(counterFuncs, e.Func.Name):
			return bareSelector(e.Args[0]), true
		}
	case *parser.BinaryExpr:
		switch {
		case e.Op == parser.MUL && exactFactor(e.LHS):
			return linearSelector(e.RHS)
		case (e.Op == parser.MUL || e.Op == parser.DIV) && exactFactor(e.RHS):
			return linearSelector(e.LHS)
		}
	}
	return nil, false
}

// Bounds of a number a sum may be multiplied or divided by and keep its
// answer: the series' values are finite, at most 2^53 times a count of
// steps, and at least a count over the longest retention, so no product or
// quotient over- or underflows in either order of evaluation.
const (
	minFactor = 1e-30
	maxFactor = 1e30
)

// exactFactor reports whether multiplying or dividing by e commutes with
// sum: e must be a number (a literal, in parentheses or under a sign) of
// magnitude within [minFactor, maxFactor]. Any other scalar may be zero or
// infinite at evaluation time, and then sum(x / 0) is NaN where one series
// is 0 (0/0) while sum(x) / 0 is +Inf; sum(x * Inf) likewise. Prometheus
// over the finest series gives the former, so the planner must not read a
// rolled-up cell.
func exactFactor(e parser.Expr) bool {
	v, ok := number(e)
	return ok && math.Abs(v) >= minFactor && math.Abs(v) <= maxFactor
}

// number returns the value of a number literal, in parentheses or under a
// sign.
func number(e parser.Expr) (float64, bool) {
	switch e := e.(type) {
	case *parser.NumberLiteral:
		return e.Val, true
	case *parser.ParenExpr:
		return number(e.Expr)
	case *parser.UnaryExpr:
		v, ok := number(e.Expr)
		if e.Op == parser.SUB {
			v = -v
		}
		return v, ok
	}
	return 0, false
}

// bareSelector returns the selector a range function reads when it reads it
// with nothing in between (a range selector, or a subquery of the selector
// alone), and nil otherwise.
func bareSelector(e parser.Expr) *parser.VectorSelector {
	switch e := e.(type) {
	case *parser.ParenExpr:
		return bareSelector(e.Expr)
	case *parser.MatrixSelector:
		return bareSelector(e.VectorSelector)
	case *parser.SubqueryExpr:
		return bareSelector(e.Expr)
	case *parser.VectorSelector:
		return e
	}
	return nil
}

package query

import (
	"context"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

func TestPlanRefusesReservedLabel(t *testing.T) {
	expr, err := promqlParser.ParseExpr(`sum(rate(requests_total{__dimsum_cuboid__="0"}[5m]))`)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkReserved(expr); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Fatalf("checkReserved = %v, want an error naming the reserved label", err)
	}
}

// cubeEvent is one raw counter event of the default schema's family.
type cubeEvent struct {
	t      int64
	values []string // datacenter, cluster, host, transaction, status
	v      float64
}

// randomEvents draws a workload whose hierarchy values repeat across parents:
// every datacenter has clusters c0..c2, and every cluster hosts h0..h3.
func randomEvents(rng *rand.Rand, n int, from, to int64) []cubeEvent {
	out := make([]cubeEvent, n)
	for i := range out {
		out[i] = cubeEvent{
			t: from + rng.Int64N(to-from),
			values: []string{
				"dc" + strconv.Itoa(rng.IntN(3)),
				"c" + strconv.Itoa(rng.IntN(3)),
				"h" + strconv.Itoa(rng.IntN(4)),
				[]string{"checkout", "search", "login", "cart"}[min(rng.IntN(6), 3)],
				[]string{"200", "404", "500"}[rng.IntN(3)],
			},
			v: float64(1 + rng.IntN(5)),
		}
	}
	return out
}

// writeCube stores events as the aggregator and combiner would: a delta
// in every cuboid of the lattice, applied in random order.
func writeCube(t testing.TB, db *tsdb.DB, s *schema.Schema, rng *rand.Rand, events []cubeEvent) {
	t.Helper()
	fam := s.Family("requests")
	var deltas []tsdb.Delta
	for _, e := range events {
		for _, c := range fam.Cuboids() {
			values := make([]string, len(c.Slots))
			for i, slot := range c.Slots {
				values[i] = e.values[slot]
			}
			deltas = append(deltas, tsdb.Delta{Family: fam.Name, Cuboid: c.ID, Values: values, Time: e.t, Sum: e.v, Count: 1})
		}
	}
	rng.Shuffle(len(deltas), func(i, j int) { deltas[i], deltas[j] = deltas[j], deltas[i] })
	for len(deltas) > 0 {
		n := min(len(deltas), 10_000)
		if _, err := db.Apply(tsdb.BatchID{}, deltas[:n]); err != nil {
			t.Fatal(err)
		}
		deltas = deltas[n:]
	}
}

// TestPlan runs the planner's rewrite table, testdata/plan: each query is
// planned, and the rewritten query with the cuboid each selector reads is
// compared with the file (go test ./query -run TestPlan -rewrite writes
// it). Every entry is evaluated with and without the plan over a
// randomized cube, as instant and range queries at every resolution, and
// must give the same answer, with data in it.
func TestPlan(t *testing.T) {
	s := schema.Default()
	db := openStore(t, s)
	rng := rand.New(rand.NewPCG(7, 11))
	now := time.Now().Truncate(time.Hour)
	from, to := now.Add(-50*time.Hour).UnixMilli(), now.UnixMilli()
	writeCube(t, db, s, rng, randomEvents(rng, 6000, from, to))
	qa := NewQueryable(s, db, Limits{}, func() time.Time { return now })
	engine := promql.NewEngine(promql.EngineOpts{
		MaxSamples: 5e7, Timeout: time.Minute, LookbackDelta: 5 * time.Minute,
		EnableAtModifier: true, EnableNegativeOffset: true,
		NoStepSubqueryIntervalFn: func(int64) int64 { return time.Minute.Milliseconds() },
	})
	type window struct {
		name       string
		start, end time.Time
		step       time.Duration
	}
	windows := []window{
		{"instant", now.Add(-90 * time.Minute), now.Add(-90 * time.Minute), 0},
		{"instant-open-step", now.Add(-7 * time.Second), now.Add(-7 * time.Second), 0},
		{"10s", now.Add(-40 * time.Minute), now.Add(-10 * time.Minute), 10 * time.Second},
		{"1m", now.Add(-6 * time.Hour), now, time.Minute},
		{"1h", now.Add(-48 * time.Hour), now, time.Hour},
	}
	datadriven.RunTest(t, "testdata/plan", func(t *testing.T, d *datadriven.TestData) string {
		if d.Cmd != "plan" {
			d.Fatalf(t, "unknown command %q", d.Cmd)
		}
		qs := strings.TrimSpace(d.Input)
		expr, err := promqlParser.ParseExpr(qs)
		if err != nil {
			d.Fatalf(t, "%v", err)
		}
		plan(s, expr)
		for _, w := range windows {
			want := evaluate(t, engine, qa, qs, w.start, w.end, w.step)
			got := evaluate(t, engine, qa, expr.String(), w.start, w.end, w.step)
			if len(want) == 0 {
				t.Errorf("%s: %s: empty answer; the workload does not exercise it", d.Pos, w.name)
			}
			if diff := compareResults(got, want); diff != "" {
				t.Errorf("%s: %s (%s), planned as %s: %s", d.Pos, qs, w.name, expr, diff)
			}
		}
		return expr.String() + "\n" + reads(t, s, expr)
	})
}

// reads says which cuboid each selector of a planned expression reads.
func reads(t *testing.T, s *schema.Schema, expr parser.Expr) string {
	t.Helper()
	var out strings.Builder
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		id, _, err := plannedCuboid(vs.LabelMatchers)
		if err != nil {
			t.Fatal(err)
		}
		if id < 0 {
			out.WriteString("reads the finest cuboid\n")
			return nil
		}
		c, _ := s.Family("requests").Cuboid(schema.CuboidID(id))
		fmt.Fprintf(&out, "reads %v\n", c.Labels)
		return nil
	})
	return out.String()
}

// evaluate runs a query (an instant query when step is 0) and returns its
// samples by series.
func evaluate(t *testing.T, engine *promql.Engine, qa *Queryable, qs string, start, end time.Time, step time.Duration) map[string][]promql.FPoint {
	t.Helper()
	var q promql.Query
	var err error
	if step == 0 {
		q, err = engine.NewInstantQuery(context.Background(), qa, nil, qs, start)
	} else {
		q, err = engine.NewRangeQuery(context.Background(), qa, nil, qs, start, end, step)
	}
	if err != nil {
		t.Fatalf("%s: %v", qs, err)
	}
	defer q.Close()
	res := q.Exec(context.Background())
	if res.Err != nil {
		t.Fatalf("%s: %v", qs, res.Err)
	}
	out := map[string][]promql.FPoint{}
	switch v := res.Value.(type) {
	case promql.Vector:
		for _, s := range v {
			out[s.Metric.String()] = []promql.FPoint{{T: s.T, F: s.F}}
		}
	case promql.Matrix:
		for _, s := range v {
			// The engine reuses the points once the query is closed.
			out[s.Metric.String()] = slices.Clone(s.Floats)
		}
	default:
		t.Fatalf("%s: unexpected result type %s", qs, res.Value.Type())
	}
	return out
}

// compareResults describes the first difference between two answers, with
// room only for float addition order.
func compareResults(got, want map[string][]promql.FPoint) string {
	for _, k := range slices.Sorted(maps.Keys(want)) {
		g, ok := got[k]
		if !ok {
			return fmt.Sprintf("series %s missing", k)
		}
		w := want[k]
		if len(g) != len(w) {
			return fmt.Sprintf("series %s: %d points, want %d", k, len(g), len(w))
		}
		for i := range w {
			if g[i].T != w[i].T || !nearlyEqual(g[i].F, w[i].F) {
				return fmt.Sprintf("series %s point %d: got %v@%d, want %v@%d", k, i, g[i].F, g[i].T, w[i].F, w[i].T)
			}
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			return fmt.Sprintf("extra series %s", k)
		}
	}
	return ""
}

func nearlyEqual(a, b float64) bool {
	if a == b {
		return true
	}
	if math.IsNaN(a) || math.IsNaN(b) {
		return math.IsNaN(a) && math.IsNaN(b)
	}
	return math.Abs(a-b) <= 1e-9*math.Max(1, math.Max(math.Abs(a), math.Abs(b)))
}

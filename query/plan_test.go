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

	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

// TestPlanRewrites pins which cuboid the planner picks for each query shape,
// by the labels the cuboid keeps; "" means the query is left as it is.
func TestPlanRewrites(t *testing.T) {
	s := schema.Default()
	for _, tc := range []struct{ query, want string }{
		{`sum(rate(requests_total[5m]))`, "[]"},
		{`sum by (datacenter) (rate(requests_total[5m]))`, "[datacenter]"},
		{`sum by (cluster) (rate(requests_total[5m]))`, "[datacenter cluster]"},
		{`sum by (datacenter) (rate(requests_total{status=~"5.."}[5m]))`, "[datacenter status]"},
		{`sum without (host) (rate(requests_total[5m]))`, "[datacenter cluster transaction status]"},
		{`sum without (host, transaction, status) (increase(requests_total[1h]))`, "[datacenter cluster]"},
		{`sum by (datacenter) (60 * rate(requests_total[5m] offset 1h))`, "[datacenter]"},
		{`sum by (datacenter) (rate(requests_total[5m]) / 2)`, "[datacenter]"},
		{`sum by (datacenter) (-(irate(requests_total[5m])))`, "[datacenter]"},
		{`sum by (datacenter) (rate(requests_total[10m:1m]))`, "[datacenter]"},
		{`sum by (datacenter) (sum_over_time(rate(requests_total[1m])[30m:5m]))`, "[datacenter]"},
		{`sum by (datacenter) (sum_over_time(requests_delta[1h]))`, "[datacenter]"},
		{`sum by (datacenter) (requests_delta @ 1000)`, "[datacenter]"},
		{`sum by (transaction) (delta(requests_total[1h]))`, "[transaction]"},
		{`sum by (le) (rate(requests_total[5m]))`, "[]"},
		{`sum by (host) (rate(requests_total[5m]))`, "[datacenter cluster host]"},
		{`sum by (datacenter) (rate(requests_total{host="h1"}[5m]))`, "[datacenter cluster host]"},
		// Reads the finest cuboid.
		{`sum without (datacenter) (rate(requests_total[5m]))`, ""},
		{`count by (datacenter) (rate(requests_total[5m]))`, ""},
		{`max by (datacenter) (rate(requests_total[5m]))`, ""},
		{`sum by (datacenter) (rate(requests_delta[5m]))`, ""},
		{`sum by (datacenter) (rate((-requests_total)[5m:1m]))`, ""},
		{`sum by (datacenter) (rate(requests_total[5m]) + 1)`, ""},
		{`sum by (datacenter) (2 / rate(requests_total[5m]))`, ""},
		{`sum by (datacenter) (max_over_time(requests_delta[5m]))`, ""},
		{`sum by (datacenter) ({__name__=~"requests_.*"})`, ""},
		{`rate(requests_total[5m])`, ""},
	} {
		expr, err := promqlParser.ParseExpr(tc.query)
		if err != nil {
			t.Fatal(err)
		}
		plan(s, expr)
		if got := plannedLabels(t, s, expr); got != tc.want {
			t.Errorf("%s: planned onto %q, want %q (%s)", tc.query, got, tc.want, expr)
		}
	}
}

// plannedLabels returns the labels of the cuboid the planner pointed the
// expression's selectors at, or "" if it pointed none.
func plannedLabels(t *testing.T, s *schema.Schema, expr parser.Expr) string {
	t.Helper()
	var got []string
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			id, _, err := plannedCuboid(vs.LabelMatchers)
			if err != nil {
				t.Fatal(err)
			}
			if id >= 0 {
				c, _ := s.Family("requests").Cuboid(schema.CuboidID(id))
				got = append(got, fmt.Sprint(c.Labels))
			}
		}
		return nil
	})
	return strings.Join(got, " ")
}

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

// TestPlanEquality evaluates every plannable query shape over a randomized
// cube with the planner on and off, as instant and range queries at every
// resolution, and requires the same answer.
func TestPlanEquality(t *testing.T) {
	s := schema.Default()
	db := openStore(t, s)
	rng := rand.New(rand.NewPCG(7, 11))
	now := time.Now().Truncate(time.Hour)
	from, to := now.Add(-50*time.Hour).UnixMilli(), now.UnixMilli()
	writeCube(t, db, s, rng, randomEvents(rng, 6000, from, to))
	qa := NewQueryable(s, db, Limits{MaxSamples: 5e7}, func() time.Time { return now })
	engine := promql.NewEngine(promql.EngineOpts{
		MaxSamples: 5e7, Timeout: time.Minute, LookbackDelta: 5 * time.Minute,
		EnableAtModifier: true, EnableNegativeOffset: true,
		NoStepSubqueryIntervalFn: func(int64) int64 { return time.Minute.Milliseconds() },
	})
	at := strconv.FormatInt(now.Add(-3*time.Hour).Unix(), 10)
	queries := []string{
		`sum(rate(requests_total[5m]))`,
		`sum by (datacenter) (rate(requests_total[5m]))`,
		`sum by (cluster) (rate(requests_total[5m]))`,
		`sum by (datacenter, cluster) (increase(requests_total[2h]))`,
		`sum without (host) (rate(requests_total[5m]))`,
		`sum without (host, transaction) (irate(requests_total[3m]))`,
		`sum by (status) (rate(requests_total{datacenter="dc1"}[10m]))`,
		`sum by (transaction) (rate(requests_total{status=~"5..", cluster!="c2"}[5m]))`,
		`sum by (datacenter) (rate(requests_total{transaction!~"check.*"}[5m]))`,
		`sum(delta(requests_total[30m]))`,
		`sum by (datacenter) (idelta(requests_total[5m]))`,
		`sum by (datacenter) (sum_over_time(requests_delta[1h]))`,
		`sum by (datacenter) (avg_over_time(requests_delta[15m]))`,
		`sum by (datacenter) (last_over_time(requests_delta[15m]))`,
		`sum by (datacenter) (requests_delta)`,
		`sum by (datacenter) (requests_total)`,
		`sum by (datacenter) (rate(requests_total[5m] offset 30m))`,
		`sum by (datacenter) (rate(requests_total[5m] @ ` + at + `))`,
		`sum by (datacenter) (rate(requests_total[10m:1m]))`,
		`sum by (datacenter) (sum_over_time(rate(requests_total[1m])[30m:5m]))`,
		`sum by (datacenter) (60 * rate(requests_total[5m]))`,
		`sum by (datacenter) (rate(requests_total[5m]) / 3)`,
		`sum by (datacenter) (-rate(requests_total[5m]))`,
		`sum(sum by (datacenter, cluster) (rate(requests_total[5m])))`,
		`sum by (datacenter) (rate(requests_total[5m])) / ignoring(datacenter) group_left sum(rate(requests_total[5m]))`,
		`sum by (cluster, transaction) (increase(requests_total[1h]))`,
		`sum by (datacenter) (increase(requests_total[3h]))`,
	}
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
	planned := 0
	for _, qs := range queries {
		expr, err := promqlParser.ParseExpr(qs)
		if err != nil {
			t.Fatal(err)
		}
		plan(s, expr)
		if expr.String() != qs {
			planned++
		}
		for _, w := range windows {
			want := evaluate(t, engine, qa, qs, w.start, w.end, w.step)
			got := evaluate(t, engine, qa, expr.String(), w.start, w.end, w.step)
			if len(want) == 0 {
				t.Errorf("%s (%s): empty answer; the workload does not exercise it", qs, w.name)
			}
			if diff := compareResults(got, want); diff != "" {
				t.Errorf("%s (%s), planned as %s: %s", qs, w.name, expr, diff)
			}
		}
	}
	if planned != len(queries) {
		t.Errorf("the planner rewrote %d of %d queries, want all", planned, len(queries))
	}
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
	if math.IsNaN(a) || math.IsNaN(b) {
		return math.IsNaN(a) && math.IsNaN(b)
	}
	return math.Abs(a-b) <= 1e-9*math.Max(1, math.Max(math.Abs(a), math.Abs(b)))
}

package node

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The reference suite checks a running node, over HTTP, against the
// Prometheus engine over refModel: a plain list of the raw events from which
// the finest series are synthesized as docs/architecture.md ("4. Query")
// defines them, with nothing of dimsum's own code in between.

// refEvent is one accepted event.
type refEvent struct {
	family string
	labels map[string]string
	t      int64
	v      float64
	// views holds the event's series labels under each metric name, made
	// once.
	views map[string]labels.Labels
}

func (e *refEvent) series(name string) labels.Labels {
	if e.views == nil {
		e.views = map[string]labels.Labels{}
	}
	lset, ok := e.views[name]
	if !ok {
		b := labels.NewBuilder(labels.FromMap(e.labels))
		lset = b.Set(labels.MetricName, name).Labels()
		e.views[name] = lset
	}
	return lset
}

// refModel is a storage.Queryable over raw events.
type refModel struct {
	schema *schema.Schema
	events []refEvent
	now    int64
}

func (m *refModel) Querier(mint, maxt int64) (storage.Querier, error) {
	return &refQuerier{m: m, mint: mint, maxt: maxt}, nil
}

type refQuerier struct {
	m          *refModel
	mint, maxt int64
}

// resolution picks the coarsest resolution whose step is at most the query
// step and at most half the range, then the first whose retention holds the
// selection's start.
func (q *refQuerier) resolution(step, rng, start int64) schema.Resolution {
	rs := q.m.schema.Resolutions
	i := 0
	for j, r := range rs {
		s := r.Step.Milliseconds()
		if (step == 0 && rng == 0) || (step > 0 && s > step) || (rng > 0 && 2*s > rng) {
			break
		}
		i = j
	}
	for i < len(rs)-1 && start < q.m.now-rs[i].Retention.Milliseconds() {
		i++
	}
	return rs[i]
}

func floorTo(t, step int64) int64 {
	if t < 0 && t%step != 0 {
		return t - t%step - step
	}
	return t - t%step
}

func (q *refQuerier) Select(_ context.Context, _ bool, h *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
	mint, maxt := max(q.mint, h.Start), min(q.maxt, h.End)
	r := q.resolution(h.Step, h.Range, mint)
	step := r.Step.Milliseconds()
	mint = max(mint, q.m.now-r.Retention.Milliseconds())
	// A step ending at mint has its sample in the selection.
	first, last := floorTo(mint-1, step), floorTo(maxt, step)
	if last == maxt {
		last -= step
	}
	var out []storage.Series
	if mint > maxt || last < first {
		return &refSet{}
	}
	n := (last-first)/step + 1
	for _, fam := range q.m.schema.Families {
		for _, name := range []string{fam.Name + "_total", fam.Name + "_delta"} {
			// The finest series of the view, by label set.
			steps := map[string][]float64{}
			lsets := map[string]labels.Labels{}
			for i := range q.m.events {
				e := &q.m.events[i]
				s := floorTo(e.t, step)
				if e.family != fam.Name || s < first || s > last {
					continue
				}
				lset := e.series(name)
				if !matchAll(ms, lset) {
					continue
				}
				k := lset.String()
				if steps[k] == nil {
					steps[k] = make([]float64, n)
					lsets[k] = lset
				}
				steps[k][(s-first)/step] += e.v
			}
			for k, vals := range steps {
				ts := make([]int64, n)
				for i := range ts {
					ts[i] = min(first+int64(i+1)*step, maxt)
				}
				if strings.HasSuffix(name, "_total") {
					var total float64
					for _, v := range vals {
						total += v
					}
					acc := 2 * total
					for i, v := range vals {
						acc += v
						vals[i] = acc
					}
				}
				samples := make([]chunks.Sample, n)
				for i := range samples {
					samples[i] = refSample{ts[i], vals[i]}
				}
				out = append(out, storage.NewListSeries(lsets[k], samples))
			}
		}
	}
	slices.SortFunc(out, func(a, b storage.Series) int { return labels.Compare(a.Labels(), b.Labels()) })
	return &refSet{list: out, i: -1}
}

func matchAll(ms []*labels.Matcher, lset labels.Labels) bool {
	for _, m := range ms {
		if !m.Matches(lset.Get(m.Name)) {
			return false
		}
	}
	return true
}

func (*refQuerier) LabelValues(context.Context, string, *storage.LabelHints, ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	return nil, nil, nil
}

func (*refQuerier) LabelNames(context.Context, *storage.LabelHints, ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	return nil, nil, nil
}

func (*refQuerier) Close() error { return nil }

type refSet struct {
	list []storage.Series
	i    int
}

func (s *refSet) Next() bool                      { s.i++; return s.i < len(s.list) }
func (s *refSet) At() storage.Series              { return s.list[s.i] }
func (*refSet) Err() error                        { return nil }
func (*refSet) Warnings() annotations.Annotations { return nil }

// refSample is one float sample of a model series.
type refSample struct {
	t int64
	f float64
}

func (s refSample) T() int64                    { return s.t }
func (refSample) ST() int64                     { return 0 }
func (s refSample) F() float64                  { return s.f }
func (refSample) H() *histogram.Histogram       { return nil }
func (refSample) FH() *histogram.FloatHistogram { return nil }
func (refSample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s refSample) Copy() chunks.Sample         { return s }

// TestReference pushes a randomized workload into a running node (two
// families, hierarchy values repeating across parents, every event late) and
// requires every query of the catalogue, as instant and range queries, to
// answer over HTTP what the Prometheus engine answers over the model.
func TestReference(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.Schema.Families = []schema.FamilyFile{
		{Name: "requests", Dimensions: []string{"datacenter/cluster/host", "transaction", "status"}},
		{Name: "errors", Dimensions: []string{"datacenter/cluster/host", "transaction"}},
	}
	n, err := Start(cfg, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	s, err := cfg.BuildSchema()
	if err != nil {
		t.Fatal(err)
	}

	now := time.Now()
	model := &refModel{schema: s, now: now.UnixMilli()}
	rng := rand.New(rand.NewPCG(3, 5))
	for range 4000 {
		dc, cl, host := "dc"+strconv.Itoa(rng.IntN(2)), "c"+strconv.Itoa(rng.IntN(3)), "h"+strconv.Itoa(rng.IntN(3))
		txn := []string{"checkout", "search", "login"}[rng.IntN(3)]
		e := refEvent{
			family: "requests",
			labels: map[string]string{"datacenter": dc, "cluster": cl, "host": host, "transaction": txn, "status": []string{"200", "200", "200", "500"}[rng.IntN(4)]},
			t:      now.Add(-50*time.Minute).UnixMilli() + rng.Int64N(48*time.Minute.Milliseconds()),
			v:      float64(1 + rng.IntN(3)),
		}
		if rng.IntN(5) == 0 {
			e.family = "errors"
			delete(e.labels, "status")
		}
		model.events = append(model.events, e)
	}
	push(t, n.GRPCAddr(), model.events)

	// Wait until every event is stored: both families' totals match.
	for _, fam := range []string{"requests", "errors"} {
		var want float64
		for _, e := range model.events {
			if e.family == fam {
				want += e.v
			}
		}
		q := fmt.Sprintf("sum(sum_over_time(%s_delta[2h]))", fam)
		deadline := time.Now().Add(30 * time.Second)
		for vector(t, n.HTTPAddr(), q, time.Now(), "")[""] != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s never reached %v", q, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	engine := promql.NewEngine(promql.EngineOpts{
		MaxSamples: 1e8, Timeout: time.Minute, LookbackDelta: 5 * time.Minute,
		EnableAtModifier: true, EnableNegativeOffset: true,
		NoStepSubqueryIntervalFn: func(int64) int64 { return time.Minute.Milliseconds() },
	})
	at := strconv.FormatInt(now.Add(-20*time.Minute).Unix(), 10)
	catalogue := []string{
		// Selectors and the counter functions.
		`requests_total{datacenter="dc0", cluster="c1", host="h2"}`,
		`requests_delta{status="500"}`,
		`rate(requests_total[5m])`,
		`irate(requests_total[2m])`,
		`increase(requests_total{transaction=~"s.*"}[10m])`,
		`delta(requests_total[5m])`,
		`idelta(requests_total[5m])`,
		`resets(requests_total[10m])`,
		`changes(requests_delta[10m])`,
		`deriv(requests_total[10m])`,
		`predict_linear(requests_total[10m], 600)`,
		`timestamp(requests_delta)`,
		// Over time, on the exact counts.
		`sum_over_time(requests_delta[10m])`,
		`avg_over_time(requests_delta[10m])`,
		`min_over_time(requests_delta[10m])`,
		`max_over_time(requests_delta[10m])`,
		`count_over_time(requests_delta[10m])`,
		`last_over_time(requests_delta[10m])`,
		`present_over_time(errors_delta[3m])`,
		`quantile_over_time(0.9, requests_delta[10m])`,
		`stddev_over_time(requests_delta[10m])`,
		`absent_over_time(requests_delta{datacenter="dc9"}[5m])`,
		`absent(requests_total{datacenter="dc9"})`,
		// Aggregations, planned and not.
		`sum(rate(requests_total[5m]))`,
		`sum by (datacenter) (rate(requests_total[5m]))`,
		`sum by (cluster) (increase(requests_total[15m]))`,
		`sum without (host) (rate(requests_total{status="500"}[5m]))`,
		`sum by (datacenter, transaction) (sum_over_time(requests_delta[30m]))`,
		`avg by (datacenter) (rate(requests_total[5m]))`,
		`max by (cluster) (rate(requests_total[5m]))`,
		`min(rate(requests_total[5m]))`,
		`count by (status) (requests_delta)`,
		`stddev(rate(requests_total[5m]))`,
		`stdvar by (datacenter) (rate(requests_total[5m]))`,
		`quantile by (datacenter) (0.5, rate(requests_total[5m]))`,
		`topk(3, rate(requests_total[5m]))`,
		`bottomk(2, sum_over_time(errors_delta[10m]))`,
		`count_values("count", requests_delta)`,
		`group by (datacenter) (requests_delta)`,
		`sort_desc(sum by (host) (rate(requests_total[5m])))`,
		// Binary operations, within and between families.
		`sum by (datacenter) (rate(errors_total[5m])) / sum by (datacenter) (rate(requests_total[5m]))`,
		`sum by (datacenter, cluster, host, transaction) (rate(requests_total[5m])) - on (datacenter, cluster, host, transaction) rate(errors_total[5m])`,
		`rate(requests_total[5m]) > bool 0.01`,
		`requests_delta > 2`,
		`errors_delta and on (host) requests_delta{status="500"}`,
		`requests_delta{status="500"} or errors_delta`,
		`requests_delta unless on (datacenter, cluster, host, transaction) errors_delta`,
		`60 * sum by (datacenter) (rate(requests_total[5m])) + 1`,
		`-sum(rate(requests_total[5m])) ^ 2`,
		`label_replace(sum by (cluster) (rate(requests_total[5m])), "c", "$1", "cluster", "c(.*)")`,
		`label_join(errors_delta, "where", "/", "datacenter", "cluster")`,
		`clamp_max(rate(requests_total[5m]), 0.02)`,
		`round(sum by (datacenter) (increase(requests_total[10m])))`,
		// Offsets, @ and subqueries.
		`sum by (datacenter) (rate(requests_total[5m] offset 10m))`,
		`rate(errors_total[5m] offset -2m)`,
		`sum by (datacenter) (rate(requests_total[5m] @ ` + at + `))`,
		`sum(increase(requests_total[5m] @ end()))`,
		`max_over_time(sum by (datacenter) (rate(requests_total[2m]))[10m:1m])`,
		`sum by (datacenter) (sum_over_time(rate(requests_total[1m])[15m:30s]))`,
		`rate(requests_total{host="h0"}[10m:])`,
	}
	type window struct {
		start, end time.Time
		step       time.Duration
	}
	windows := []window{
		{now.Add(-25 * time.Minute), now.Add(-25 * time.Minute), 0},
		{now.Add(-3*time.Minute - 1234*time.Millisecond), now.Add(-3*time.Minute - 1234*time.Millisecond), 0},
		{now.Add(-40 * time.Minute), now.Add(-5 * time.Minute), 15 * time.Second},
		{now.Add(-50 * time.Minute), now.Add(-time.Minute), time.Minute},
		{now.Add(-12 * time.Minute), now.Add(-6 * time.Minute), 2 * time.Second},
	}
	nonEmpty := 0
	for _, qs := range catalogue {
		for _, w := range windows {
			got := httpAnswer(t, n.HTTPAddr(), qs, w.start, w.end, w.step)
			want := modelAnswer(t, engine, model, qs, w.start, w.end, w.step)
			if len(want) > 0 {
				nonEmpty++
			}
			if diff := diffAnswers(got, want); diff != "" {
				t.Errorf("%s over [%s, %s] step %s: %s", qs, w.start.Format(time.TimeOnly), w.end.Format(time.TimeOnly), w.step, diff)
			}
		}
	}
	if nonEmpty < len(catalogue)*len(windows)*3/4 {
		t.Errorf("only %d of %d answers hold data; the workload does not exercise the catalogue", nonEmpty, len(catalogue)*len(windows))
	}
}

// push sends events to the node in shuffled batches of 500 and requires
// every one accepted.
func push(t *testing.T, addr string, events []refEvent) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := wirepb.NewIngestClient(conn)
	order := rand.New(rand.NewPCG(1, 1)).Perm(len(events))
	for len(order) > 0 {
		var b wire.Batch
		for _, i := range order[:min(500, len(order))] {
			e := events[i]
			var kv []string
			for _, k := range slices.Sorted(maps.Keys(e.labels)) {
				kv = append(kv, k, e.labels[k])
			}
			b.Add(e.family, e.t, e.v, kv...)
		}
		resp, err := client.Push(context.Background(), b.Request())
		if err != nil || int(resp.Accepted) != b.Len() {
			t.Fatalf("push: %v, accepted %d of %d: %v", err, resp.GetAccepted(), b.Len(), resp.GetRejects())
		}
		order = order[min(500, len(order)):]
	}
}

// answer is a query result: points by series, the series keyed by their
// sorted labels.
type answer map[string][]refPoint

type refPoint struct {
	t int64
	v float64
}

// httpAnswer asks the node.
func httpAnswer(t *testing.T, addr, qs string, start, end time.Time, step time.Duration) answer {
	t.Helper()
	path, params := "/api/v1/query", url.Values{"query": {qs}, "time": {unixString(start)}}
	if step > 0 {
		path, params = "/api/v1/query_range", url.Values{"query": {qs}, "start": {unixString(start)}, "end": {unixString(end)}, "step": {step.String()}}
	}
	code, r := get(t, addr, path, params)
	if code != http.StatusOK {
		t.Fatalf("%s: HTTP %d %s: %s", qs, code, r.ErrorType, r.Error)
	}
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	mustDecode(t, r.Data, &data)
	var series []struct {
		Metric map[string]string `json:"metric"`
		Value  []any             `json:"value"`
		Values [][]any           `json:"values"`
	}
	switch data.ResultType {
	case "scalar":
		var v []any
		mustDecode(t, data.Result, &v)
		series = append(series, struct {
			Metric map[string]string `json:"metric"`
			Value  []any             `json:"value"`
			Values [][]any           `json:"values"`
		}{Value: v})
	default:
		mustDecode(t, data.Result, &series)
	}
	out := answer{}
	for _, s := range series {
		k := labels.FromMap(s.Metric).String()
		if s.Value != nil {
			s.Values = [][]any{s.Value}
		}
		for _, p := range s.Values {
			v, err := strconv.ParseFloat(p[1].(string), 64)
			if err != nil {
				t.Fatal(err)
			}
			out[k] = append(out[k], refPoint{int64(math.Round(p[0].(float64) * 1000)), v})
		}
	}
	return out
}

func unixString(t time.Time) string {
	return strconv.FormatFloat(float64(t.UnixMilli())/1000, 'f', 3, 64)
}

// modelAnswer asks the Prometheus engine over the model.
func modelAnswer(t *testing.T, engine *promql.Engine, m *refModel, qs string, start, end time.Time, step time.Duration) answer {
	t.Helper()
	start, end = start.Truncate(time.Millisecond), end.Truncate(time.Millisecond)
	var q promql.Query
	var err error
	if step == 0 {
		q, err = engine.NewInstantQuery(context.Background(), m, nil, qs, start)
	} else {
		q, err = engine.NewRangeQuery(context.Background(), m, nil, qs, start, end, step)
	}
	if err != nil {
		t.Fatalf("%s: %v", qs, err)
	}
	defer q.Close()
	res := q.Exec(context.Background())
	if res.Err != nil {
		t.Fatalf("%s over the model: %v", qs, res.Err)
	}
	out := answer{}
	switch v := res.Value.(type) {
	case promql.Scalar:
		out["{}"] = []refPoint{{v.T, v.V}}
	case promql.Vector:
		for _, s := range v {
			out[s.Metric.String()] = []refPoint{{s.T, s.F}}
		}
	case promql.Matrix:
		for _, s := range v {
			for _, p := range s.Floats {
				out[s.Metric.String()] = append(out[s.Metric.String()], refPoint{p.T, p.F})
			}
		}
	}
	return out
}

// diffAnswers describes the first difference, allowing only for float
// addition order (the node may sum rolled-up cells).
func diffAnswers(got, want answer) string {
	for _, k := range slices.Sorted(maps.Keys(want)) {
		g, w := got[k], want[k]
		if len(g) != len(w) {
			return fmt.Sprintf("series %s: %d points, want %d (got series %v)", k, len(g), len(w), slices.Sorted(maps.Keys(got)))
		}
		for i := range w {
			same := g[i].v == w[i].v || (math.IsNaN(g[i].v) && math.IsNaN(w[i].v)) ||
				math.Abs(g[i].v-w[i].v) <= 1e-9*math.Max(1, math.Abs(w[i].v))
			if g[i].t != w[i].t || !same {
				return fmt.Sprintf("series %s point %d: got %v@%d, want %v@%d", k, i, g[i].v, g[i].t, w[i].v, w[i].t)
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

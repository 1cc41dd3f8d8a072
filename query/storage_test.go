package query

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

// testSchema has one family, x, over a single host dimension, at 10s and 1m.
func testSchema(t *testing.T) *schema.Schema {
	t.Helper()
	s, err := schema.Parse([]byte(`
resolutions: ["10s:8d", "1m:35d"]
families:
  - name: x
    dimensions: [host]
`))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func openStore(t testing.TB, s *schema.Schema) *tsdb.DB {
	t.Helper()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// apiMux returns the API built from opts with its routes registered.
func apiMux(t testing.TB, opts Options) *http.ServeMux {
	t.Helper()
	a, err := NewAPI(opts)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	a.Register(mux)
	return mux
}

// put writes one finest-cuboid delta per (host, time, value).
func put(t *testing.T, db *tsdb.DB, s *schema.Schema, host string, ts int64, v float64) {
	t.Helper()
	f := s.Family("x")
	if _, err := db.Apply(tsdb.BatchID{}, []tsdb.Delta{{Family: "x", Cuboid: f.Finest().ID, Values: []string{host}, Time: ts, Sum: v, Count: 1}}); err != nil {
		t.Fatal(err)
	}
}

// putAll writes one delta of family x into every cuboid, as the aggregator
// does, so that planned queries and label questions have their rolled-up
// cells.
func putAll(t *testing.T, db *tsdb.DB, s *schema.Schema, host string, ts int64, v float64) {
	t.Helper()
	var deltas []tsdb.Delta
	for _, c := range s.Family("x").Cuboids() {
		deltas = append(deltas, tsdb.Delta{Family: "x", Cuboid: c.ID, Values: []string{host}[:len(c.Labels)], Time: ts, Sum: v, Count: 1})
	}
	if _, err := db.Apply(tsdb.BatchID{}, deltas); err != nil {
		t.Fatal(err)
	}
}

type sample struct {
	t int64
	v float64
}

func selectAll(t *testing.T, q storage.Querier, hints *storage.SelectHints, ms ...*labels.Matcher) map[string][]sample {
	t.Helper()
	set := q.Select(context.Background(), true, hints, ms...)
	out := map[string][]sample{}
	var it chunkenc.Iterator
	for set.Next() {
		s := set.At()
		it = s.Iterator(it)
		var got []sample
		for it.Next() == chunkenc.ValFloat {
			ts, v := it.At()
			got = append(got, sample{ts, v})
		}
		out[s.Labels().String()] = got
	}
	if err := set.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestSynthesis pins the shape of both views: a sample at every step end of
// the selection plus one at its end for the open step, zeros where nothing
// was counted, a running total from twice the selection's total, and no
// series for a cell without data in the selection.
func TestSynthesis(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	base := time.Now().Truncate(time.Hour).Add(-3 * time.Hour).UnixMilli()
	put(t, db, s, "a", base+1_000, 3)   // step [base, base+10s)
	put(t, db, s, "a", base+25_000, 4)  // step [base+20s, base+30s)
	put(t, db, s, "a", base+31_000, 5)  // step [base+30s, base+40s), open at maxt
	put(t, db, s, "b", base-600_000, 1) // outside the selection
	now := func() time.Time { return time.UnixMilli(base + 3_600_000) }
	// From base+1, as the engine asks for a range ending at base+35s.
	q, _ := NewQueryable(s, db, Limits{MaxSamples: 1e7}, now).Querier(base+1, base+35_000)

	got := selectAll(t, q, nil, labels.MustNewMatcher(labels.MatchEqual, labels.MetricName, "x_delta"))
	want := []sample{{base + 10_000, 3}, {base + 20_000, 0}, {base + 30_000, 4}, {base + 35_000, 5}}
	if fmt.Sprint(got) != fmt.Sprint(map[string][]sample{`{__name__="x_delta", host="a"}`: want}) {
		t.Errorf("delta view:\n got %v\nwant %v", got, want)
	}
	got = selectAll(t, q, nil, labels.MustNewMatcher(labels.MatchEqual, labels.MetricName, "x_total"))
	want = []sample{{base + 10_000, 27}, {base + 20_000, 27}, {base + 30_000, 31}, {base + 35_000, 36}}
	if fmt.Sprint(got) != fmt.Sprint(map[string][]sample{`{__name__="x_total", host="a"}`: want}) {
		t.Errorf("total view:\n got %v\nwant %v", got, want)
	}
	// A selection ending on a step end has no open step; one starting on
	// a step end holds that end's sample, the step before it.
	q, _ = NewQueryable(s, db, Limits{MaxSamples: 1e7}, now).Querier(base, base+30_000)
	got = selectAll(t, q, nil, labels.MustNewMatcher(labels.MatchEqual, labels.MetricName, "x_delta"))
	if want := []sample{{base, 0}, {base + 10_000, 3}, {base + 20_000, 0}, {base + 30_000, 4}}; fmt.Sprint(got[`{__name__="x_delta", host="a"}`]) != fmt.Sprint(want) {
		t.Errorf("aligned selection: got %v, want %v", got, want)
	}
	// Both views by a regex on the name, and a matcher on the host.
	got = selectAll(t, q, nil, labels.MustNewMatcher(labels.MatchRegexp, labels.MetricName, "x_.*"), labels.MustNewMatcher(labels.MatchNotEqual, "host", "b"))
	if len(got) != 2 {
		t.Errorf("x_.* selected %d series, want 2: %v", len(got), got)
	}
}

func TestResolution(t *testing.T) {
	rs := testSchema(t).Resolutions // 10s:8d, 1m:35d
	const now = int64(100 * 24 * 3600 * 1000)
	for _, tc := range []struct {
		name                    string
		step, rng, start, wantI int64
	}{
		{"instant, no range: finest", 0, 0, now, 0},
		{"range 1m: half is 30s", 0, 60_000, now, 0},
		{"range 2m: 1m steps", 0, 120_000, now, 1},
		{"query step 30s", 30_000, 600_000, now, 0},
		{"query step 5m", 300_000, 600_000, now, 1},
		{"start beyond finest retention", 0, 0, now - 9*24*3600*1000, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Resolution(rs, tc.step, tc.rng, tc.start, now); int64(got) != tc.wantI {
				t.Errorf("got resolution %d, want %d", got, tc.wantI)
			}
		})
	}
}

// TestLinearity checks the property the planner will rely on: for random
// deltas of two cells and of a third cell holding their sum, rate, increase,
// irate, delta and sum_over_time of the sum equal the sum of the cells'
// results, at many evaluation times and window lengths, aligned or not.
func TestLinearity(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	// Ten seconds past a minute, so no window of the test is aligned to
	// the store's rows by accident.
	base := time.Now().Truncate(time.Hour).Add(-3*time.Hour + 10*time.Second).UnixMilli()
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 360 { // one hour of 10s steps
		ts := base + int64(i)*10_000 + rng.Int64N(10_000)
		a, b := float64(rng.IntN(5)), float64(rng.IntN(50))
		if rng.IntN(4) == 0 {
			a = 0 // gaps in one child only
		}
		put(t, db, s, "a", ts, a)
		put(t, db, s, "b", ts, b)
		put(t, db, s, "ab", ts, a+b)
	}
	now := func() time.Time { return time.UnixMilli(base + 2*3600_000) }
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 1e7, Timeout: time.Minute, LookbackDelta: 5 * time.Minute})
	qa := NewQueryable(s, db, Limits{MaxSamples: 1e7}, now)
	for _, fn := range []string{"rate(x_total[%s])", "increase(x_total[%s])", "irate(x_total[%s])", "delta(x_total[%s])", "sum_over_time(x_delta[%s])", "rate(x_total[%s] offset 1m)"} {
		for _, w := range []string{"15s", "20s", "1m", "95s", "5m", "17m"} {
			expr := fmt.Sprintf(fn, w)
			for _, off := range []int64{600_000, 1_234_567, 1_800_000, 3_599_999, 3_600_000, 3_610_001} {
				ts := time.UnixMilli(base + off)
				vals := map[string]float64{}
				for _, h := range []string{"a", "b", "ab"} {
					q, err := engine.NewInstantQuery(context.Background(), qa, nil, fmt.Sprintf(`sum(%s)`, replaceSelector(expr, h)), ts)
					if err != nil {
						t.Fatal(err)
					}
					res := q.Exec(context.Background())
					if res.Err != nil {
						t.Fatal(res.Err)
					}
					vec, _ := res.Vector()
					if len(vec) != 1 {
						t.Fatalf("%s at +%dms: %d samples for host %s, want 1", expr, off, len(vec), h)
					}
					vals[h] = vec[0].F
					q.Close()
				}
				sum := vals["a"] + vals["b"]
				if !nearlyEqual(vals["ab"], sum) {
					t.Errorf("%s at +%dms: f(a+b) = %v, f(a)+f(b) = %v + %v = %v", expr, off, vals["ab"], vals["a"], vals["b"], sum)
				}
			}
		}
	}
}

// replaceSelector points a query's x_total/x_delta selector at one host.
func replaceSelector(expr, host string) string {
	out := ""
	for i := 0; i < len(expr); i++ {
		out += string(expr[i])
		if i >= 6 && (expr[i-6:i+1] == "x_total" || expr[i-6:i+1] == "x_delta") {
			out += fmt.Sprintf(`{host=%q}`, host)
		}
	}
	return out
}

// TestLabelsInRange checks that labels and label values over a range name
// only the series with a sample in it, as the series API finds them, though
// the store's rows span an hour of the finest steps: eight hosts counted
// early in an hour, five of them again late in it, and a range over the
// late part lists the five.
func TestLabelsInRange(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	row := time.Now().Truncate(time.Hour).Add(-2 * time.Hour)
	hosts := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	for i, h := range hosts {
		putAll(t, db, s, h, row.Add(5*time.Minute).UnixMilli(), 1)
		if i < 5 {
			putAll(t, db, s, h, row.Add(50*time.Minute).UnixMilli(), 1)
		}
	}
	mux := apiMux(t, Options{Schema: s, Reader: db})
	values := func(path string, p url.Values) []string {
		t.Helper()
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path+"?"+p.Encode(), nil))
		var r struct{ Data []string }
		if err := json.NewDecoder(rec.Body).Decode(&r); err != nil || rec.Code != http.StatusOK {
			t.Fatalf("%s: HTTP %d, %v", path, rec.Code, err)
		}
		return r.Data
	}
	unix := func(d time.Duration) string { return strconv.FormatInt(row.Add(d).Unix(), 10) }
	late := url.Values{"start": {unix(40 * time.Minute)}, "end": {unix(55 * time.Minute)}}
	if got := values("/api/v1/label/host/values", late); fmt.Sprint(got) != "[a b c d e]" {
		t.Errorf("hosts with data late in the hour: %v, want [a b c d e]", got)
	}
	all := url.Values{"start": {unix(0)}, "end": {unix(time.Hour)}}
	if got := values("/api/v1/label/host/values", all); len(got) != len(hosts) {
		t.Errorf("hosts over the hour: %v, want all %d", got, len(hosts))
	}
	withMatch := url.Values{"start": late["start"], "end": late["end"], "match[]": {`x_delta{host=~"[e-h]"}`}}
	if got := values("/api/v1/label/host/values", withMatch); fmt.Sprint(got) != "[e]" {
		t.Errorf("hosts e to h late in the hour: %v, want [e]", got)
	}
	if got := values("/api/v1/label/__name__/values", late); fmt.Sprint(got) != "[x_delta x_total]" {
		t.Errorf("names late in the hour: %v", got)
	}
	after := url.Values{"start": {unix(56 * time.Minute)}, "end": {unix(59 * time.Minute)}}
	for _, path := range []string{"/api/v1/label/host/values", "/api/v1/label/__name__/values", "/api/v1/labels"} {
		if got := values(path, after); got == nil || len(got) != 0 {
			t.Errorf("%s after the last sample: %v, want []", path, got)
		}
	}
	if got := values("/api/v1/labels", withMatch); fmt.Sprint(got) != "[__name__ host]" {
		t.Errorf("labels late in the hour: %v", got)
	}
	// The series API agrees.
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/series?"+url.Values{"start": late["start"], "end": late["end"], "match[]": {"x_delta"}}.Encode(), nil))
	if n := strings.Count(rec.Body.String(), `"host"`); n != 5 {
		t.Errorf("series late in the hour: %d, want 5: %s", n, rec.Body)
	}
}

// TestZeroLimitsBoundNothing checks that Limits{} reads as no limit, as
// MaxSeries 0 always did, rather than refusing every query with samples.
func TestZeroLimitsBoundNothing(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	now := time.Now()
	put(t, db, s, "a", now.Add(-time.Minute).UnixMilli(), 3)
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 1e6, Timeout: time.Minute, LookbackDelta: 5 * time.Minute})
	q, err := engine.NewInstantQuery(context.Background(), NewQueryable(s, db, Limits{}, nil), nil, "sum(sum_over_time(x_delta[1h]))", now)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	res := q.Exec(context.Background())
	if vec, err := res.Vector(); err != nil || len(vec) != 1 || vec[0].F != 3 {
		t.Errorf("with Limits{}: %v, %v; want 3", res.Value, err)
	}
}

// TestLabelsStopWithTheRequest checks that a label question over a range
// reads the store under the request's context: once it is canceled, the
// read stops with its error rather than finishing for no one.
func TestLabelsStopWithTheRequest(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	now := time.Now()
	for _, h := range []string{"a", "b", "c"} {
		putAll(t, db, s, h, now.Add(-time.Minute).UnixMilli(), 1)
	}
	q, err := NewQueryable(s, db, Limits{}, nil).Querier(now.Add(-time.Hour).UnixMilli(), now.UnixMilli())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if vals, _, err := q.LabelValues(ctx, "host", nil); !errors.Is(err, context.Canceled) {
		t.Errorf("label values under a canceled request: %v, %v; want context.Canceled", vals, err)
	}
	if names, _, err := q.LabelNames(ctx, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("label names under a canceled request: %v, %v; want context.Canceled", names, err)
	}
	if vals, _, err := q.LabelValues(context.Background(), "host", nil); err != nil || len(vals) != 3 {
		t.Errorf("label values: %v, %v", vals, err)
	}
}

package query

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dimsum/dimsum/schema"
)

// sliceFixture is a randomized cube in a real store, the raw events it was
// written from, and the API over it.
type sliceFixture struct {
	events []cubeEvent
	now    time.Time
	mux    *http.ServeMux
}

func newSliceFixture(t testing.TB, maxGroups int) *sliceFixture {
	t.Helper()
	s := schema.Default()
	db := openStore(t, s)
	rng := rand.New(rand.NewPCG(3, 5))
	now := time.Now().Truncate(time.Hour).Add(17*time.Minute + 23*time.Second)
	from, to := now.Add(-50*time.Hour).UnixMilli(), now.UnixMilli()
	events := randomEvents(rng, 5000, from, to)
	writeCube(t, db, s, rng, events)
	// Late events: written after the rest, into steps already stored.
	late := randomEvents(rng, 1000, from, to-time.Hour.Milliseconds())
	writeCube(t, db, s, rng, late)
	mux := apiMux(t, Options{Schema: s, Reader: db, MaxGroups: maxGroups, Now: func() time.Time { return now }})
	return &sliceFixture{events: append(events, late...), now: now, mux: mux}
}

// call sends one request and decodes the envelope.
func (f *sliceFixture) call(t testing.TB, path string, p url.Values) (int, apiEnvelope) {
	t.Helper()
	rec := httptest.NewRecorder()
	f.mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path+"?"+p.Encode(), nil))
	var env apiEnvelope
	if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil {
		t.Fatalf("%s?%s: cannot decode %q: %v", path, p.Encode(), rec.Body, err)
	}
	return rec.Code, env
}

type apiEnvelope struct {
	Status    string          `json:"status"`
	Data      json.RawMessage `json:"data"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
}

func (f *sliceFixture) slice(t testing.TB, path string, p url.Values) Slice {
	t.Helper()
	code, env := f.call(t, path, p)
	if code != http.StatusOK {
		t.Fatalf("%s?%s: HTTP %d %s: %s", path, p.Encode(), code, env.ErrorType, env.Error)
	}
	var sl Slice
	if err := json.Unmarshal(env.Data, &sl); err != nil {
		t.Fatal(err)
	}
	return sl
}

// Label positions in cubeEvent.values.
var eventLabels = []string{"datacenter", "cluster", "host", "transaction", "status"}

// refGroup is one group of the reference answer.
type refGroup struct {
	values []string
	sum    []float64
	count  []float64
}

func (g *refGroup) total() (sum, count float64) {
	for i := range g.sum {
		sum += g.sum[i]
		count += g.count[i]
	}
	return sum, count
}

// TestSliceExact compares every slice shape with the answer computed from
// the raw events, at every resolution.
func TestSliceExact(t *testing.T) {
	f := newSliceFixture(t, 0)
	wheres := []struct {
		where string
		keep  func(v []string) bool
	}{
		{"", func([]string) bool { return true }},
		{"datacenter=dc1", func(v []string) bool { return v[0] == "dc1" }},
		{"status=~5..", func(v []string) bool { return v[4] == "500" }},
		{"cluster!=c2,transaction=checkout|search", func(v []string) bool {
			return v[1] != "c2" && (v[3] == "checkout" || v[3] == "search")
		}},
		{"host!~h[12],status=~(2|4).{2}", func(v []string) bool { return v[2] != "h1" && v[2] != "h2" && v[4] != "500" }},
	}
	bys := []struct{ by, want string }{
		{"", ""},
		{"datacenter", "datacenter"},
		{"cluster", "datacenter,cluster"},
		{"host,status", "datacenter,cluster,host,status"},
		{"transaction", "transaction"},
	}
	windows := []struct {
		name       string
		start, end time.Time
		step, res  time.Duration // res forces the resolution of a total
		wantRes    string
	}{
		{"total-10s", f.now.Add(-37 * time.Minute), f.now.Add(-3 * time.Minute), 0, 10 * time.Second, "10s"},
		{"total-auto-10s", f.now.Add(-6 * time.Hour), f.now, 0, 0, "10s"},
		{"total-auto-1m", f.now.Truncate(time.Minute).Add(-6 * time.Hour), f.now.Truncate(time.Minute), 0, 0, "1m"},
		{"total-1h", f.now.Add(-49 * time.Hour), f.now, 0, time.Hour, "1h"},
		{"series-10s", f.now.Add(-20 * time.Minute), f.now, 10 * time.Second, 0, "10s"},
		{"series-5m", f.now.Add(-3 * time.Hour), f.now, 5 * time.Minute, 0, "1m"},
		{"series-2h", f.now.Add(-40 * time.Hour), f.now.Add(-time.Hour), 2 * time.Hour, 0, "1h"},
	}
	pages := []struct {
		order         string
		limit, offset int
	}{
		{"", 0, 0},
		{"-sum", 3, 0},
		{"count:asc", 2, 1},
		{"sum:desc", 0, 2},
		{"rate", 1, 0},
	}
	n := 0
	for _, w := range wheres {
		for _, b := range bys {
			for _, win := range windows {
				pg := pages[n%len(pages)]
				n++
				p := url.Values{
					"family": {"requests"}, "where": {w.where}, "by": {b.by},
					"start": {strconv.FormatInt(win.start.Unix(), 10)}, "end": {strconv.FormatInt(win.end.Unix(), 10)},
					"measures": {"sum,count,rate,share"}, "order": {pg.order},
					"limit": {strconv.Itoa(pg.limit)}, "offset": {strconv.Itoa(pg.offset)},
				}
				if win.step > 0 {
					p.Set("step", win.step.String())
				}
				if win.res > 0 {
					p.Set("resolution", win.res.String())
				}
				name := fmt.Sprintf("where=%s/by=%s/%s/order=%s,%d,%d", w.where, b.by, win.name, pg.order, pg.limit, pg.offset)
				sl := f.slice(t, "/api/v1/cube/slice", p)
				if sl.Resolution != win.wantRes {
					t.Errorf("%s: resolution %s, want %s", name, sl.Resolution, win.wantRes)
				}
				checkSlice(t, name, f.events, sl, w.keep, list(b.want), win.start, win.end, win.step, win.wantRes, pg.order, pg.limit, pg.offset)
			}
		}
	}
}

// checkSlice recomputes a slice from the raw events and compares.
func checkSlice(t *testing.T, name string, events []cubeEvent, sl Slice, keep func([]string) bool, by []string, start, end time.Time, step time.Duration, res, order string, limit, offset int) {
	t.Helper()
	if strings.Join(sl.By, ",") != strings.Join(by, ",") {
		t.Errorf("%s: by %v, want %v", name, sl.By, by)
		return
	}
	resStep, _ := time.ParseDuration(res)
	grid := schema.Resolution{Step: cmp.Or(step, resStep)}
	unit := grid.Step.Milliseconds()
	a := grid.StepStart(start.UnixMilli())
	b := -grid.StepStart(-end.UnixMilli())
	if sl.Range.Start != seconds(a) || sl.Range.End != seconds(b) {
		t.Errorf("%s: range [%v, %v), want [%v, %v)", name, sl.Range.Start, sl.Range.End, seconds(a), seconds(b))
		return
	}
	width := b - a
	if step > 0 {
		width = unit
	}
	points := int((b - a) / width)
	groups := map[string]*refGroup{}
	all := &refGroup{sum: make([]float64, points), count: make([]float64, points)}
	for _, e := range events {
		if e.t < a || e.t >= b || !keep(e.values) {
			continue
		}
		var vals []string
		for _, l := range by {
			vals = append(vals, e.values[slices.Index(eventLabels, l)])
		}
		k := strings.Join(vals, "\xff")
		g := groups[k]
		if g == nil {
			g = &refGroup{values: vals, sum: make([]float64, points), count: make([]float64, points)}
			groups[k] = g
		}
		i := (e.t - a) / width
		g.sum[i] += e.v
		g.count[i]++
		all.sum[i] += e.v
		all.count[i]++
	}
	var list []*refGroup
	for _, g := range groups {
		list = append(list, g)
	}
	measure, desc := "sum", true
	if order != "" {
		measure, desc, _ = parseOrder(order)
	}
	slices.SortFunc(list, func(x, y *refGroup) int {
		xs, xc := x.total()
		ys, yc := y.total()
		c := cmp.Compare(xs, ys)
		if measure == "count" {
			c = cmp.Compare(xc, yc)
		}
		if desc {
			c = -c
		}
		return cmp.Or(c, slices.Compare(x.values, y.values))
	})
	if sl.TotalGroups != len(list) {
		t.Errorf("%s: %d groups, want %d", name, sl.TotalGroups, len(list))
		return
	}
	if len(list) == 0 {
		t.Errorf("%s: no groups; the workload does not exercise it", name)
	}
	lo := min(offset, len(list))
	hi := len(list)
	if limit > 0 {
		hi = min(hi, lo+limit)
	}
	allSum, _ := all.total()
	check := func(what string, g Group, want *refGroup) {
		t.Helper()
		for i, l := range by {
			if g.Labels[l] != want.values[i] {
				t.Errorf("%s: %s labels %v, want %v", name, what, g.Labels, want.values)
				return
			}
		}
		sum, count := want.total()
		share := 0.0
		if allSum > 0 {
			share = sum / allSum
		}
		wantVals := map[string]float64{"sum": sum, "count": count, "rate": sum / (float64(b-a) / 1000), "share": share}
		for m, v := range wantVals {
			if g.Values[m] != v {
				t.Errorf("%s: %s %s = %v, want %v", name, what, m, g.Values[m], v)
			}
		}
		if step == 0 {
			if g.Series != nil {
				t.Errorf("%s: %s has a series without a step", name, what)
			}
			return
		}
		if len(g.Series) != points {
			t.Errorf("%s: %s has %d points, want %d", name, what, len(g.Series), points)
			return
		}
		for i, pt := range g.Series {
			share := 0.0
			if all.sum[i] > 0 {
				share = want.sum[i] / all.sum[i]
			}
			wantPt := map[string]float64{"sum": want.sum[i], "count": want.count[i], "rate": want.sum[i] / (float64(width) / 1000), "share": share}
			if pt.T != seconds(a+int64(i)*width) || fmt.Sprint(pt.Values) != fmt.Sprint(wantPt) {
				t.Errorf("%s: %s point %d = %v@%v, want %v@%v", name, what, i, pt.Values, pt.T, wantPt, seconds(a+int64(i)*width))
				return
			}
		}
	}
	if len(sl.Groups) != hi-lo {
		t.Errorf("%s: %d rows, want %d", name, len(sl.Groups), hi-lo)
		return
	}
	for i, g := range sl.Groups {
		check(fmt.Sprintf("row %d", i), g, list[lo+i])
	}
	if left := len(list) - (hi - lo); left > 0 {
		if sl.Rest == nil || sl.Rest.Groups != left {
			t.Errorf("%s: rest %+v, want %d groups", name, sl.Rest, left)
			return
		}
		rest := &refGroup{sum: make([]float64, points), count: make([]float64, points)}
		for _, g := range slices.Concat(list[:lo], list[hi:]) {
			for i := range g.sum {
				rest.sum[i] += g.sum[i]
				rest.count[i] += g.count[i]
			}
		}
		rest.values = make([]string, len(by))
		for i := range by {
			rest.values[i] = ""
		}
		sl.Rest.Labels = map[string]string{}
		check("rest", sl.Rest.Group, rest)
	} else if sl.Rest != nil {
		t.Errorf("%s: a rest row with nothing left out", name)
	}
	all.values = make([]string, len(by))
	sl.Total.Labels = map[string]string{}
	check("total", sl.Total, all)
}

// TestSliceCuboid pins the cuboid each slice reads: the smallest covering
// its group-by and filters.
func TestSliceCuboid(t *testing.T) {
	f := newSliceFixture(t, 0)
	for _, tc := range []struct{ where, by, want string }{
		{"", "", ""},
		{"", "datacenter", "datacenter"},
		{"status=~5..", "cluster", "datacenter,cluster,status"},
		{"", "host", "datacenter,cluster,host"},
		{"transaction=checkout", "", "transaction"},
	} {
		sl := f.slice(t, "/api/v1/cube/slice", url.Values{"family": {"requests"}, "where": {tc.where}, "by": {tc.by}, "since": {"2h"}})
		if got := strings.Join(sl.Cuboid, ","); got != tc.want {
			t.Errorf("where %q by %q: cuboid %q, want %q", tc.where, tc.by, got, tc.want)
		}
	}
}

// TestSliceDrillDownRollUp walks datacenter > cluster > host and back, and
// compares each step with the plain slice it stands for.
func TestSliceDrillDownRollUp(t *testing.T) {
	f := newSliceFixture(t, 0)
	base := url.Values{"family": {"requests"}, "since": {"6h"}, "by": {"status"}, "where": {"transaction=checkout"}}
	with := func(kv ...string) url.Values {
		p := url.Values{}
		for k, v := range base {
			p[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			p.Set(kv[i], kv[i+1])
		}
		return p
	}
	same := func(name string, got, want Slice) {
		t.Helper()
		g, _ := json.Marshal(got)
		w, _ := json.Marshal(want)
		if !bytes.Equal(g, w) {
			t.Errorf("%s:\n got %s\nwant %s", name, g, w)
		}
	}
	down := f.slice(t, "/api/v1/cube/drilldown", with("dimension", "datacenter/cluster/host", "value", "dc1"))
	same("drill into dc1", down, f.slice(t, "/api/v1/cube/slice", with("where", "transaction=checkout,datacenter=dc1", "by", "status,cluster")))
	down2 := f.slice(t, "/api/v1/cube/drilldown", with("where", "transaction=checkout,datacenter=dc1", "by", "status,cluster", "dimension", "datacenter/cluster/host", "value", "c2"))
	same("drill into c2", down2, f.slice(t, "/api/v1/cube/slice", with("where", "transaction=checkout,datacenter=dc1,cluster=c2", "by", "status,host")))
	byLevel := f.slice(t, "/api/v1/cube/drilldown", with("where", "transaction=checkout,datacenter=dc1", "dimension", "cluster", "value", "c2"))
	same("drill by level", byLevel, down2)
	up := f.slice(t, "/api/v1/cube/rollup", with("where", "transaction=checkout,datacenter=dc1,cluster=c2", "by", "status,host", "dimension", "datacenter/cluster/host"))
	same("roll up to clusters", up, down)
	up2 := f.slice(t, "/api/v1/cube/rollup", with("by", "status,cluster", "dimension", "datacenter/cluster/host"))
	same("roll up by group-by", up2, f.slice(t, "/api/v1/cube/slice", with("by", "status,datacenter")))
	top := f.slice(t, "/api/v1/cube/rollup", with("by", "datacenter,status", "dimension", "datacenter"))
	same("roll up the top level", top, f.slice(t, "/api/v1/cube/slice", with("by", "status")))
	flat := f.slice(t, "/api/v1/cube/rollup", with("dimension", "transaction"))
	same("roll up a flat filter", flat, f.slice(t, "/api/v1/cube/slice", with("where", "", "by", "status,transaction")))
}

// TestSliceErrors checks every refused request's status and message.
func TestSliceErrors(t *testing.T) {
	f := newSliceFixture(t, 5)
	for _, tc := range []struct {
		path   string
		params string
		code   int
		typ    string
		msg    string
	}{
		{"slice", "", 400, "bad_data", `missing parameter "family"`},
		{"slice", "family=nope", 400, "bad_data", `unknown family "nope" (the schema has requests)`},
		{"slice", "family=requests&where=rack=r1", 400, "bad_data", `filter "rack=r1": family "requests" has no label "rack"`},
		{"slice", "family=requests&where=status", 400, "bad_data", `filter "status": want label=value`},
		{"slice", "family=requests&where=status=~5(", 400, "bad_data", `filter "status=~5(": error parsing regexp`},
		{"slice", "family=requests&by=rack", 400, "bad_data", `cannot group by "rack": family "requests" has no label "rack"`},
		{"slice", "family=requests&by=host", 422, "execution", `more than 5 groups, the limit (max_groups)`},
		{"slice", "family=requests&start=abc", 400, "bad_data", `invalid parameter "start": cannot parse "abc"`},
		{"slice", "family=requests&start=200&end=100", 400, "bad_data", `end must be after start`},
		{"slice", "family=requests&end=100", 400, "bad_data", `parameter "end" needs "start"`},
		{"slice", "family=requests&since=1h&start=100", 400, "bad_data", `"since" excludes "start" and "end"`},
		{"slice", "family=requests&since=-1h", 400, "bad_data", `invalid parameter "since"`},
		{"slice", "family=requests&step=15s", 400, "bad_data", `step 15s is not a multiple of 10s`},
		{"slice", "family=requests&step=90s&since=6h", 400, "bad_data", `step 1m30s is not a multiple of 1m`},
		{"slice", "family=requests&step=5s", 400, "bad_data", `step 5s is not a multiple of 10s`},
		{"slice", "family=requests&step=1m&resolution=1h", 400, "bad_data", `step 1m is not a multiple of 1h`},
		{"slice", "family=requests&step=10s&since=40h", 400, "bad_data", `more than 11000`},
		{"slice", "family=requests&resolution=2m", 400, "bad_data", `"2m" is not the step of a resolution (10s, 1m, 1h)`},
		{"slice", "family=requests&measures=sum,avg", 400, "bad_data", `unknown measure "avg"`},
		{"slice", "family=requests&order=host", 400, "bad_data", `invalid parameter "order": "host"`},
		{"slice", "family=requests&order=sum:up", 400, "bad_data", `the direction must be asc or desc`},
		{"slice", "family=requests&limit=-1", 400, "bad_data", `invalid parameter "limit"`},
		{"slice", "family=requests&offset=x", 400, "bad_data", `invalid parameter "offset"`},
		{"slice", "family=requests&format=xml", 400, "bad_data", `want json or csv`},
		{"drilldown", "family=requests&value=dc1", 400, "bad_data", `missing parameter "dimension"`},
		{"drilldown", "family=requests&dimension=datacenter", 400, "bad_data", `missing parameter "value"`},
		{"drilldown", "family=requests&dimension=rack&value=x", 400, "bad_data", `has no dimension "rack"`},
		{"drilldown", "family=requests&dimension=host&value=h1", 400, "bad_data", `cannot drill down below host`},
		{"drilldown", "family=requests&dimension=status&value=500", 400, "bad_data", `cannot drill down below status`},
		{"rollup", "family=requests&dimension=datacenter/cluster/host", 400, "bad_data", `nothing to roll up`},
		{"rollup", "family=requests&dimension=datacenter&value=x", 400, "bad_data", `unexpected parameter "value"`},
	} {
		p, err := url.ParseQuery(tc.params)
		if err != nil {
			t.Fatal(err)
		}
		code, env := f.call(t, "/api/v1/cube/"+tc.path, p)
		if code != tc.code || env.Status != "error" || env.ErrorType != tc.typ || !strings.Contains(env.Error, tc.msg) {
			t.Errorf("%s?%s: HTTP %d %s %q, want %d %s containing %q", tc.path, tc.params, code, env.ErrorType, env.Error, tc.code, tc.typ, tc.msg)
		}
	}
	rec := httptest.NewRecorder()
	f.mux.ServeHTTP(rec, httptest.NewRequest(http.MethodDelete, "/api/v1/cube/slice?family=requests", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: HTTP %d, want 405", rec.Code)
	}
	rec = httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/api/v1/cube/slice", strings.NewReader(`{"family": true}`))
	req.Header.Set("Content-Type", "application/json")
	f.mux.ServeHTTP(rec, req)
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), `invalid field \"family\"`) {
		t.Errorf("bad JSON body: HTTP %d %s", rec.Code, rec.Body)
	}
}

// TestSlicePostAndCSV asks the same slice as a JSON body and as CSV.
func TestSlicePostAndCSV(t *testing.T) {
	f := newSliceFixture(t, 0)
	get := f.slice(t, "/api/v1/cube/slice", url.Values{"family": {"requests"}, "where": {"status=~5..,transaction=checkout|search"}, "by": {"cluster"}, "since": {"3h"}, "limit": {"2"}, "measures": {"sum,share"}})
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/api/v1/cube/slice", strings.NewReader(`{"family": "requests", "where": ["status=~5..", "transaction=checkout|search"], "by": "cluster", "since": "3h", "limit": 2, "measures": ["sum", "share"]}`))
	req.Header.Set("Content-Type", "application/json")
	f.mux.ServeHTTP(rec, req)
	var env apiEnvelope
	var post Slice
	if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil || json.Unmarshal(env.Data, &post) != nil {
		t.Fatalf("POST: HTTP %d %s", rec.Code, rec.Body)
	}
	g, _ := json.Marshal(get)
	p, _ := json.Marshal(post)
	if !bytes.Equal(g, p) {
		t.Errorf("POST answer differs:\n got %s\nwant %s", p, g)
	}

	rec = httptest.NewRecorder()
	f.mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/cube/slice?family=requests&by=datacenter&since=3h&limit=2&format=csv", nil))
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/csv") {
		t.Errorf("CSV content type %q", ct)
	}
	sl := f.slice(t, "/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"datacenter"}, "since": {"3h"}, "limit": {"2"}})
	want := fmt.Sprintf("datacenter,sum\n%s,%v\n%s,%v\n(rest),%v\n",
		sl.Groups[0].Labels["datacenter"], sl.Groups[0].Values["sum"], sl.Groups[1].Labels["datacenter"], sl.Groups[1].Values["sum"], sl.Rest.Values["sum"])
	if rec.Body.String() != want {
		t.Errorf("CSV:\n%s\nwant\n%s", rec.Body, want)
	}
	rec = httptest.NewRecorder()
	f.mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/cube/slice?family=requests&by=datacenter&since=30m&step=10m&format=csv", nil))
	if lines := strings.Split(strings.TrimSpace(rec.Body.String()), "\n"); lines[0] != "datacenter,t,sum" || len(lines) != 1+3*4 || !regexp.MustCompile(`^dc\d,\d+,\d+$`).MatchString(lines[1]) {
		t.Errorf("CSV series:\n%s", rec.Body)
	}
}

func TestCubeSchema(t *testing.T) {
	f := newSliceFixture(t, 0)
	code, env := f.call(t, "/api/v1/cube/schema", nil)
	var cs CubeSchema
	if code != 200 || json.Unmarshal(env.Data, &cs) != nil {
		t.Fatalf("HTTP %d %s", code, env.Error)
	}
	fam := cs.Families[0]
	if fam.Name != "requests" || fam.Kind != "counter" || len(fam.Cuboids) != 4*2*2 ||
		fmt.Sprint(fam.Dimensions[0]) != "{datacenter/cluster/host [datacenter cluster host]}" ||
		fmt.Sprint(fam.Cuboids[0]) != "[datacenter cluster host transaction status]" || len(fam.Cuboids[len(fam.Cuboids)-1]) != 0 {
		t.Errorf("family %+v", fam)
	}
	if fmt.Sprint(cs.Resolutions) != "[{10s 8d} {1m 35d} {1h 400d}]" {
		t.Errorf("resolutions %v", cs.Resolutions)
	}
}

// BenchmarkSlice answers two analysts' questions over 100,000 hosts: the
// ten hosts with the most errors over the last hour, and a week of hourly
// totals per datacenter.
func BenchmarkSlice(b *testing.B) {
	s := schema.Default()
	db := openStore(b, s)
	rng := rand.New(rand.NewPCG(1, 2))
	now := time.Now().Truncate(time.Hour)
	const hosts = 100_000
	host := func(i int) []string {
		return []string{"dc" + strconv.Itoa(i%3), "c" + strconv.Itoa(i%40), "h" + strconv.Itoa(i), "checkout", []string{"200", "500"}[rng.IntN(2)]}
	}
	var events []cubeEvent
	for i := range hosts {
		events = append(events, cubeEvent{t: now.Add(-time.Duration(rng.Int64N(int64(time.Hour)))).UnixMilli(), values: host(i), v: float64(1 + rng.IntN(9))})
	}
	week := now.Add(-7 * 24 * time.Hour).UnixMilli()
	for range 20_000 {
		events = append(events, cubeEvent{t: week + rng.Int64N(now.UnixMilli()-week), values: host(rng.IntN(hosts)), v: 1})
	}
	writeCube(b, db, s, rng, events)
	mux := apiMux(b, Options{Schema: s, Reader: db, MaxGroups: 2 * hosts, Now: func() time.Time { return now }})
	for _, bc := range []struct {
		name   string
		params string
		groups int
	}{
		{"top10-hosts-errors-1h", "family=requests&where=status%3D~5..&by=host&since=1h&limit=10", 10},
		{"week-hourly-by-datacenter", "family=requests&by=datacenter&since=7d&step=1h", 3},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				rec := httptest.NewRecorder()
				mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/cube/slice?"+bc.params, nil))
				if rec.Code != http.StatusOK {
					b.Fatalf("HTTP %d %s", rec.Code, rec.Body)
				}
				var env struct{ Data Slice }
				if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil || len(env.Data.Groups) != bc.groups {
					b.Fatalf("%d groups, %v", len(env.Data.Groups), err)
				}
			}
		})
	}
}

// FuzzSliceRequest sends arbitrary query strings and JSON bodies to the
// slice, drill-down and roll-up endpoints of a small real cube: every
// answer must be the JSON envelope, a success or a refusal of the input,
// and nothing may panic.
func FuzzSliceRequest(f *testing.F) {
	s := schema.Default()
	db := openStore(f, s)
	rng := rand.New(rand.NewPCG(9, 9))
	now := time.Now().Truncate(time.Hour)
	writeCube(f, db, s, rng, randomEvents(rng, 300, now.Add(-3*time.Hour).UnixMilli(), now.UnixMilli()))
	mux := apiMux(f, Options{Schema: s, Reader: db, MaxGroups: 20, Now: func() time.Time { return now }})
	for _, seed := range []struct {
		path  uint8
		query string
		body  string
	}{
		{0, "family=requests&where=status%3D~5..,transaction%3Dcheckout|search&by=cluster&since=2h&step=10m&measures=sum,count,rate,share&order=count:asc&limit=2&offset=1", `{"family": "requests", "where": ["status=~5.."], "by": "cluster", "since": "2h", "limit": 2}`},
		{0, "family=requests&where=host!~h[12],status%3D~(2|4).{2}&start=0&end=1700000000123&resolution=1h", `{"family": "requests", "start": 1700000000, "end": 1700003600, "format": "csv"}`},
		{1, "family=requests&dimension=datacenter/cluster/host&value=dc1&by=status", `{"family": "requests", "dimension": "cluster", "value": "c2", "where": "datacenter=dc1"}`},
		{2, "family=requests&dimension=datacenter&by=datacenter,status&format=csv", `{"family": "requests", "dimension": "transaction", "where": ["transaction=checkout"]}`},
		{0, "family=requests&where=%3D,!,a%3D~(,b!%3D|&order=-&step=1e-4&since=9e9", `{"family": null, "by": [1], "where": {"a": "b"}}`},
	} {
		f.Add(seed.path, seed.query, seed.body)
	}
	paths := []string{"/api/v1/cube/slice", "/api/v1/cube/drilldown", "/api/v1/cube/rollup"}
	f.Fuzz(func(t *testing.T, path uint8, query, body string) {
		p := paths[int(path)%len(paths)]
		get := httptest.NewRequest(http.MethodGet, p, nil)
		get.URL.RawQuery = query
		post := httptest.NewRequest(http.MethodPost, p, strings.NewReader(body))
		post.Header.Set("Content-Type", "application/json")
		for _, req := range []*http.Request{get, post} {
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, req)
			if rec.Code == http.StatusOK && strings.HasPrefix(rec.Header().Get("Content-Type"), "text/csv") {
				continue
			}
			var env apiEnvelope
			if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil {
				t.Fatalf("%s %s?%s %q: HTTP %d, not the JSON envelope: %q", req.Method, p, query, body, rec.Code, rec.Body)
			}
			switch {
			case rec.Code == http.StatusOK && env.Status == "success":
			case (rec.Code == http.StatusBadRequest && env.ErrorType == "bad_data") ||
				(rec.Code == http.StatusUnprocessableEntity && env.ErrorType == "execution"):
				if env.Status != "error" || env.Error == "" {
					t.Fatalf("%s %s?%s %q: HTTP %d with envelope %+v", req.Method, p, query, body, rec.Code, env)
				}
			default:
				t.Fatalf("%s %s?%s %q: HTTP %d %s: %s", req.Method, p, query, body, rec.Code, env.ErrorType, env.Error)
			}
		}
	})
}

package fanout_test

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/query"
	"github.com/dimsum/dimsum/query/fanout"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The test cluster: S shards, each on two of three combiners, every one a
// real gRPC server on loopback over its own real store.
const (
	testShards = 8
	combiners  = 3
)

// replicasOf is the test's placement rule: shard s lives on combiners s%3
// and s+1%3, the first preferred.
func replicasOf(s int) []string {
	return []string{combinerName(s % combiners), combinerName((s + 1) % combiners)}
}

func combinerName(i int) string { return fmt.Sprintf("c%d", i) }

// lost are the shards whose replicas are both c0 and c1.
var lost = []int{0, 3, 6}

const lostWarning = "shards 0, 3, 6 have no reachable replica; the result is partial"

// behindWarning is the warning for the lost shards while c1, back, catches
// up.
const behindWarning = "shards 0, 3, 6 could only be read from a replica that may lack some of them (still receiving the writes it missed while down, or found holding less than another replica); the result may be partial"

// lackingWarning is the warning for shard 3 alone, which c1, back, found
// it holds less of than another replica.
const lackingWarning = "shard 3 could only be read from a replica that may lack some of them (still receiving the writes it missed while down, or found holding less than another replica); the result may be partial"

// cluster is the combiners and the topology the fan-out reads them by.
type cluster struct {
	t      testing.TB
	schema *schema.Schema
	dirs   map[string]string
	// wrap, when set for a combiner, replaces its read service.
	wrap map[string]func(*combiner.ReadServer) wirepb.ReadServer
	mu   sync.Mutex
	// nodes holds the running combiners by name.
	nodes map[string]*node
	// behind holds the combiners that say they are catching up, and
	// lacking the shards each says it holds less of than another replica.
	behind  map[string]bool
	lacking map[string]map[int]bool
	// gaps are the events the topology says no combiner holds yet.
	gaps []fanout.Gap
}

type node struct {
	db   *tsdb.DB
	srv  *grpc.Server
	conn *grpc.ClientConn
}

func (c *cluster) Shards() int { return testShards }

// Replicas lists a shard's replicas, those catching up last, as the node's
// topology does.
func (c *cluster) Replicas(s int) []string {
	reps := replicasOf(s)
	slices.SortStableFunc(reps, func(a, b string) int {
		switch {
		case c.Behind(a, s) == c.Behind(b, s):
			return 0
		case c.Behind(b, s):
			return -1
		}
		return 1
	})
	return reps
}

func (c *cluster) Behind(name string, shard int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.behind[name] || c.lacking[name][shard]
}

func (c *cluster) Gaps() []fanout.Gap {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gaps
}

func (c *cluster) Conn(name string) (grpc.ClientConnInterface, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[name]
	if n == nil {
		return nil, fmt.Errorf("combiner %s is not running", name)
	}
	return n.conn, nil
}

func openDB(t testing.TB, s *schema.Schema, dir string) *tsdb.DB {
	t.Helper()
	db, err := tsdb.Open(tsdb.Options{Dir: dir, Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// start opens a combiner's store and serves its reads on a new port.
func (c *cluster) start(name string) {
	t := c.t
	t.Helper()
	db := openDB(t, c.schema, c.dirs[name])
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	var rs wirepb.ReadServer = combiner.NewReadServer(c.schema, db)
	if w := c.wrap[name]; w != nil {
		rs = w(combiner.NewReadServer(c.schema, db))
	}
	wirepb.RegisterReadServer(srv, rs)
	go srv.Serve(ln)
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.nodes[name] = &node{db: db, srv: srv, conn: conn}
	c.mu.Unlock()
}

// stop stops a combiner's server and closes its store.
func (c *cluster) stop(name string) {
	c.mu.Lock()
	n := c.nodes[name]
	delete(c.nodes, name)
	c.mu.Unlock()
	if n == nil {
		return
	}
	n.srv.Stop()
	n.conn.Close()
	if err := n.db.Close(); err != nil {
		c.t.Error(err)
	}
}

// world is a cluster loaded with one cube, the reference stores holding all
// of it and all but the lost shards, and the APIs over each.
type world struct {
	*cluster
	now                 time.Time
	ref, refPartial     http.Handler
	fan                 http.Handler
	fanNoPartialDefault http.Handler
}

func newWorld(t testing.TB, wrap map[string]func(*combiner.ReadServer) wirepb.ReadServer) *world {
	t.Helper()
	s := schema.Default()
	c := &cluster{t: t, schema: s, dirs: map[string]string{}, wrap: wrap, nodes: map[string]*node{}}
	root := t.TempDir()
	stores := map[string]*tsdb.DB{}
	for i := range combiners {
		name := combinerName(i)
		c.dirs[name] = filepath.Join(root, name)
		stores[name] = openDB(t, s, c.dirs[name])
	}
	ref := openDB(t, s, filepath.Join(root, "ref"))
	refPartial := openDB(t, s, filepath.Join(root, "ref-partial"))
	t.Cleanup(func() { ref.Close(); refPartial.Close() })

	now := time.Now().Truncate(time.Minute).Add(-3 * time.Second)
	deltas := cube(s, now)
	apply := func(db *tsdb.DB, ds []tsdb.Delta) {
		for i := 0; i < len(ds); i += 4096 {
			if _, err := db.Apply(tsdb.BatchID{}, ds[i:min(i+4096, len(ds))]); err != nil {
				t.Fatal(err)
			}
		}
	}
	byStore := map[string][]tsdb.Delta{}
	var partial []tsdb.Delta
	for _, d := range deltas {
		sh := int(schema.Shard(d.Family, d.Cuboid, d.Values, testShards))
		for _, r := range replicasOf(sh) {
			byStore[r] = append(byStore[r], d)
		}
		if !slices.Contains(lost, sh) {
			partial = append(partial, d)
		}
	}
	apply(ref, deltas)
	apply(refPartial, partial)
	for name, db := range stores {
		apply(db, byStore[name])
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for i := range combiners {
		c.start(combinerName(i))
	}
	t.Cleanup(func() {
		for i := range combiners {
			c.stop(combinerName(i))
		}
	})

	clock := func() time.Time { return now }
	mux := func(o query.Options) http.Handler {
		o.Schema, o.Now = s, clock
		a, err := query.NewAPI(o)
		if err != nil {
			t.Fatal(err)
		}
		m := http.NewServeMux()
		a.Register(m)
		return m
	}
	fo, err := fanout.New(fanout.Options{Schema: s, Topology: c, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	no := false
	return &world{
		cluster: c, now: now,
		ref:                 mux(query.Options{Reader: ref}),
		refPartial:          mux(query.Options{Reader: refPartial}),
		fan:                 mux(query.Options{Source: fo}),
		fanNoPartialDefault: mux(query.Options{Source: fo, PartialResponse: &no}),
	}
}

// cube returns the deltas of every materialized cuboid of a random cube of
// the default schema's requests family over the last three hours, in whole
// numbers so that every sum is exact whatever order it is added in.
func cube(s *schema.Schema, now time.Time) []tsdb.Delta {
	fam := s.Family("requests")
	rng := rand.New(rand.NewPCG(7, 11))
	step := s.Resolutions[0].Step.Milliseconds()
	type key struct {
		cuboid schema.CuboidID
		values string
		t      int64
	}
	agg := map[key]*tsdb.Delta{}
	var order []key
	from := now.Add(-3 * time.Hour).UnixMilli()
	for _, dc := range []string{"dc0", "dc1"} {
		for cl := range 2 {
			for h := range 3 {
				host := fmt.Sprintf("%s-c%d-h%d", dc, cl, h)
				for _, tx := range []string{"checkout", "search", "login"} {
					for _, st := range []string{"200", "503"} {
						values := map[string]string{"datacenter": dc, "cluster": fmt.Sprintf("%s-c%d", dc, cl), "host": host, "transaction": tx, "status": st}
						for t := from; t <= now.UnixMilli(); t += step {
							if rng.IntN(5) != 0 {
								continue
							}
							sum, count := float64(1+rng.IntN(20)), uint64(1+rng.IntN(3))
							for _, cub := range fam.Cuboids() {
								vs := make([]string, len(cub.Labels))
								for i, l := range cub.Labels {
									vs[i] = values[l]
								}
								k := key{cub.ID, strings.Join(vs, "\xff"), t - t%step}
								d := agg[k]
								if d == nil {
									d = &tsdb.Delta{Family: fam.Name, Cuboid: cub.ID, Values: vs, Time: k.t}
									agg[k] = d
									order = append(order, k)
								}
								d.Sum += sum
								d.Count += count
							}
						}
					}
				}
			}
		}
	}
	out := make([]tsdb.Delta, len(order))
	for i, k := range order {
		out[i] = *agg[k]
	}
	return out
}

// get sends a GET request to h and returns the status, the body and the
// response's headers.
func get(h http.Handler, path string, p url.Values) (int, []byte, http.Header) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path+"?"+p.Encode(), nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, body, rec.Header()
}

// request is one API call of the equality suite.
type request struct {
	path string
	p    url.Values
}

func (r request) String() string { return r.path + "?" + r.p.Encode() }

// whole returns r asking for a complete answer.
func (r request) whole() request {
	p := maps.Clone(r.p)
	p.Set("partial_response", "false")
	return request{r.path, p}
}

func (w *world) requests() []request {
	now := fmt.Sprint(w.now.Unix())
	start := fmt.Sprint(w.now.Add(-2 * time.Hour).Unix())
	var out []request
	for _, q := range []string{
		`sum by (datacenter) (rate(requests_total[5m]))`,
		`sum by (transaction, status) (increase(requests_total{status=~"5.."}[10m]))`,
		`rate(requests_total{host="dc1-c0-h2"}[1m])`,
		`requests_delta{transaction=~"check.*|login", datacenter!="dc0"}`,
		`sum(sum_over_time(requests_delta[1h]))`,
		`count by (cluster) (requests_total)`,
		`topk(3, sum by (host) (rate(requests_total[5m])))`,
	} {
		out = append(out,
			request{"/api/v1/query", url.Values{"query": {q}, "time": {now}}},
			request{"/api/v1/query_range", url.Values{"query": {q}, "start": {start}, "end": {now}, "step": {"60"}}},
			request{"/api/v1/query_range", url.Values{"query": {q}, "start": {start}, "end": {now}, "step": {"10"}}},
		)
	}
	out = append(out,
		request{"/api/v1/series", url.Values{"match[]": {`requests_total{datacenter="dc0"}`}, "start": {start}, "end": {now}}},
		request{"/api/v1/series", url.Values{"match[]": {`{__name__=~"requests_.*", host=~"dc1-c1-.*"}`}}},
		request{"/api/v1/labels", url.Values{}},
		request{"/api/v1/labels", url.Values{"match[]": {`requests_delta{status="503"}`}, "start": {start}, "end": {now}}},
		request{"/api/v1/label/host/values", url.Values{}},
		request{"/api/v1/label/host/values", url.Values{"limit": {"5"}}},
		request{"/api/v1/label/cluster/values", url.Values{"match[]": {`requests_total{transaction="login"}`}, "start": {start}, "end": {now}}},
		request{"/api/v1/label/__name__/values", url.Values{}},
		request{"/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"datacenter"}, "since": {"2h"}, "measures": {"sum,count,share"}}},
		request{"/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"host"}, "since": {"3h"}, "limit": {"3"}}},
		request{"/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"cluster"}, "where": {"status=503"}, "since": {"2h"}, "step": {"10m"}}},
		request{"/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"transaction"}, "since": {"1h"}, "format": {"csv"}}},
		request{"/api/v1/cube/drilldown", url.Values{"family": {"requests"}, "dimension": {"datacenter"}, "value": {"dc1"}, "since": {"1h"}}},
	)
	return out
}

// same checks that every request answers through the fan-out as want
// answers it, with warning as the only warning (none when "").
func (w *world) same(t *testing.T, want http.Handler, warning string) {
	t.Helper()
	for _, r := range w.requests() {
		w.sameOne(t, r, want, warning)
	}
}

// sameOne checks one request of the suite, as same does.
func (w *world) sameOne(t *testing.T, r request, want http.Handler, warning string) {
	t.Helper()
	{
		wantCode, wantBody, _ := get(want, r.path, r.p)
		code, body, hdr := get(w.fan, r.path, r.p)
		if wantCode != http.StatusOK {
			t.Fatalf("%s: the reference answers %d: %s", r, wantCode, wantBody)
		}
		if want == w.ref && empty(t, wantBody) {
			t.Fatalf("%s: the reference answers nothing, which proves nothing: %s", r, wantBody)
		}
		if code != wantCode {
			t.Errorf("%s: HTTP %d, want %d: %s", r, code, wantCode, body)
			return
		}
		if r.p.Get("format") == "csv" {
			if string(body) != string(wantBody) {
				t.Errorf("%s:\n got %s\nwant %s", r, body, wantBody)
			}
			if got := hdr.Values(query.WarningHeader); !reflect.DeepEqual(got, warnings(warning)) {
				t.Errorf("%s: warning headers %q, want %q", r, got, warnings(warning))
			}
			return
		}
		got, gotWarnings := decode(t, body)
		exp, expWarnings := decode(t, wantBody)
		if !reflect.DeepEqual(got, exp) {
			t.Errorf("%s:\n got %s\nwant %s", r, body, wantBody)
		}
		// The reference's own warnings, such as a truncation, and the
		// fan-out's.
		expWarnings = append(expWarnings, warnings(warning)...)
		slices.Sort(gotWarnings)
		slices.Sort(expWarnings)
		if !slices.Equal(gotWarnings, expWarnings) {
			t.Errorf("%s: warnings %q, want %q", r, gotWarnings, expWarnings)
		}
	}
}

// empty reports whether a JSON answer holds no data.
func empty(t *testing.T, body []byte) bool {
	t.Helper()
	if !json.Valid(body) {
		return len(body) == 0
	}
	var env struct {
		Data json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		t.Fatal(err)
	}
	var d any
	if err := json.Unmarshal(env.Data, &d); err != nil {
		t.Fatal(err)
	}
	switch d := d.(type) {
	case []any:
		return len(d) == 0
	case map[string]any:
		if res, ok := d["result"].([]any); ok {
			return len(res) == 0
		}
		if gs, ok := d["groups"].([]any); ok {
			return len(gs) == 0
		}
	}
	return false
}

func warnings(w string) []string {
	if w == "" {
		return nil
	}
	return []string{w}
}

// decode returns a JSON answer without its warnings, and the warnings, of
// the envelope or of a slice.
func decode(t *testing.T, body []byte) (map[string]any, []string) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatalf("cannot decode %s: %v", body, err)
	}
	var out []string
	take := func(m map[string]any) {
		if ws, ok := m["warnings"].([]any); ok {
			for _, w := range ws {
				if !slices.Contains(out, w.(string)) {
					out = append(out, w.(string))
				}
			}
		}
		delete(m, "warnings")
	}
	take(m)
	if d, ok := m["data"].(map[string]any); ok {
		take(d)
	}
	return m, out
}

// TestFanOut reads a cluster through the fan-out and requires the answers
// a store holding the whole cube gives, then loses combiners: one (the
// answers stay whole), two (some shards are lost: the answer is partial and
// says so, or is refused when asked to be complete), and gets one back.
func TestFanOut(t *testing.T) {
	w := newWorld(t, nil)
	t.Run("all up", func(t *testing.T) { w.same(t, w.ref, "") })

	w.stop("c0")
	t.Run("one combiner down", func(t *testing.T) { w.same(t, w.ref, "") })

	w.stop("c1")
	t.Run("two combiners down", func(t *testing.T) {
		w.same(t, w.refPartial, lostWarning)
		r := w.requests()[0]
		if _, part, _ := get(w.refPartial, r.path, r.p); func() bool { _, whole, _ := get(w.ref, r.path, r.p); return string(part) == string(whole) }() {
			t.Fatalf("%s: the lost shards change nothing, so the test proves nothing", r)
		}
		for _, r := range w.requests() {
			w.unavailable(t, w.fan, r.whole(), "shards 0, 3, 6 have no reachable replica")
			w.unavailable(t, w.fanNoPartialDefault, r, "shards 0, 3, 6 have no reachable replica")
		}
	})

	// c1 is back but says it is still catching up: the shards only it can
	// serve are answered with a warning, or refused when a complete answer
	// is asked for.
	w.start("c1")
	w.warned(t, "one combiner back, catching up", func(on bool) { w.behind = map[string]bool{"c1": on} },
		behindWarning, "shards 0, 3, 6 could only be read from a replica that may lack some")
	// c1 says it lacks shard 3 only: that shard is answered with a
	// warning, the others it alone serves are not.
	w.warned(t, "one combiner back, lacking a shard", func(on bool) { w.lacking = map[string]map[int]bool{"c1": {3: on}} },
		lackingWarning, "shard 3 could only be read from a replica that may lack some")
	t.Run("one combiner back", func(t *testing.T) { w.same(t, w.ref, "") })

	// Events wait for an aggregator that is down: every answer that reads
	// the cube says so, or is refused when asked to be complete.
	w.warned(t, "events waiting for an aggregator", func(on bool) {
		w.gaps = nil
		if on {
			w.gaps = []fanout.Gap{{Aggregator: "a2", Down: true, WaitingAt: []string{"a1", "a3"}}}
		}
	}, gapWarning, "aggregator a2 is down")
	t.Run("no events waiting", func(t *testing.T) { w.same(t, w.ref, "") })
}

// warned runs the suite, as test name, with the topology changed by
// set(true): every answer carries warning, or is refused saying why when a
// complete answer is asked for. set(false) then undoes the change.
func (w *world) warned(t *testing.T, name string, set func(on bool), warning, why string) {
	t.Helper()
	w.mu.Lock()
	set(true)
	w.mu.Unlock()
	t.Run(name, func(t *testing.T) {
		w.same(t, w.ref, warning)
		for _, r := range w.requests() {
			w.unavailable(t, w.fan, r.whole(), why)
		}
	})
	w.mu.Lock()
	set(false)
	w.mu.Unlock()
}

const gapWarning = "aggregator a2 is down: the events it took and had not yet flushed or forwarded, and those of its hosts waiting for it at a1, a3, are in no answer; the result may be partial"

func TestGapText(t *testing.T) {
	for _, c := range []struct {
		gap  fanout.Gap
		want string
	}{
		{fanout.Gap{Aggregator: "n2", Down: true}, "aggregator n2 is down: the events it took and had not yet flushed or forwarded are in no answer"},
		{fanout.Gap{Aggregator: "n2", Down: true, WaitingAt: []string{"n1"}},
			"aggregator n2 is down: the events it took and had not yet flushed or forwarded, and those of its hosts waiting for it at n1, are in no answer"},
		{fanout.Gap{Aggregator: "n2", WaitingAt: []string{"n1", "n3"}}, "events of the hosts of aggregator n2 wait for it at n1, n3 and are in no answer"},
	} {
		if got := c.gap.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.gap, got, c.want)
		}
	}
}

// unavailable checks that a request is refused with a 503.
func (w *world) unavailable(t *testing.T, h http.Handler, r request, why string) {
	t.Helper()
	code, body, _ := get(h, r.path, r.p)
	var env struct {
		ErrorType string `json:"errorType"`
		Error     string `json:"error"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		t.Fatalf("%s: cannot decode %s: %v", r, body, err)
	}
	if code != http.StatusServiceUnavailable || env.ErrorType != "unavailable" || !strings.Contains(env.Error, why) {
		t.Errorf("%s: HTTP %d %s %q, want 503 unavailable saying %q", r, code, env.ErrorType, env.Error, why)
	}
}

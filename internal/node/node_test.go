package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	"github.com/dimsum/dimsum/loadtest"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// testConfig runs a node on free loopback ports with a one-second window, so
// data is queryable within about a second and a half.
func testConfig(dir string) Config {
	return Config{
		DataDir:    dir,
		GRPCListen: "127.0.0.1:0",
		HTTPListen: "127.0.0.1:0",
		Name:       "test",
		Aggregator: AggregatorConfig{Grace: model.Duration(500 * time.Millisecond), FlushInterval: model.Duration(100 * time.Millisecond)},
		Schema:     schema.File{Resolutions: []string{"1s:1d", "10s:8d", "1m:35d"}},
	}
}

type apiResponse struct {
	Status    string          `json:"status"`
	Data      json.RawMessage `json:"data"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Warnings  []string        `json:"warnings"`
}

// get calls the HTTP API and decodes the envelope.
func get(t *testing.T, addr, path string, params url.Values) (int, apiResponse) {
	t.Helper()
	resp, err := http.Get("http://" + addr + path + "?" + params.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r apiResponse
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("%s: cannot decode the response: %v", path, err)
	}
	return resp.StatusCode, r
}

// vector runs an instant query and returns its samples keyed by the value of
// label key ("" for a single unlabelled sample).
func vector(t *testing.T, addr, query string, ts time.Time, key string) map[string]float64 {
	t.Helper()
	code, r := get(t, addr, "/api/v1/query", url.Values{"query": {query}, "time": {strconv.FormatInt(ts.Unix(), 10)}})
	if code != http.StatusOK || r.Status != "success" {
		t.Fatalf("%s: HTTP %d %s: %s", query, code, r.ErrorType, r.Error)
	}
	var data struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	}
	if err := json.Unmarshal(r.Data, &data); err != nil {
		t.Fatal(err)
	}
	if data.ResultType != "vector" {
		t.Fatalf("%s: result type %s, want vector", query, data.ResultType)
	}
	out := map[string]float64{}
	for _, s := range data.Result {
		v, err := strconv.ParseFloat(s.Value[1].(string), 64)
		if err != nil {
			t.Fatal(err)
		}
		out[s.Metric[key]] = v
	}
	return out
}

// TestEndToEnd pushes a seeded workload through real gRPC into an
// all-in-one node, reads the totals back through the HTTP API, restarts the
// node on the same data directory and reads them again.
func TestEndToEnd(t *testing.T) {
	dir := t.TempDir()
	n, err := Start(testConfig(dir), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { n.Close() }()

	rep, err := loadtest.Run(context.Background(), loadtest.Options{
		Addrs: []string{n.GRPCAddr()}, HTTPAddrs: []string{n.HTTPAddr()}, Events: 30_000, Seed: 7, BatchSize: 1_000, LateFraction: 0.05,
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Accepted != rep.Events || rep.Rejected != 0 {
		t.Fatalf("accepted %d of %d events, rejects %v", rep.Accepted, rep.Events, rep.Rejects)
	}
	total := rep.Totals["requests"]

	// Every event lies before at, which is a minute boundary, so each
	// selection below ends on a step end at every resolution.
	at := time.Now().Truncate(time.Minute).Add(time.Minute)
	const sumQuery = "sum(sum_over_time(requests_delta[1h]))"
	deadline := time.Now().Add(30 * time.Second)
	for vector(t, n.HTTPAddr(), sumQuery, at, "")[""] != total {
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached %v: last %v", sumQuery, total, vector(t, n.HTTPAddr(), sumQuery, at, ""))
		}
		time.Sleep(100 * time.Millisecond)
	}

	check := func(t *testing.T, addr string) {
		t.Helper()
		if got := vector(t, addr, sumQuery, at, "")[""]; got != total {
			t.Errorf("%s = %v, want %v", sumQuery, got, total)
		}
		byDC := vector(t, addr, "sum by (datacenter) (sum_over_time(requests_delta[1h]))", at, "datacenter")
		if len(byDC) != len(rep.ByDatacenter["requests"]) {
			t.Errorf("datacenters %v, want %v", byDC, rep.ByDatacenter["requests"])
		}
		for dc, want := range rep.ByDatacenter["requests"] {
			if byDC[dc] != want {
				t.Errorf("datacenter %s: %v, want %v", dc, byDC[dc], want)
			}
		}
		// A 10m window read at 1m steps holds ten samples, the first at
		// at-9m and empty, so Prometheus extrapolates the increase by
		// exactly one average interval: 10/9 of the total.
		inc := vector(t, addr, "sum(increase(requests_total[10m]))", at, "")[""]
		if want := total * 10 / 9; math.Abs(inc-want) > 1e-9*want {
			t.Errorf("increase = %v, want %v", inc, want)
		}
		rate := vector(t, addr, "sum(rate(requests_total[10m]))", at, "")[""]
		if want := total / 540; math.Abs(rate-want) > 1e-9*want {
			t.Errorf("rate = %v, want %v", rate, want)
		}
	}
	check(t, n.HTTPAddr())

	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	n, err = Start(testConfig(dir), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("after restart", func(t *testing.T) { check(t, n.HTTPAddr()) })
}

// startLoaded starts a node of version v1.2.3 with a flag, pushes a small seeded
// workload (no late events) and waits until its series are visible.
func startLoaded(t *testing.T) *Node {
	t.Helper()
	cfg := testConfig(t.TempDir())
	cfg.Flags = map[string]string{"log-level": "debug"} // as cmd/dimsum passes them
	n, err := Start(cfg, "v1.2.3", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	if _, err := loadtest.Run(context.Background(), loadtest.Options{Addrs: []string{n.GRPCAddr()}, HTTPAddrs: []string{n.HTTPAddr()}, Events: 2_000, Seed: 1, LateFraction: -1}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(vector(t, n.HTTPAddr(), "requests_delta", time.Now(), "host")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no series became visible")
		}
		time.Sleep(100 * time.Millisecond)
	}
	return n
}

// TestAPIShapes checks every endpoint's JSON shape and the error envelope.
func TestAPIShapes(t *testing.T) {
	addr := startLoaded(t).HTTPAddr()
	now := time.Now()
	unix := func(t time.Time) string { return strconv.FormatFloat(float64(t.UnixMilli())/1000, 'f', 3, 64) }

	for _, tc := range []struct {
		name   string
		path   string
		params url.Values
		want   func(t *testing.T, data json.RawMessage)
	}{
		{"buildinfo", "/api/v1/status/buildinfo", nil, func(t *testing.T, d json.RawMessage) {
			var bi map[string]string
			mustDecode(t, d, &bi)
			if bi["version"] != "v1.2.3" || bi["goVersion"] == "" {
				t.Errorf("buildinfo %v", bi)
			}
		}},
		{"labels", "/api/v1/labels", nil, func(t *testing.T, d json.RawMessage) {
			var names []string
			mustDecode(t, d, &names)
			if fmt.Sprint(names) != "[__name__ cluster datacenter host status transaction]" {
				t.Errorf("labels %v", names)
			}
		}},
		{"label values", "/api/v1/label/__name__/values", nil, func(t *testing.T, d json.RawMessage) {
			var vals []string
			mustDecode(t, d, &vals)
			if fmt.Sprint(vals) != "[requests_delta requests_total]" {
				t.Errorf("values %v", vals)
			}
		}},
		{"label values with match", "/api/v1/label/cluster/values", url.Values{"match[]": {`requests_total{datacenter="dc2"}`}}, func(t *testing.T, d json.RawMessage) {
			var vals []string
			mustDecode(t, d, &vals)
			if fmt.Sprint(vals) != "[dc2-c1 dc2-c2 dc2-c3 dc2-c4]" {
				t.Errorf("values %v", vals)
			}
		}},
		{"series", "/api/v1/series", url.Values{"match[]": {`requests_delta{cluster="dc1-c1",status="500"}`}, "start": {unix(now.Add(-time.Hour))}, "end": {unix(now.Add(time.Minute))}}, func(t *testing.T, d json.RawMessage) {
			var series []map[string]string
			mustDecode(t, d, &series)
			if len(series) == 0 {
				t.Fatal("no series")
			}
			for _, s := range series {
				if s["__name__"] != "requests_delta" || s["cluster"] != "dc1-c1" || s["status"] != "500" || len(s) != 6 {
					t.Errorf("series %v", s)
				}
			}
		}},
		{"metadata", "/api/v1/metadata", nil, func(t *testing.T, d json.RawMessage) {
			var md map[string][]map[string]string
			mustDecode(t, d, &md)
			if md["requests_total"][0]["type"] != "counter" || md["requests_delta"][0]["type"] != "gauge" {
				t.Errorf("metadata %v", md)
			}
		}},
		{"query_range", "/api/v1/query_range", url.Values{"query": {"sum(rate(requests_total[1m]))"}, "start": {unix(now.Add(-5 * time.Minute))}, "end": {now.Format(time.RFC3339Nano)}, "step": {"15s"}}, func(t *testing.T, d json.RawMessage) {
			var m struct {
				ResultType string `json:"resultType"`
				Result     []struct {
					Values [][2]any `json:"values"`
				} `json:"result"`
			}
			mustDecode(t, d, &m)
			if m.ResultType != "matrix" || len(m.Result) != 1 || len(m.Result[0].Values) == 0 {
				t.Errorf("query_range %s", d)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, r := get(t, addr, tc.path, tc.params)
			if code != http.StatusOK || r.Status != "success" {
				t.Fatalf("HTTP %d: %s %s", code, r.ErrorType, r.Error)
			}
			tc.want(t, r.Data)
		})
	}

	for _, tc := range []struct {
		name   string
		path   string
		params url.Values
		code   int
		typ    string
	}{
		{"bad PromQL", "/api/v1/query", url.Values{"query": {"sum(rate(requests_total[5m]"}}, 400, "bad_data"},
		{"bad time", "/api/v1/query", url.Values{"query": {"1"}, "time": {"yesterday"}}, 400, "bad_data"},
		{"missing step", "/api/v1/query_range", url.Values{"query": {"1"}, "start": {"1"}, "end": {"2"}}, 400, "bad_data"},
		{"end before start", "/api/v1/query_range", url.Values{"query": {"1"}, "start": {"20"}, "end": {"10"}, "step": {"1"}}, 400, "bad_data"},
		{"too many points", "/api/v1/query_range", url.Values{"query": {"1"}, "start": {"0"}, "end": {"100000"}, "step": {"1"}}, 400, "bad_data"},
		{"series without match", "/api/v1/series", nil, 400, "bad_data"},
		{"bad limit", "/api/v1/labels", url.Values{"limit": {"-1"}}, 400, "bad_data"},
		{"execution error", "/api/v1/query", url.Values{"query": {`label_replace(requests_delta, "x", "$1", "host", "(")`}}, 422, "execution"},
		{"reserved label", "/api/v1/query", url.Values{"query": {`requests_delta{__dimsum_cuboid__="0"}`}}, 400, "bad_data"},
		{"reserved label in match[]", "/api/v1/series", url.Values{"match[]": {`{__dimsum_cuboid__="0"}`}}, 400, "bad_data"},
		{"bad max_source_resolution", "/api/v1/query", url.Values{"query": {"1"}, "max_source_resolution": {"fine"}}, 400, "bad_data"},
		{"bad lookback_delta", "/api/v1/query", url.Values{"query": {"1"}, "lookback_delta": {"-1m"}}, 400, "bad_data"},
		{"bad timeout", "/api/v1/query", url.Values{"query": {"1"}, "timeout": {"0"}}, 400, "bad_data"},
		{"timeout", "/api/v1/query", url.Values{"query": {"sum(rate(requests_total[5m]))"}, "timeout": {"0.000001"}}, 503, "timeout"},
		{"format_query of bad PromQL", "/api/v1/format_query", url.Values{"query": {"sum("}}, 400, "bad_data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, r := get(t, addr, tc.path, tc.params)
			if code != tc.code || r.Status != "error" || r.ErrorType != tc.typ || r.Error == "" {
				t.Errorf("HTTP %d %q %q %q, want %d %s", code, r.Status, r.ErrorType, r.Error, tc.code, tc.typ)
			}
		})
	}
}

func mustDecode(t *testing.T, data json.RawMessage, v any) {
	t.Helper()
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("cannot decode %s: %v", data, err)
	}
}

// TestStartFailsCleanly starts a node on a gRPC address already in use: Start
// returns the error and releases what it had opened.
func TestStartFailsCleanly(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := testConfig(t.TempDir())
	cfg.GRPCListen = ln.Addr().String()
	if n, err := Start(cfg, "test", nil); err == nil || n != nil || !strings.Contains(err.Error(), "cannot listen for gRPC") {
		t.Fatalf("Start on a busy address: %v, %v", n, err)
	}
	// The store was closed: a second node can open the same directory.
	cfg.GRPCListen = "127.0.0.1:0"
	n, err := Start(cfg, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	n.Close()
}

// TestDataDirInUse starts a second node on a data directory a running node
// holds: it is refused at once, saying that another process holds the
// directory, and once the first stops the directory is free again.
func TestDataDirInUse(t *testing.T) {
	dir := t.TempDir()
	n, err := Start(testConfig(dir), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	second, err := Start(testConfig(dir), "test", nil)
	want := fmt.Sprintf("the data directory %s is in use by another dimsum process (pid %d)", dir, os.Getpid())
	if err == nil || second != nil || !strings.Contains(err.Error(), want) {
		t.Errorf("a second node on %s: %v; want an error saying %q", dir, err, want)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err = Start(testConfig(dir), "test", nil); err != nil {
		t.Fatalf("after the first node stopped: %v", err)
	}
	n.Close()
}

// TestServerMetrics checks that /metrics counts the HTTP requests by route
// and status and the gRPC calls by method and code, and carries
// dimsum_build_info; and that /debug/pprof/ is served only when asked for.
func TestServerMetrics(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.DebugPprof = true
	n, err := Start(cfg, "v9.8.7", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if _, err := loadtest.Run(context.Background(), loadtest.Options{Addrs: []string{n.GRPCAddr()}, HTTPAddrs: []string{n.HTTPAddr()}, Events: 100, LateFraction: -1}); err != nil {
		t.Fatal(err)
	}
	get(t, n.HTTPAddr(), "/api/v1/query", url.Values{"query": {"1"}})
	get(t, n.HTTPAddr(), "/api/v1/query", url.Values{"query": {"sum("}})
	fetch := func(addr, path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := fetch(n.HTTPAddr(), "/debug/pprof/"); code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ with debug_pprof: HTTP %d", code)
	}
	// The flush reaches the combiner, in process, once the window and its
	// grace end.
	flushed := regexp.MustCompile(`(?m)^dimsum_combiner_flushes_applied_total [1-9]`)
	var metrics string
	deadline := time.Now().Add(30 * time.Second)
	for _, metrics = fetch(n.HTTPAddr(), "/metrics"); !flushed.MatchString(metrics) && time.Now().Before(deadline); _, metrics = fetch(n.HTTPAddr(), "/metrics") {
		time.Sleep(100 * time.Millisecond)
	}
	if !flushed.MatchString(metrics) {
		t.Errorf("/metrics lacks %s", flushed)
	}
	for _, want := range []string{
		`dimsum_http_requests_total{code="200",handler="/api/v1/query"} 1`,
		`dimsum_http_requests_total{code="400",handler="/api/v1/query"} 1`,
		`dimsum_http_request_duration_seconds_count{handler="/api/v1/query"} 2`,
		`dimsum_grpc_requests_total{code="OK",method="` + wirepb.Ingest_Push_FullMethodName + `",server="public"}`,
		`dimsum_build_info{goversion="` + runtime.Version() + `",version="v9.8.7"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	plain, err := Start(testConfig(t.TempDir()), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if code, _ := fetch(plain.HTTPAddr(), "/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ without debug_pprof: HTTP %d, want 404", code)
	}
}

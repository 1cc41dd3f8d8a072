package node

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/api"
	v1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/common/model"
)

// TestOfficialClient drives every call of Prometheus' own Go client, which
// posts forms and falls back to GET, against a running node, and checks
// what each returns: what Grafana's Prometheus data source calls, empty
// answers as empty lists, warnings and infos where Prometheus gives them,
// and a 404 not_found in Prometheus' envelope for what belongs to a
// Prometheus server alone.
func TestOfficialClient(t *testing.T) {
	n := startLoaded(t)
	c, err := api.NewClient(api.Config{Address: "http://" + n.HTTPAddr()})
	if err != nil {
		t.Fatal(err)
	}
	prom := v1.NewAPI(c)
	ctx := context.Background()
	now := time.Now()
	start, end := now.Add(-time.Hour), now.Add(time.Minute)

	t.Run("health check", func(t *testing.T) {
		// Grafana's data source test: 1+1 at unix time 4.
		v, _, _, err := prom.Query(ctx, "1+1", time.Unix(4, 0))
		if err != nil {
			t.Fatal(err)
		}
		if s, ok := v.(*model.Scalar); !ok || s.Value != 2 || s.Timestamp.Unix() != 4 {
			t.Errorf("1+1 = %v", v)
		}
	})
	t.Run("query", func(t *testing.T) {
		v, _, _, err := prom.Query(ctx, "sum by (datacenter) (sum_over_time(requests_delta[1h]))", now, v1.WithTimeout(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		vec, ok := v.(model.Vector)
		if !ok || len(vec) == 0 {
			t.Fatalf("result %v", v)
		}
		var total model.SampleValue
		for _, s := range vec {
			total += s.Value
		}
		if total <= 0 {
			t.Errorf("total %v", total)
		}
	})
	t.Run("query_range", func(t *testing.T) {
		v, _, _, err := prom.QueryRange(ctx, "sum(rate(requests_total[1m]))", v1.Range{Start: now.Add(-5 * time.Minute), End: now, Step: 15 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if m, ok := v.(model.Matrix); !ok || len(m) != 1 || len(m[0].Values) == 0 {
			t.Errorf("result %v", v)
		}
	})
	t.Run("labels", func(t *testing.T) {
		names, _, _, err := prom.LabelNames(ctx, []string{`requests_total{datacenter="dc1"}`}, start, end)
		if err != nil {
			t.Fatal(err)
		}
		if len(names) != 6 || names[0] != "__name__" {
			t.Errorf("labels %v", names)
		}
	})
	t.Run("label values with limit", func(t *testing.T) {
		vals, warnings, _, err := prom.LabelValues(ctx, "host", nil, start, end, v1.WithLimit(2))
		if err != nil {
			t.Fatal(err)
		}
		if len(vals) != 2 || len(warnings) != 1 || !strings.Contains(warnings[0], "truncated") {
			t.Errorf("values %v, warnings %v", vals, warnings)
		}
	})
	t.Run("series", func(t *testing.T) {
		sets, _, _, err := prom.Series(ctx, []string{`requests_delta{status="500"}`}, start, end)
		if err != nil {
			t.Fatal(err)
		}
		if len(sets) == 0 {
			t.Fatal("no series")
		}
		for _, s := range sets {
			if s["status"] != "500" || s["__name__"] != "requests_delta" {
				t.Errorf("series %v", s)
			}
		}
	})
	t.Run("metadata", func(t *testing.T) {
		md, err := prom.Metadata(ctx, "requests_total", "")
		if err != nil {
			t.Fatal(err)
		}
		if len(md) != 1 || md["requests_total"][0].Type != v1.MetricTypeCounter {
			t.Errorf("metadata %v", md)
		}
	})
	t.Run("buildinfo", func(t *testing.T) {
		bi, err := prom.Buildinfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if bi.Version != "v1.2.3" || bi.GoVersion == "" {
			t.Errorf("buildinfo %+v", bi)
		}
	})
	t.Run("query_exemplars", func(t *testing.T) {
		ex, err := prom.QueryExemplars(ctx, "requests_total", start, end)
		if err != nil || len(ex) != 0 {
			t.Errorf("exemplars %v, %v; want none", ex, err)
		}
	})
	t.Run("rules and alerts", func(t *testing.T) {
		rules, err := prom.Rules(ctx, nil)
		if err != nil || len(rules.Groups) != 0 {
			t.Errorf("rules %v, %v", rules, err)
		}
		alerts, err := prom.Alerts(ctx)
		if err != nil || len(alerts.Alerts) != 0 {
			t.Errorf("alerts %v, %v", alerts, err)
		}
	})
	t.Run("format_query", func(t *testing.T) {
		// The client hands back the raw JSON of the data field.
		raw, err := prom.FormatQuery(ctx, "sum(rate(requests_total{datacenter='dc1'}[5m]))by(cluster)")
		var got string
		if err == nil {
			err = json.Unmarshal([]byte(raw), &got)
		}
		if want := `sum by (cluster) (rate(requests_total{datacenter="dc1"}[5m]))`; err != nil || got != want {
			t.Errorf("format_query = %q, %v; want %q", got, err, want)
		}
	})
	t.Run("parse_query", func(t *testing.T) {
		code, r := get(t, n.HTTPAddr(), "/api/v1/parse_query", url.Values{"query": {"sum by (dc) (rate(x[5m]))"}})
		if code != http.StatusOK {
			t.Fatalf("HTTP %d: %s", code, r.Error)
		}
		var tree struct {
			Type     string   `json:"type"`
			Op       string   `json:"op"`
			Grouping []string `json:"grouping"`
			Expr     struct {
				Type string `json:"type"`
				Func struct{ Name string }
				Args []struct {
					Type  string `json:"type"`
					Name  string `json:"name"`
					Range int64  `json:"range"`
				} `json:"args"`
			} `json:"expr"`
		}
		mustDecode(t, r.Data, &tree)
		if tree.Type != "aggregation" || tree.Op != "sum" || tree.Grouping[0] != "dc" || tree.Expr.Func.Name != "rate" || tree.Expr.Args[0].Type != "matrixSelector" || tree.Expr.Args[0].Range != 300_000 {
			t.Errorf("parse_query: %s", r.Data)
		}
	})
	t.Run("stats", func(t *testing.T) {
		code, r := get(t, n.HTTPAddr(), "/api/v1/query", url.Values{"query": {"sum(requests_delta)"}, "stats": {"all"}})
		if code != http.StatusOK {
			t.Fatalf("HTTP %d: %s", code, r.Error)
		}
		var data struct {
			Stats struct {
				Timings map[string]float64 `json:"timings"`
				Samples map[string]json.RawMessage
			} `json:"stats"`
		}
		mustDecode(t, r.Data, &data)
		if _, ok := data.Stats.Timings["execTotalTime"]; !ok || data.Stats.Samples["totalQueryableSamples"] == nil {
			t.Errorf("stats: %s", r.Data)
		}
	})
	t.Run("milliseconds and raw resolution", func(t *testing.T) {
		ms := now.Add(time.Minute).Truncate(time.Minute).UnixMilli()
		secs := float64(ms) / 1000
		q := "sum(sum_over_time(requests_delta[1h]))"
		a := vector(t, n.HTTPAddr(), q, time.UnixMilli(ms), "")
		code, r := get(t, n.HTTPAddr(), "/api/v1/query", url.Values{"query": {q}, "time": {strconv.FormatInt(ms, 10)}, "max_source_resolution": {"raw"}})
		if code != http.StatusOK {
			t.Fatalf("HTTP %d: %s", code, r.Error)
		}
		var data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		}
		mustDecode(t, r.Data, &data)
		if len(data.Result) != 1 || data.Result[0].Value[0].(float64) != secs || data.Result[0].Value[1] != model.SampleValue(a[""]).String() {
			t.Errorf("at %d ms, raw: %s; at %v s: %v", ms, r.Data, secs, a)
		}
	})
	t.Run("empty answers are empty lists", func(t *testing.T) {
		m, _, _, err := prom.QueryRange(ctx, `sum(rate(requests_total{datacenter="none"}[1m]))`, v1.Range{Start: now.Add(-5 * time.Minute), End: now, Step: 15 * time.Second})
		if mat, ok := m.(model.Matrix); err != nil || !ok || mat == nil || len(mat) != 0 {
			t.Errorf("query_range without series: %#v, %v; want an empty matrix", m, err)
		}
		v, _, _, err := prom.Query(ctx, `sum(requests_delta{datacenter="none"})`, now)
		if vec, ok := v.(model.Vector); err != nil || !ok || vec == nil || len(vec) != 0 {
			t.Errorf("query without series: %#v, %v; want an empty vector", v, err)
		}
		names, _, _, err := prom.LabelNames(ctx, []string{"nometric"}, start, end)
		if err != nil || names == nil || len(names) != 0 {
			t.Errorf("labels of no series: %#v, %v; want []", names, err)
		}
		vals, _, _, err := prom.LabelValues(ctx, "nolabel", nil, start, end)
		if err != nil || vals == nil || len(vals) != 0 {
			t.Errorf("values of an unknown label: %#v, %v; want []", vals, err)
		}
		sets, _, _, err := prom.Series(ctx, []string{"nometric"}, start, end)
		if err != nil || sets == nil || len(sets) != 0 {
			t.Errorf("series of nothing: %#v, %v; want []", sets, err)
		}
	})
	t.Run("infos", func(t *testing.T) {
		_, warnings, infos, err := prom.Query(ctx, "sum(rate(requests_delta[5m]))", now)
		if err != nil || len(warnings) != 0 || len(infos) != 1 || !strings.Contains(infos[0], `metric might not be a counter, name does not end in _total/_sum/_count/_bucket: "requests_delta"`) {
			t.Errorf("rate of a gauge: warnings %q, infos %q, %v; want Prometheus' info", warnings, infos, err)
		}
	})
	t.Run("runtimeinfo and flags", func(t *testing.T) {
		ri, err := prom.Runtimeinfo(ctx)
		if err != nil || ri.StartTime.IsZero() || ri.GOMAXPROCS < 1 || ri.GoroutineCount < 1 || ri.StorageRetention != "1s:1d, 10s:8d, 1m:35d" {
			t.Errorf("runtimeinfo %+v, %v", ri, err)
		}
		flags, err := prom.Flags(ctx)
		if err != nil || flags["log-level"] != "debug" {
			t.Errorf("flags %v, %v; want those the node was started with", flags, err)
		}
	})
	t.Run("nothing scraped, nothing notified", func(t *testing.T) {
		targets, err := prom.Targets(ctx)
		if err != nil || targets.Active == nil || len(targets.Active) != 0 || targets.Dropped == nil || len(targets.Dropped) != 0 {
			t.Errorf("targets %+v, %v; want empty lists", targets, err)
		}
		md, err := prom.TargetsMetadata(ctx, `{job="x"}`, "", "")
		if err != nil || md == nil || len(md) != 0 {
			t.Errorf("targets metadata %+v, %v; want []", md, err)
		}
		ams, err := prom.AlertManagers(ctx)
		if err != nil || ams.Active == nil || len(ams.Active) != 0 || ams.Dropped == nil || len(ams.Dropped) != 0 {
			t.Errorf("alertmanagers %+v, %v; want empty lists", ams, err)
		}
	})
	t.Run("not served", func(t *testing.T) {
		for name, call := range map[string]func() error{
			"config":           func() error { _, err := prom.Config(ctx); return err },
			"tsdb":             func() error { _, err := prom.TSDB(ctx); return err },
			"tsdb blocks":      func() error { _, err := prom.TSDBBlocks(ctx); return err },
			"wal replay":       func() error { _, err := prom.WalReplay(ctx); return err },
			"snapshot":         func() error { _, err := prom.Snapshot(ctx, false); return err },
			"delete series":    func() error { return prom.DeleteSeries(ctx, []string{"requests_total"}, start, end) },
			"clean tombstones": func() error { return prom.CleanTombstones(ctx) },
		} {
			var apiErr *v1.Error
			if err := call(); !errors.As(err, &apiErr) || apiErr.Type != v1.ErrClient || apiErr.Msg != "client error: 404" ||
				!strings.Contains(apiErr.Detail, `"status":"error","errorType":"not_found","error":"dimsum does not serve /api/v1/`) {
				t.Errorf("%s: %v; want a 404 not_found in the error envelope", name, err)
			}
		}
	})
}

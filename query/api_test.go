package query

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestParseTime(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Time
		ok   bool
	}{
		{"1700000000", time.Unix(1700000000, 0), true},
		{"1700000000.123", time.Unix(1700000000, 123_000_000), true},
		{"-1.5", time.Unix(-2, 500_000_000), true},
		{"1700000000123", time.Unix(1700000000, 123_000_000), true},
		{"-1700000000000", time.Unix(-1700000000, 0), true},
		{"2023-11-14T22:13:20Z", time.Unix(1700000000, 0), true},
		{"2023-11-14T23:13:20.5+01:00", time.Unix(1700000000, 500_000_000), true},
		{"", time.Time{}, false},
		{"NaN", time.Time{}, false},
		{"Inf", time.Time{}, false},
		{"1e300", time.Time{}, false},
		{"yesterday", time.Time{}, false},
	} {
		got, err := parseTime(tc.in)
		if (err == nil) != tc.ok || (tc.ok && !got.Equal(tc.want)) {
			t.Errorf("parseTime(%q) = %v, %v; want %v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"15", 15 * time.Second, true},
		{"0.5", 500 * time.Millisecond, true},
		{"5m", 5 * time.Minute, true},
		{"1h30m", 90 * time.Minute, true},
		{"", 0, false},
		{"1e30", 0, false},
		{"NaN", 0, false},
		{"5 minutes", 0, false},
	} {
		got, err := parseDuration(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseDuration(%q) = %v, %v; want %v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// FuzzParseTime checks that no input panics and that a numeric timestamp
// that parses lands within a second of the number.
func FuzzParseTime(f *testing.F) {
	for _, s := range []string{"1700000000.5", "2023-11-14T22:13:20Z", "-9e18", "NaN", "1e19", "5m"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ts, err := parseTime(s)
		x, ferr := strconv.ParseFloat(s, 64)
		if math.Abs(x) >= msThreshold {
			x /= 1000
		}
		if err == nil && ferr == nil && math.Abs(float64(ts.Unix())-x) > 1 {
			t.Fatalf("parseTime(%q) = %v", s, ts)
		}
		if d, err := parseDuration(s); err == nil && d < 0 && !strings.HasPrefix(strings.TrimSpace(s), "-") {
			t.Fatalf("parseDuration(%q) = %v", s, d)
		}
	})
}

// TestStorageErrorIsInternal checks that a failing store is reported as an
// internal error (HTTP 500), not as a problem with the query.
func TestStorageErrorIsInternal(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	now := time.Now()
	put(t, db, s, "a", now.UnixMilli()-20_000, 1)
	srv := httptest.NewServer(apiMux(t, Options{Schema: s, Reader: db}))
	defer srv.Close()
	db.Close()
	resp, err := http.Get(srv.URL + "/api/v1/query?query=x_delta")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct{ Status, ErrorType, Error string }
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusInternalServerError || r.ErrorType != "internal" || !strings.Contains(r.Error, "closed") {
		t.Errorf("HTTP %d %s %q, want 500 internal naming the closed store", resp.StatusCode, r.ErrorType, r.Error)
	}
}

// TestQueryLimitsAndCancel checks the per-query series limit (an execution
// error, 422) and a request canceled by its client (499).
func TestQueryLimitsAndCancel(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	now := time.Now()
	for _, h := range []string{"a", "b", "c"} {
		put(t, db, s, h, now.UnixMilli()-20_000, 1)
	}
	mux := apiMux(t, Options{Schema: s, Reader: db, MaxSeries: 2})
	call := func(ctx context.Context, query string) (int, string, string) {
		rec := httptest.NewRecorder()
		req := httptest.NewRequestWithContext(ctx, http.MethodGet, "/api/v1/query?query="+url.QueryEscape(query), nil)
		mux.ServeHTTP(rec, req)
		var r struct{ ErrorType, Error string }
		if err := json.NewDecoder(rec.Body).Decode(&r); err != nil {
			t.Fatal(err)
		}
		return rec.Code, r.ErrorType, r.Error
	}
	if code, typ, msg := call(context.Background(), `x_delta{host!="c"}`); code != http.StatusOK {
		t.Errorf("two series: HTTP %d %s %s", code, typ, msg)
	}
	if code, typ, msg := call(context.Background(), `x_delta`); code != http.StatusUnprocessableEntity || typ != "execution" || !strings.Contains(msg, "more than 2 series") {
		t.Errorf("three series: HTTP %d %s %q, want 422 execution naming the limit", code, typ, msg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if code, typ, _ := call(ctx, `x_delta`); code != 499 || typ != "canceled" {
		t.Errorf("canceled: HTTP %d %s, want 499 canceled", code, typ)
	}
}

// TestPartialResponseParameter checks that every endpoint that reads the
// cube takes partial_response, and refuses a value that is not a boolean.
func TestPartialResponseParameter(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	now := time.Now()
	put(t, db, s, "a", now.UnixMilli()-20_000, 1)
	mux := apiMux(t, Options{Schema: s, Reader: db})
	start, end := fmt.Sprint(now.Add(-time.Hour).Unix()), fmt.Sprint(now.Unix())
	for _, path := range []string{
		"/api/v1/query?query=x_delta",
		"/api/v1/query_range?query=x_delta&step=60&start=" + start + "&end=" + end,
		"/api/v1/series?match[]=x_delta",
		"/api/v1/labels?",
		"/api/v1/label/host/values?",
		"/api/v1/cube/slice?family=x",
		"/api/v1/cube/drilldown?family=x&dimension=host&value=a",
	} {
		for _, v := range []string{"true", "false", "1", "0"} {
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path+"&partial_response="+v, nil))
			if rec.Code != http.StatusOK && !strings.Contains(path, "drilldown") {
				t.Errorf("%s with %s: HTTP %d %s", path, v, rec.Code, rec.Body)
			}
		}
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path+"&partial_response=maybe", nil))
		var r struct{ ErrorType, Error string }
		if err := json.NewDecoder(rec.Body).Decode(&r); err != nil {
			t.Fatal(err)
		}
		if rec.Code != http.StatusBadRequest || r.ErrorType != "bad_data" || !strings.Contains(r.Error, `invalid parameter "partial_response": want true or false, got "maybe"`) {
			t.Errorf("%s: HTTP %d %s %q, want 400 bad_data naming the parameter", path, rec.Code, r.ErrorType, r.Error)
		}
	}
}

// TestEnvelopeAsPrometheus checks the JSON where Prometheus' own answer has
// a shape a script relies on: empty lists as [] (never null), a refused
// method with 405 and one of Prometheus' error types, OPTIONS answered, and
// a path no endpoint serves answered 404 not_found in the envelope.
func TestEnvelopeAsPrometheus(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	now := time.Now()
	put(t, db, s, "a", now.UnixMilli()-20_000, 1)
	mux := apiMux(t, Options{Schema: s, Reader: db})
	call := func(method, target string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(method, target, nil))
		return rec
	}
	start, end := fmt.Sprint(now.Add(-time.Hour).Unix()), fmt.Sprint(now.Unix())
	for _, tc := range []struct{ target, want string }{
		{"/api/v1/query_range?query=sum(rate(x_total{host=%22none%22}[5m]))&step=60&start=" + start + "&end=" + end, `"data":{"resultType":"matrix","result":[]}`},
		{"/api/v1/query?query=sum(x_delta{host=%22none%22})", `"data":{"resultType":"vector","result":[]}`},
		{"/api/v1/label/nolabel/values", `"data":[]`},
		{"/api/v1/labels?match[]=nometric", `"data":[]`},
		{"/api/v1/label/host/values?match[]=x_delta{host=%22none%22}", `"data":[]`},
		{"/api/v1/series?match[]=nometric", `"data":[]`},
		{"/api/v1/targets", `"data":{"activeTargets":[],"droppedTargetCounts":{},"droppedTargets":[]}`},
		{"/api/v1/targets/metadata", `"data":[]`},
		{"/api/v1/alertmanagers", `"data":{"activeAlertmanagers":[],"droppedAlertmanagers":[]}`},
		{"/api/v1/status/flags", `"data":{}`},
	} {
		rec := call(http.MethodGet, tc.target)
		if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), tc.want) {
			t.Errorf("GET %s: HTTP %d %s, want 200 with %s", tc.target, rec.Code, rec.Body, tc.want)
		}
	}
	for _, path := range []string{"/api/v1/query?query=1", "/api/v1/labels", "/api/v1/cube/slice?family=x"} {
		for _, method := range []string{http.MethodDelete, http.MethodPut, http.MethodPatch} {
			rec := call(method, path)
			var r struct{ Status, ErrorType, Error string }
			if err := json.NewDecoder(rec.Body).Decode(&r); err != nil {
				t.Fatal(err)
			}
			if rec.Code != http.StatusMethodNotAllowed || r.ErrorType != "bad_data" || rec.Header().Get("Allow") != "GET, POST, OPTIONS" || !strings.Contains(r.Error, "method "+method+" is not allowed") {
				t.Errorf("%s %s: HTTP %d %s %q, Allow %q; want 405 bad_data naming the method", method, path, rec.Code, r.ErrorType, r.Error, rec.Header().Get("Allow"))
			}
		}
		if rec := call(http.MethodOptions, path); rec.Code != http.StatusOK || strings.TrimSpace(rec.Body.String()) != `{"status":"success"}` || rec.Header().Get("Allow") == "" {
			t.Errorf("OPTIONS %s: HTTP %d %s", path, rec.Code, rec.Body)
		}
	}
	for _, path := range []string{"/api/v1/status/config", "/api/v1/status/tsdb", "/api/v1/admin/tsdb/snapshot", "/api/v1/nothing"} {
		rec := call(http.MethodGet, path)
		if rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), `"errorType":"not_found","error":"dimsum does not serve `+path) {
			t.Errorf("GET %s: HTTP %d %s, want 404 not_found", path, rec.Code, rec.Body)
		}
	}
}

package query

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/promql/parser"
)

// TestQueryBounds checks that match[] selecting every series, an
// expression over the length limit and one nesting too deep are refused
// with 400 bad_data naming what is wrong, and that 50,000 nested
// parentheses, which once cost 15.7 s of parsing, are refused at once.
func TestQueryBounds(t *testing.T) {
	s := testSchema(t)
	db := openStore(t, s)
	put(t, db, s, "a", time.Now().UnixMilli()-20_000, 1)
	mux := apiMux(t, Options{Schema: s, Reader: db, MaxQueryLength: 100, MaxQueryDepth: 4})
	f := func(path string, p url.Values, code int, msg string) {
		t.Helper()
		rec := httptest.NewRecorder()
		start := time.Now()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path+"?"+p.Encode(), nil))
		took := time.Since(start)
		var r struct{ ErrorType, Error string }
		if err := json.NewDecoder(rec.Body).Decode(&r); err != nil {
			t.Fatal(err)
		}
		if rec.Code != code || !strings.Contains(r.Error, msg) {
			t.Errorf("%s %v: HTTP %d %s %q, want %d naming %q", path, p, rec.Code, r.ErrorType, r.Error, code, msg)
		}
		if code == http.StatusBadRequest && (r.ErrorType != "bad_data" || took > 5*time.Second) {
			t.Errorf("%s %v: %s after %v, want bad_data at once", path, p, r.ErrorType, took)
		}
	}
	for _, path := range []string{"/api/v1/series", "/api/v1/labels", "/api/v1/label/host/values"} {
		for _, m := range []string{`{}`, `{host=""}`, `{host=~".*"}`, `{host!="a"}`} {
			f(path, url.Values{"match[]": {"x_delta", m}}, http.StatusBadRequest, "would read every series")
		}
		f(path, url.Values{"match[]": {`{host=~".+"}`}}, http.StatusOK, "")
		f(path, url.Values{"match[]": {`x_delta{host=~"` + strings.Repeat("a|", 60) + `"}`}}, http.StatusBadRequest, "the limit is 100")
	}
	f("/api/v1/query", url.Values{"query": {"x_delta"}}, http.StatusOK, "")
	f("/api/v1/query", url.Values{"query": {"sum(rate(x_total[1m]))"}}, http.StatusOK, "")
	f("/api/v1/query", url.Values{"query": {"sum(sum(sum(sum(sum(x_delta)))))"}}, http.StatusBadRequest, "nest 5 deep, the limit is 4")
	f("/api/v1/query", url.Values{"query": {`x_delta{host="((((("}`}}, http.StatusOK, "")
	f("/api/v1/query", url.Values{"query": {strings.Repeat("1+", 60) + "1"}}, http.StatusBadRequest, "121 bytes, the limit is 100")
	f("/api/v1/query_range", url.Values{"query": {strings.Repeat("(", 6) + "1" + strings.Repeat(")", 6)}, "start": {"0"}, "end": {"60"}, "step": {"15"}}, http.StatusBadRequest, "limit is 4")
	f("/api/v1/format_query", url.Values{"query": {strings.Repeat("-", 200) + "1"}}, http.StatusBadRequest, "the limit is 100")

	deep := apiMux(t, Options{Schema: s, Reader: db, MaxQueryLength: 1 << 20})
	rec := httptest.NewRecorder()
	start := time.Now()
	q := strings.Repeat("(", 50_000) + "1" + strings.Repeat(")", 50_000)
	req := httptest.NewRequest(http.MethodPost, "/api/v1/query", strings.NewReader(url.Values{"query": {q}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	deep.ServeHTTP(rec, req)
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "brackets nest 50000 deep, the limit is 64") || time.Since(start) > 5*time.Second {
		t.Errorf("50,000 nested parentheses: HTTP %d %s after %v, want 400 at once", rec.Code, rec.Body, time.Since(start))
	}
}

// FuzzNesting checks that nesting never panics and never reports less
// than the parentheses nesting of an expression the PromQL parser takes,
// so that the bound cannot be dodged.
func FuzzNesting(f *testing.F) {
	for _, s := range []string{
		`sum by (dc) (rate(x_total{host=~"a(b"}[5m]))`, "((1))", `"\"("`, "`(`", "# (((\n1", `x{a='(\''}`, "{", "((((", ")))",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, q string) {
		d := nesting(q)
		expr, err := promqlParser.ParseExpr(q)
		if err != nil {
			return
		}
		deepest := 0
		var walk func(parser.Node, int)
		walk = func(n parser.Node, depth int) {
			if _, ok := n.(*parser.ParenExpr); ok {
				depth++
			}
			deepest = max(deepest, depth)
			for _, c := range parser.Children(n) {
				walk(c, depth)
			}
		}
		walk(expr, 0)
		if d < deepest {
			t.Fatalf("nesting(%q) = %d, but the parsed expression nests %d parentheses", q, d, deepest)
		}
	})
}

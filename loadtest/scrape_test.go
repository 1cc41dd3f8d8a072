package loadtest

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestScrape checks that the report reads the metrics it takes, labelled or
// not, and that a malformed line of a taken metric is an error naming it,
// not a crash.
func TestScrape(t *testing.T) {
	body := ""
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte(body))
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")

	body = `# HELP dimsum_aggregator_events_accepted_total Accepted events.
dimsum_aggregator_events_accepted_total 12
dimsum_aggregator_events_late_total{reason="a b}c"} 3 1700000000000
dimsum_aggregator_events_late_total{reason="other"} 4
go_memstats_heap_inuse_bytes 1.5e+06
dimsum_other_total 99
`
	s, err := scrapeAll(context.Background(), []string{addr})
	if err != nil {
		t.Fatal(err)
	}
	if s.Accepted != 12 || s.Late != 7 || s.HeapBytes != 1_500_000 || s.aggregators != 1 {
		t.Errorf("scraped %+v", s)
	}

	for _, line := range []string{
		"dimsum_aggregator_events_accepted_total",
		"dimsum_aggregator_events_accepted_total ",
		`dimsum_aggregator_events_late_total{reason="x" 3`,
		`dimsum_aggregator_events_late_total{reason="x"}`,
		"dimsum_aggregator_live_cells many",
	} {
		body = line + "\n"
		if _, err := scrapeAll(context.Background(), []string{addr}); err == nil || !strings.Contains(err.Error(), "cannot read") {
			t.Errorf("%q: err %v, want one naming the line", line, err)
		}
	}
}

package loadtest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
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

// TestSettleSkipsDeadMembers checks that settle, before a verified run,
// waits for an aggregator the cluster lists as alive but that does not
// answer, skips it once the cluster lists it as dead, and does not wait for
// what the others hold for it.
func TestSettleSkipsDeadMembers(t *testing.T) {
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	goneAddr := gone.Addr().String()
	gone.Close() // a member killed: its port refuses
	var statusCalls atomic.Int32
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/v1/status/cluster":
			b := "alive"
			if statusCalls.Add(1) > 2 {
				b = "dead"
			}
			fmt.Fprintf(w, `{"status":"success","data":{"clustered":true,"members":[
				{"name":"a","roles":["aggregator"],"state":"alive","http":%q},
				{"name":"b","roles":["aggregator"],"state":%q,"http":%q}]}}`, strings.TrimPrefix(srv.URL, "http://"), b, goneAddr)
		case "/metrics":
			fmt.Fprint(w, "dimsum_aggregator_events_accepted_total 1\n"+
				"dimsum_aggregator_live_cells 0\n"+
				`dimsum_aggregator_handoff_pending_requests{replica="b"} 5`+"\n")
		}
	}))
	defer srv.Close()
	var out strings.Builder
	opts := Options{HTTPAddrs: []string{strings.TrimPrefix(srv.URL, "http://")}, VerifyTimeout: 10 * time.Second, Progress: &out}
	if err := settle(context.Background(), opts, newProgress(opts)); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if statusCalls.Load() <= 2 {
		t.Fatalf("settled after %d reads of the status, before b was listed as dead:\n%s", statusCalls.Load(), out.String())
	}
	for _, want := range []string{
		"an aggregator the cluster lists as alive does not answer (loadtest: Get \"http://" + goneAddr + "/metrics\"",
		"5 flushes and forwarded batches wait for b, which the cluster lists as dead",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("progress does not say %q:\n%s", want, out.String())
		}
	}

	// A member that never gets listed as dead fails the wait, saying why.
	statusCalls.Store(-1 << 30)
	opts.VerifyTimeout = time.Second
	err = settle(context.Background(), opts, nil)
	if err == nil || !strings.Contains(err.Error(), "the cluster still lists as alive a member that does not answer") {
		t.Errorf("settle with a silent alive member: %v", err)
	}
}

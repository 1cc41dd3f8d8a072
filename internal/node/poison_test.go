package node

import (
	"context"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// pushBatch pushes one batch over gRPC to a node's public address.
func pushBatch(t *testing.T, addr string, req *wirepb.PushRequest, opts ...grpc.DialOption) (*wirepb.PushResponse, error) {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+addr, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return wirepb.NewIngestClient(conn).Push(ctx, req, grpc.MaxCallSendMsgSize(math.MaxInt32))
}

// addRequest adds one event of the default family for host to b.
func addRequest(b *wire.Batch, ts int64, value float64, host string) {
	b.Add("requests", ts, value, "datacenter", "dc1", "cluster", "c1", "host", host, "transaction", "checkout", "status", "200")
}

// waitTotal polls the node until sum(sum_over_time(requests_delta[1h]))
// at at is want.
func waitTotal(t *testing.T, n *Node, at time.Time, want float64) {
	t.Helper()
	const q = "sum(sum_over_time(requests_delta[1h]))"
	waitFor(t, q+" to reach "+strconv.FormatFloat(want, 'g', -1, 64), func() bool { return vector(t, n.HTTPAddr(), q, at, "")[""] == want })
}

// TestPoisonedEventsRefused pushes, beside good events, one with a label
// value of 1 MiB and one of value MaxFloat64 into a real node, and checks
// that each is rejected with its reason and that every kind of query that
// either once broke for the family still answers: a huge label made every
// query touching its series fail with a slice-bounds panic, and MaxFloat64
// made sum(rate()) NaN.
func TestPoisonedEventsRefused(t *testing.T) {
	n, err := Start(testConfig(t.TempDir()), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	now := time.Now()
	var b wire.Batch
	addRequest(&b, now.UnixMilli(), 1, "h1")
	addRequest(&b, now.UnixMilli(), 1, strings.Repeat("h", 1<<20))
	addRequest(&b, now.UnixMilli(), math.MaxFloat64, "h2")
	addRequest(&b, now.UnixMilli(), 2, "h2")
	resp, err := pushBatch(t, n.GRPCAddr(), b.Request())
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint32]wirepb.RejectReason{1: wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG, 2: wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE}
	if resp.Accepted != 2 || len(resp.Rejects) != len(want) {
		t.Fatalf("accepted %d, rejects %v; want events 1 and 2 rejected", resp.Accepted, resp.Rejects)
	}
	for _, r := range resp.Rejects {
		if want[r.Index] != r.Reason || len(r.Detail) > 200 {
			t.Errorf("reject %d: %v (%.200q), want %v with a short detail", r.Index, r.Reason, r.Detail, want[r.Index])
		}
	}

	at := now.Truncate(time.Minute).Add(time.Minute)
	waitTotal(t, n, at, 3)
	ts := strconv.FormatInt(at.Unix(), 10)
	for _, q := range []string{
		`sum by (host) (sum_over_time(requests_delta[1h]))`,
		`label_replace(requests_delta, "h", "$1", "host", "(.*)")`,
		`requests_delta[1h]`,
		`sum(rate(requests_total[5m]))`,
		`max_over_time(sum(rate(requests_total[1m]))[1h:1m])`,
	} {
		code, r := get(t, n.HTTPAddr(), "/api/v1/query", url.Values{"query": {q}, "time": {ts}})
		if code != http.StatusOK || r.Status != "success" || strings.Contains(string(r.Data), "NaN") || strings.Contains(string(r.Data), "Inf") {
			t.Errorf("%s: HTTP %d %s: %s %.300s", q, code, r.ErrorType, r.Error, r.Data)
		}
	}
	code, r := get(t, n.HTTPAddr(), "/api/v1/series", url.Values{"match[]": {"requests_total"}})
	if code != http.StatusOK || r.Status != "success" || !strings.Contains(string(r.Data), `"h2"`) {
		t.Errorf("series: HTTP %d %s: %s %.300s", code, r.ErrorType, r.Error, r.Data)
	}
}

// TestQueriesOfEverythingRefused asks a real node, over HTTP, for series
// with match[]={} (every series of the store, which Prometheus refuses
// with 400) and for an expression of 50,000 nested parentheses (15.7 s of
// parsing), and wants both refused with 400 bad_data.
func TestQueriesOfEverythingRefused(t *testing.T) {
	n, err := Start(testConfig(t.TempDir()), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	for _, c := range []struct {
		path   string
		params url.Values
		msg    string
	}{
		{"/api/v1/series", url.Values{"match[]": {"{}"}}, "would read every series"},
		{"/api/v1/labels", url.Values{"match[]": {`{host=~".*"}`}}, "would read every series"},
		{"/api/v1/query", url.Values{"query": {strings.Repeat("(", 50_000) + "1" + strings.Repeat(")", 50_000)}}, "bytes, the limit is 16384"},
		{"/api/v1/query", url.Values{"query": {strings.Repeat("(", 100) + "1" + strings.Repeat(")", 100)}}, "brackets nest 100 deep, the limit is 64"},
	} {
		start := time.Now()
		code, r := get(t, n.HTTPAddr(), c.path, c.params)
		if code != http.StatusBadRequest || r.ErrorType != "bad_data" || !strings.Contains(r.Error, c.msg) || time.Since(start) > 5*time.Second {
			t.Errorf("%s %.60v: HTTP %d %s %q after %v, want 400 bad_data naming %q", c.path, c.params, code, r.ErrorType, r.Error, time.Since(start), c.msg)
		}
	}
}

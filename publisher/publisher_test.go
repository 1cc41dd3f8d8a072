package publisher_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/internal/node"
	"github.com/dimsum/dimsum/publisher"
	"github.com/dimsum/dimsum/wire/wirepb"
)

func values(from, to int) []float64 {
	var vs []float64
	for v := from; v <= to; v++ {
		vs = append(vs, float64(v))
	}
	return vs
}

// TestPolicies fills the buffer of a publisher whose only node is stalled
// and checks, for each policy, exactly which events were dropped and which
// were sent once the node answers.
func TestPolicies(t *testing.T) {
	for _, tc := range []struct {
		policy  publisher.Policy
		sent    []float64
		dropped uint64
	}{
		// Batch 1..5 is stuck in flight, 6..15 fill the buffer of 10, and
		// 16..20 arrive while it is full.
		{publisher.DropTail, values(1, 15), 5},
		{publisher.DropHead, append(values(1, 5), values(11, 20)...), 5},
		{publisher.Block, values(1, 20), 0},
	} {
		t.Run(tc.policy.String(), func(t *testing.T) {
			srv := newStalled()
			reg := prometheus.NewRegistry()
			p, err := publisher.New(publisher.Options{
				Addrs:        []string{serve(t, srv, grpc.StatsHandler(srv))},
				BatchEvents:  5,
				BufferEvents: 10,
				InFlight:     1,
				Linger:       time.Hour, // only full batches, until Close
				Policy:       tc.policy,
				Registerer:   reg,
			})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			for v := 1; v <= 5; v++ {
				if err := p.Add(ctx, event(float64(v))); err != nil {
					t.Fatal(err)
				}
			}
			if n := <-srv.arrived; n != 5 {
				t.Fatalf("first batch of %d events, want 5", n)
			}
			last := 20
			if tc.policy == publisher.Block {
				last = 15
			}
			for v := 6; v <= last; v++ {
				if err := p.Add(ctx, event(float64(v))); err != nil {
					t.Fatal(err)
				}
			}
			if s := p.Stats(); s.Buffered != 10 || s.Added != uint64(last) || s.Dropped["buffer_full"] != tc.dropped {
				t.Fatalf("while stalled: %+v", s)
			}
			var added sync.WaitGroup
			if tc.policy == publisher.Block {
				// The buffer is full: an Add waits, and gives up when
				// its context ends.
				cctx, cancel := context.WithCancel(ctx)
				cancel()
				if err := p.Add(cctx, event(16)); !errors.Is(err, context.Canceled) {
					t.Fatalf("Add to a full buffer with a cancelled context: %v", err)
				}
				added.Go(func() {
					if err := p.Add(ctx, event(16), event(17), event(18), event(19), event(20)); err != nil {
						t.Error(err)
					}
				})
			}
			close(srv.release)
			added.Wait()
			if err := p.Close(ctx); err != nil {
				t.Fatal(err)
			}

			srv.mu.Lock()
			got := slices.Sorted(slices.Values(srv.mu.values))
			encodings := srv.mu.encodings
			srv.mu.Unlock()
			if !slices.Equal(got, tc.sent) {
				t.Errorf("the node got %v, want %v", got, tc.sent)
			}
			if len(encodings) != len(tc.sent)/5 {
				t.Errorf("%d requests seen, want %d", len(encodings), len(tc.sent)/5)
			}
			for _, e := range encodings {
				if e != "gzip" {
					t.Errorf("a batch came with encoding %q, want gzip", e)
				}
			}
			s := p.Stats()
			if s.Added != 20 || s.Sent != uint64(len(tc.sent)) || s.Dropped["buffer_full"] != tc.dropped || len(s.Dropped) > min(1, int(tc.dropped)) || s.Buffered != 0 {
				t.Errorf("stats %+v", s)
			}
			if got := metric(t, reg, "dimsum_publisher_events_dropped_total", "buffer_full"); got != float64(tc.dropped) {
				t.Errorf("dropped metric %v, want %d", got, tc.dropped)
			}
			if got := metric(t, reg, "dimsum_publisher_events_sent_total", ""); got != float64(len(tc.sent)) {
				t.Errorf("sent metric %v, want %d", got, len(tc.sent))
			}
			if err := p.Add(ctx, event(21)); !errors.Is(err, publisher.ErrClosed) {
				t.Errorf("Add after Close: %v", err)
			}
		})
	}
}

// lossy forwards pushes to a node but drops the reply of the first one, as
// a connection cut after the node counted the batch would.
type lossy struct {
	wirepb.UnimplementedIngestServer
	next wirepb.IngestClient

	mu    sync.Mutex
	calls int
}

func (l *lossy) Push(ctx context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	resp, err := l.next.Push(ctx, req)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls++
	if err == nil && l.calls == 1 {
		return nil, status.Error(codes.Unavailable, "reply lost")
	}
	return resp, err
}

// TestRetryWithoutDuplication pushes one batch through a proxy that loses
// the node's first reply: the publisher retries, and the node counts the
// batch once.
func TestRetryWithoutDuplication(t *testing.T) {
	n := startNode(t, node.AggregatorConfig{})
	conn, err := grpcClient(n.GRPCAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	proxy := &lossy{next: wirepb.NewIngestClient(conn)}
	var results []publisher.Result
	p, err := publisher.New(publisher.Options{
		Addrs:        []string{serve(t, proxy)},
		InFlight:     1,
		Linger:       time.Hour,
		RetryBackoff: time.Millisecond,
		OnResult:     func(r *publisher.Result) { results = append(results, *r) },
	})
	if err != nil {
		t.Fatal(err)
	}
	want := 0.0
	for v := 1; v <= 100; v++ {
		if err := p.Add(context.Background(), event(float64(v))); err != nil {
			t.Fatal(err)
		}
		want += float64(v)
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.Sent != 100 || s.Retries != 1 || s.Duplicates != 1 || s.Batches != 1 {
		t.Errorf("stats %+v, want 100 sent in one batch after one retry, acknowledged as a duplicate", s)
	}
	if len(results) != 1 || !results[0].Duplicate || results[0].Accepted != 100 || results[0].Err != nil {
		t.Errorf("results %+v", results)
	}
	if proxy.calls != 2 {
		t.Errorf("the node was pushed %d times, want 2", proxy.calls)
	}
	if got := nodeTotal(t, n); got != want {
		t.Errorf("the node holds a total of %v, want %v", got, want)
	}
	if got := nodeMetric(t, n, "dimsum_aggregator_events_accepted_total", ""); got != 100 {
		t.Errorf("the node counted %v events, want 100", got)
	}
}

// TestFailover gives the publisher a dead node first: every batch goes to
// the second, and Close sends what lingers.
func TestFailover(t *testing.T) {
	n := startNode(t, node.AggregatorConfig{})
	p, err := publisher.New(publisher.Options{
		Addrs:        []string{freeAddr(t), n.GRPCAddr()},
		BatchEvents:  40,
		InFlight:     1,
		Linger:       time.Hour,
		RetryBackoff: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	for v := range 100 {
		if err := p.Add(context.Background(), event(float64(v%3+1))); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := p.Stats()
	if s.Sent != 100 || s.Batches != 3 || s.Failovers != 1 || s.Retries != 1 {
		t.Errorf("stats %+v, want 100 events in 3 batches after one failover", s)
	}
	if got := nodeMetric(t, n, "dimsum_aggregator_events_accepted_total", ""); got != 100 {
		t.Errorf("the second node counted %v events, want 100", got)
	}
	if got := nodeTotal(t, n); got != 199 {
		t.Errorf("the second node holds %v, want 199", got)
	}
}

// TestRetryWhenLogFull gives the publisher first a node whose write-ahead
// log is over its limit: its ResourceExhausted is back-pressure, not a
// message over the size limit, so the batch is retried on the next node
// rather than dropped as failed.
func TestRetryWhenLogFull(t *testing.T) {
	full := startNode(t, node.AggregatorConfig{WALMaxBytes: 1})
	n := startNode(t, node.AggregatorConfig{})
	p, err := publisher.New(publisher.Options{
		Addrs:        []string{full.GRPCAddr(), n.GRPCAddr()},
		BatchEvents:  10,
		InFlight:     1,
		Linger:       time.Hour,
		RetryBackoff: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if err := p.Add(context.Background(), event(1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.Sent != 10 || s.Dropped["failed"] != 0 || s.Failovers != 1 || s.Retries != 1 || s.Backpressured != 1 {
		t.Errorf("stats %+v, want 10 events sent after one retry on the next node, asked for by the first", s)
	}
	if got := nodeMetric(t, full, "dimsum_aggregator_batches_backpressured_total", `reason="log_full"`); got != 1 {
		t.Errorf("the full node refused %v batches, want 1", got)
	}
	if got := nodeMetric(t, n, "dimsum_aggregator_events_accepted_total", ""); got != 10 {
		t.Errorf("the second node counted %v events, want 10", got)
	}
}

// TestFailoverWhenLogFails gives the publisher first a node whose
// write-ahead log cannot write: it cannot create its next segment file (a
// directory stands at its name), as when its filesystem turns read-only or
// fills. The node answers Unavailable, not Internal as it once did, which
// made the publisher drop the batch as failed: the batch goes to the next
// node instead, and the failed node says it is unhealthy, and why.
func TestFailoverWhenLogFails(t *testing.T) {
	dir := t.TempDir()
	broken := startNodeIn(t, dir, node.AggregatorConfig{WALSegmentBytes: 512})
	if err := os.Mkdir(filepath.Join(dir, "wal", "0000000000000002.wal"), 0o755); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, node.AggregatorConfig{})
	p, err := publisher.New(publisher.Options{
		Addrs:        []string{broken.GRPCAddr(), n.GRPCAddr()},
		BatchEvents:  100,
		InFlight:     1,
		Linger:       time.Hour,
		RetryBackoff: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		labels := slices.Clone(requestLabels)
		labels[5] = fmt.Sprintf("h%d", i) // distinct hosts: a record over the segment size
		if err := p.Add(context.Background(), publisher.Event{Family: "requests", TimestampMS: time.Now().UnixMilli(), Value: 1, Labels: labels}); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.Sent != 100 || s.Dropped["failed"] != 0 || s.Failovers != 1 {
		t.Errorf("stats %+v, want 100 events sent after failing over once", s)
	}
	if got := nodeMetric(t, n, "dimsum_aggregator_events_accepted_total", ""); got != 100 {
		t.Errorf("the second node counted %v events, want 100", got)
	}
	resp, err := http.Get("http://" + broken.HTTPAddr() + "/-/healthy")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "write-ahead log failed") {
		t.Errorf("the node whose log failed: HTTP %d %q, want 503 saying why", resp.StatusCode, body)
	}
}

// TestNoRetryOfInvalid pushes events the node rejects one by one and a batch
// it refuses whole, and checks that none of them is pushed twice.
func TestNoRetryOfInvalid(t *testing.T) {
	n := startNode(t, node.AggregatorConfig{MaxBatchEvents: 10}) // batches of more than 10 events are refused
	reg := prometheus.NewRegistry()
	var (
		mu      sync.Mutex
		results []publisher.Result
	)
	p, err := publisher.New(publisher.Options{
		Addrs:        []string{n.GRPCAddr()},
		BatchEvents:  10,
		InFlight:     1,
		Linger:       time.Hour,
		RetryBackoff: time.Millisecond,
		Registerer:   reg,
		OnResult: func(r *publisher.Result) {
			mu.Lock()
			defer mu.Unlock()
			results = append(results, *r)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// A batch of 10: 7 good, 2 negative, 1 of an unknown family.
	for i := range 10 {
		ev := event(1)
		switch i {
		case 2, 5:
			ev.Value = -1
		case 7:
			ev.Family = "nosuch"
		}
		if err := p.Add(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// A second publisher whose batches are larger than the node takes.
	big, err := publisher.New(publisher.Options{Addrs: []string{n.GRPCAddr()}, BatchEvents: 11, InFlight: 1, Linger: time.Hour, RetryBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for range 11 {
		if err := big.Add(ctx, event(1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := big.Close(ctx); err != nil {
		t.Fatal(err)
	}

	s := p.Stats()
	if s.Sent != 7 || s.Rejected["negative_delta"] != 2 || s.Rejected["unknown_family"] != 1 || s.Retries != 0 {
		t.Errorf("stats %+v", s)
	}
	if got := metric(t, reg, "dimsum_publisher_events_rejected_total", "negative_delta"); got != 2 {
		t.Errorf("rejected metric %v, want 2", got)
	}
	if len(results) != 1 || len(results[0].Rejects) != 3 || results[0].Rejects[0].Index != 2 {
		t.Errorf("results %+v", results)
	}
	bs := big.Stats()
	if bs.Sent != 0 || bs.Rejected[publisher.RefusedReason] != 11 || bs.Retries != 0 {
		t.Errorf("stats of the oversized publisher %+v", bs)
	}
	for _, c := range []struct {
		name, label string
		want        float64
	}{
		{"dimsum_aggregator_events_accepted_total", "", 7},
		{"dimsum_aggregator_events_rejected_total", `reason="negative_delta"`, 2},
		{"dimsum_aggregator_events_rejected_total", `reason="unknown_family"`, 1},
		{"dimsum_aggregator_batches_refused_total", "", 1},
	} {
		if got := nodeMetric(t, n, c.name, c.label); got != c.want {
			t.Errorf("node %s{%s} = %v, want %v", c.name, c.label, got, c.want)
		}
	}
}

// TestNoRetryOfOversized pushes a batch larger than the node's message
// limit: gRPC answers ResourceExhausted, which no retry mends, so the batch
// is dropped as failed at once instead of retried until Close's deadline.
func TestNoRetryOfOversized(t *testing.T) {
	srv := newStalled()
	close(srv.release)
	p, err := publisher.New(publisher.Options{
		Addrs:        []string{serve(t, srv, grpc.MaxRecvMsgSize(64))},
		BatchEvents:  10,
		InFlight:     1,
		Linger:       time.Hour,
		Compression:  publisher.None,
		RetryBackoff: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if err := p.Add(context.Background(), event(1)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
	if s := p.Stats(); s.Dropped["failed"] != 10 || s.Retries != 0 || s.Sent != 0 {
		t.Errorf("stats %+v, want 10 events dropped as failed without a retry", s)
	}
	if len(srv.arrived) != 0 {
		t.Errorf("the node took %d batches over its message limit", len(srv.arrived))
	}
}

// TestCloseDeadline closes a publisher whose node never answers: Close
// returns at its deadline and reports every event as unsent.
func TestCloseDeadline(t *testing.T) {
	srv := newStalled()
	t.Cleanup(func() { close(srv.release) })
	var unsent []error
	p, err := publisher.New(publisher.Options{
		Addrs:       []string{serve(t, srv)},
		BatchEvents: 5,
		InFlight:    1,
		Linger:      time.Hour,
		OnResult:    func(r *publisher.Result) { unsent = append(unsent, r.Err) },
	})
	if err != nil {
		t.Fatal(err)
	}
	for v := range 12 {
		if err := p.Add(context.Background(), event(float64(v))); err != nil {
			t.Fatal(err)
		}
	}
	<-srv.arrived // the first batch is in flight, 7 events are buffered
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err = p.Close(ctx)
	if !errors.Is(err, publisher.ErrUnsent) || err.Error() != fmt.Sprintf("%v: 12 events not sent before the deadline (7 of them never left the buffer)", publisher.ErrUnsent) {
		t.Errorf("Close: %v", err)
	}
	if s := p.Stats(); s.Dropped["unsent"] != 12 || s.Sent != 0 || s.Added != 12 {
		t.Errorf("stats %+v", s)
	}
	if len(unsent) != 1 || !errors.Is(unsent[0], publisher.ErrUnsent) {
		t.Errorf("results %v, want the batch in flight reported unsent", unsent)
	}
}

func TestOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts publisher.Options
	}{
		{"no address", publisher.Options{}},
		{"empty address", publisher.Options{Addrs: []string{""}}},
		{"buffer below a batch", publisher.Options{Addrs: []string{"x:1"}, BatchEvents: 10, BufferEvents: 5}},
		{"negative in flight", publisher.Options{Addrs: []string{"x:1"}, InFlight: -1}},
		{"negative linger", publisher.Options{Addrs: []string{"x:1"}, Linger: -time.Second}},
		{"backoffs", publisher.Options{Addrs: []string{"x:1"}, RetryBackoff: time.Second, MaxBackoff: time.Millisecond}},
		{"policy", publisher.Options{Addrs: []string{"x:1"}, Policy: 7}},
		{"compression", publisher.Options{Addrs: []string{"x:1"}, Compression: "zstd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := publisher.New(tc.opts); !errors.Is(err, publisher.ErrOptions) {
				t.Errorf("New: %v, want ErrOptions", err)
			}
		})
	}
	for _, s := range []string{"block", "drop-head", "drop-tail"} {
		if p, err := publisher.ParsePolicy(s); err != nil || p.String() != s {
			t.Errorf("ParsePolicy(%q) = %v, %v", s, p, err)
		}
	}
	if _, err := publisher.ParsePolicy("drop"); !errors.Is(err, publisher.ErrOptions) {
		t.Errorf("ParsePolicy(drop): %v", err)
	}
}

package aggregator_test

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// serve serves h's aggregator on a free port of 127.0.0.1 and returns a
// client of it. The server stops at the end of the test.
func serve(t *testing.T, h *harness) wirepb.IngestClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	h.agg.Register(srv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	conn, err := grpc.NewClient("passthrough:///"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return wirepb.NewIngestClient(conn)
}

func TestGRPCIngest(t *testing.T) {
	h := start(t, aggregator.Options{MaxBatchEvents: 100})
	client := serve(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("mixed batch", func(t *testing.T) {
		ts := h.ms(0)
		var b wire.Batch
		addGood(&b, ts, 1, 0, 0, 0)
		addGood(&b, ts, -1, 0, 0, 0)
		b.Add("nosuch", ts, 1, labels(0, 0, 0)...)
		addGood(&b, ts, 2, 1, 0, 0)
		b.Add(family, ts, 1, labels(0, 0, 0)[:6]...)
		resp, err := client.Push(ctx, b.Request())
		if err != nil {
			t.Fatal(err)
		}
		want := map[uint32]wirepb.RejectReason{
			1: wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA,
			2: wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY,
			4: wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION,
		}
		if resp.Accepted != 2 || len(resp.Rejects) != len(want) {
			t.Fatalf("accepted %d, rejects %v; want 2 and %d", resp.Accepted, resp.Rejects, len(want))
		}
		for i, r := range resp.Rejects {
			if i > 0 && r.Index <= resp.Rejects[i-1].Index {
				t.Errorf("rejects out of index order: %v", resp.Rejects)
			}
			if want[r.Index] != r.Reason || r.Detail == "" {
				t.Errorf("reject %d: %v %q, want %v with a detail", r.Index, r.Reason, r.Detail, want[r.Index])
			}
		}
	})

	t.Run("oversized batch", func(t *testing.T) {
		var b wire.Batch
		for i := range 101 {
			addGood(&b, h.ms(0), 1, i, 0, 0)
		}
		resp, err := client.Push(ctx, b.Request())
		st, _ := status.FromError(err)
		if err == nil || st.Code() != codes.InvalidArgument {
			t.Fatalf("Push of 101 events: %v, %v; want InvalidArgument", resp, err)
		}
		var br *errdetails.BadRequest
		for _, d := range st.Details() {
			if d, ok := d.(*errdetails.BadRequest); ok {
				br = d
			}
		}
		if br == nil || len(br.FieldViolations) != 1 || br.FieldViolations[0].Field != "events" || br.FieldViolations[0].Description == "" {
			t.Fatalf("details %v, want a BadRequest naming the events field", st.Details())
		}
	})

	t.Run("closed", func(t *testing.T) {
		h.close(t)
		var b wire.Batch
		addGood(&b, h.ms(0), 1, 0, 0, 0)
		_, err := client.Push(ctx, b.Request())
		if st, _ := status.FromError(err); st.Code() != codes.Unavailable {
			t.Fatalf("Push after Close: %v, want Unavailable", err)
		}
		if got := h.total(t); got.Sum != 3 || got.Count != 2 {
			t.Errorf("store holds sum %v count %d, want 3 and 2", got.Sum, got.Count)
		}
	})
}

// TestGRPCIngestCallerGone: a batch whose caller gave up while the call
// waited to be served (here held until its deadline passes, as a busy
// server would) is not taken: nothing of it is counted, and its retry is
// not a duplicate.
func TestGRPCIngestCallerGone(t *testing.T) {
	h := start(t, aggregator.Options{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if _, ok := ctx.Deadline(); ok {
			<-ctx.Done()
		}
		return handler(ctx, req)
	}))
	h.agg.Register(srv)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := wirepb.NewIngestClient(conn)

	var b wire.Batch
	addGood(&b, h.ms(0), 1, 0, 0, 0)
	req := b.Request()
	req.Source, req.BatchSeq = "gone", 1
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := client.Push(ctx, req); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a push past its deadline: %v, want DeadlineExceeded", err)
	}
	// The handler ran after the caller left; give it the time to finish.
	srv.GracefulStop()
	if got := h.counter(t, "dimsum_aggregator_events_accepted_total"); got != 0 {
		t.Errorf("%v events of an abandoned batch were counted", got)
	}
	if resp, err := h.agg.Push(req); err != nil || resp.Duplicate || resp.Accepted != 1 {
		t.Errorf("the retry of an abandoned batch: %+v, %v; want it taken, not a duplicate", resp, err)
	}
}

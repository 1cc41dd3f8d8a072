package aggregator_test

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Two deltas each below 2^53 whose sum in one cell passes it: the second is
// rejected, since a sum beyond 2^53 is no longer an exact count, and the
// rest of the window reaches the store. A value beyond 2^53 on its own is
// rejected too, MaxFloat64 among them, which once made every rate() of its
// family NaN.
func TestSumBeyondExactIsRejected(t *testing.T) {
	h := start(t, aggregator.Options{})
	var b wire.Batch
	addGood(&b, h.ms(0), 6e15, 0, 0, 0)
	addGood(&b, h.ms(0), 6e15, 0, 0, 0)
	addGood(&b, h.ms(0), 1, 1, 0, 0) // another cell of the same window
	addGood(&b, h.ms(0), math.MaxFloat64, 2, 0, 0)
	addGood(&b, h.ms(0), 1<<53+2, 2, 0, 0)
	resp := h.push(t, b.Request())
	want := []uint32{1, 3, 4}
	if len(resp.Rejects) != len(want) {
		t.Fatalf("rejects %v, want events %v as too large", resp.Rejects, want)
	}
	for i, r := range resp.Rejects {
		if r.Index != want[i] || r.Reason != wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE || !strings.Contains(r.Detail, "2^53") {
			t.Errorf("reject %v, want event %d as too large", r, want[i])
		}
	}
	h.close(t)
	if errs := h.sink.errors(); len(errs) > 0 {
		t.Errorf("the combiner refused %d flush attempts: %v", len(errs), errs[0])
	}
	if got := h.everything(t); got.Count != resp.Accepted || got.Sum != 6e15+1 {
		t.Errorf("accepted %d events, the store counts %d summing to %v, want 6e15+1", resp.Accepted, got.Count, got.Sum)
	}
}

// failingSink fails every flush until the wall clock reaches until, as a
// combiner does while it restarts.
type failingSink struct {
	oneReplica
	next     *combinerSink
	until    atomic.Int64 // unix ns
	attempts atomic.Int32
}

func (s *failingSink) Flush(ctx context.Context, replica string, req *wire.Flush) error {
	s.attempts.Add(1)
	if time.Now().UnixNano() < s.until.Load() {
		return errors.New("combiner unavailable")
	}
	return s.next.Flush(ctx, replica, req)
}

// Close retries for up to 30s with backoff: a combiner down for one second at
// shutdown loses nothing.
func TestFinalFlushBacksOff(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := &failingSink{next: h.sink}
	a, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: sink, Now: h.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	var b wire.Batch
	addGood(&b, h.ms(0), 1, 0, 0, 0)
	if _, err := a.Push(b.Request()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sink.until.Store(start.Add(time.Second).UnixNano())
	a.Close()
	if got := h.total(t); got.Count != 1 {
		t.Errorf("store counts %d events, want 1: Close gave up after %d attempts in %v", got.Count, sink.attempts.Load(), time.Since(start))
	}
}

// The detail of a label reference outside the dictionary names the index.
func TestBadLabelReferenceDetail(t *testing.T) {
	h := start(t, aggregator.Options{})
	var b wire.Batch
	addGood(&b, h.ms(0), 1, 0, 0, 0)
	b.Request().Events[0].Labels[9] = 1000
	resp := h.push(t, b.Request())
	if len(resp.Rejects) != 1 || !strings.Contains(resp.Rejects[0].Detail, "1000") {
		t.Errorf("rejects %v: the detail does not name index 1000", resp.Rejects)
	}
}

// Two incarnations with the same Name and the same injected clock reading
// still flush under distinct identities, so the combiner applies both.
func TestIdentityUniquePerIncarnation(t *testing.T) {
	h := newHarness(t, schema.Default())
	for range 2 {
		a, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: h.sink, Name: "agg", Now: h.clock.Now})
		if err != nil {
			t.Fatal(err)
		}
		var b wire.Batch
		addGood(&b, h.ms(0), 1, 0, 0, 0)
		if _, err := a.Push(b.Request()); err != nil {
			t.Fatal(err)
		}
		a.Close()
	}
	if got := h.total(t); got.Count != 2 {
		t.Errorf("store counts %d events, want 2", got.Count)
	}
}

// A window of more than 100,000 cells goes out as several flushes, each under
// its own sequence, and every event reaches the store.
func TestLargeWindowIsSplit(t *testing.T) {
	h := start(t, aggregator.Options{})
	var b wire.Batch
	n := 0
	for host := range 1000 {
		for tx := range 50 {
			addGood(&b, h.ms(0), 1, host, tx, tx%2)
			n++
		}
	}
	resp := h.push(t, b.Request())
	if int(resp.Accepted) != n {
		t.Fatalf("accepted %d of %d", resp.Accepted, n)
	}
	h.close(t)
	flushes := h.sink.flushes()
	cells, seqs := 0, map[uint64]bool{}
	for _, f := range flushes {
		cells += len(f.CellCounts)
		seqs[f.Sequence] = true
	}
	if len(flushes) < 2 || len(seqs) != len(flushes) {
		t.Errorf("%d cells went out in %d flushes with %d distinct sequences, want several, all distinct", cells, len(flushes), len(seqs))
	}
	if got := h.everything(t); got.Count != uint64(n) {
		t.Errorf("the store counts %d events, want %d", got.Count, n)
	}
}

// refusingSink refuses the first flush as malformed, as a combiner answers
// InvalidArgument, and passes the rest on.
type refusingSink struct {
	oneReplica
	next     *combinerSink
	attempts atomic.Int32
}

func (s *refusingSink) Flush(ctx context.Context, replica string, req *wire.Flush) error {
	if s.attempts.Add(1) == 1 {
		return status.Error(codes.InvalidArgument, "malformed")
	}
	return s.next.Flush(ctx, replica, req)
}

// A flush the combiner refuses as malformed is not retried: it would be
// refused again, and the windows after it still go out.
func TestRefusedFlushIsNotRetried(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := &refusingSink{next: h.sink}
	a, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: sink, Now: h.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	var b wire.Batch
	addGood(&b, h.ms(0), 1, 0, 0, 0)
	addGood(&b, h.ms(h.schema.Window()), 2, 0, 0, 0) // the next window
	if _, err := a.Push(b.Request()); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if n := sink.attempts.Load(); n != 2 {
		t.Errorf("%d flush attempts, want 2: the refused one once, the next window once", n)
	}
	if got := h.everything(t); got.Sum != 2 || got.Count != 1 {
		t.Errorf("store holds sum %v count %d, want the second window's event alone", got.Sum, got.Count)
	}
}

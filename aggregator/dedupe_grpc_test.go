package aggregator_test

import (
	"context"
	"testing"
	"time"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/wire"
)

// TestPushDedupe pushes batches with and without identities over gRPC and
// checks that the store holds each identified batch once, however often it
// was pushed, and that a source idle for MaxLateness is forgotten.
func TestPushDedupe(t *testing.T) {
	h := start(t, aggregator.Options{MaxLateness: time.Minute, FlushInterval: time.Millisecond})
	client := serve(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	push := func(source string, seq uint64, value float64, wantDup bool) {
		t.Helper()
		var b wire.Batch
		b.Identify(source, seq)
		addGood(&b, h.ms(0), value, 1, 2, 0)
		addGood(&b, h.ms(0), -1, 1, 2, 0) // rejected, and reported again on a repeat
		resp, err := client.Push(ctx, b.Request())
		if err != nil {
			t.Fatal(err)
		}
		if resp.Duplicate != wantDup || resp.Accepted != 1 || len(resp.Rejects) != 1 || resp.Rejects[0].Index != 1 {
			t.Fatalf("push %q/%d: duplicate %v, accepted %d, rejects %v; want duplicate %v, 1 accepted, event 1 rejected",
				source, seq, resp.Duplicate, resp.Accepted, resp.Rejects, wantDup)
		}
	}
	push("a", 1, 1, false)
	push("a", 1, 1, true)
	push("a", 3, 2, false)
	push("a", 2, 4, false)
	push("a", 3, 2, true)
	push("b", 1, 8, false) // another source has sequences of its own
	push("", 0, 16, false) // no identity: counted every time
	push("", 0, 16, false)
	if got := h.counter(t, "dimsum_aggregator_batches_duplicate_total"); got != 2 {
		t.Errorf("%v duplicates counted, want 2", got)
	}

	// Once the source has been quiet for MaxLateness the flush loop forgets
	// it, and the same identity counts again. The loop forgets before it
	// flushes, so a flush of the closed window shows that it has run.
	h.clock.Set(h.clock.Now().Add(2 * time.Minute))
	poll(t, "the closed window to be flushed", func() bool { return len(h.sink.flushes()) > 0 })
	var b wire.Batch
	b.Identify("a", 1)
	addGood(&b, h.ms(0), 32, 1, 2, 0)
	if resp, err := client.Push(ctx, b.Request()); err != nil || resp.Duplicate || resp.Accepted != 1 {
		t.Fatalf("push of a forgotten identity: %v, %v; want it counted", resp, err)
	}

	h.close(t)
	if got := h.everything(t); got.Sum != 1+2+4+8+16+16+32 || got.Count != 7 {
		t.Errorf("store holds sum %v count %d, want 79 and 7", got.Sum, got.Count)
	}
}

package aggregator_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire"
)

// A backfill fills windows whose grace has passed as fast as it sends: the
// flush loop cuts them once they hold enough cells, without waiting for its
// tick, so that what they hold is bounded by the aggregator, not by the
// publisher's rate.
func TestBackfillCutsBeforeTick(t *testing.T) {
	h := start(t, aggregator.Options{Grace: time.Second, FlushInterval: time.Hour})
	// Every event a new host in one of 40 windows of the past half hour:
	// about four new cells each, some 400,000 in all, well past what the
	// cut waits for.
	var want tsdb.Step
	host := 0
	for seq := uint64(1); seq <= 20; seq++ {
		var b wire.Batch
		for range 5000 {
			ts := h.ms(-30*time.Minute) + int64(host%40)*10_000
			addGood(&b, ts, 1, host, host%7, host%2)
			host++
		}
		req := b.Request()
		req.Source, req.BatchSeq = "backfill", seq
		resp := h.push(t, req)
		want = add(want, tsdb.Step{Sum: float64(resp.Accepted), Count: resp.Accepted})
	}
	poll(t, "a cut before the loop's tick", func() bool { return len(h.sink.flushes()) > 0 })
	aggregator.Flush(h.agg)
	poll(t, "the flushes to drain", func() bool { return len(h.agg.Pending()) == 0 })
	if got := h.total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
}

// shardGate is a sink for a cube of two shards on one replica, "c", that
// holds shard 1's flushes until open is closed, and notes the size of each
// flush it is given.
type shardGate struct {
	next *combinerSink
	open chan struct{}

	mu    sync.Mutex
	sizes map[uint32]int // bytes of the flushes given, by shard
}

func (*shardGate) Shards() int              { return 2 }
func (*shardGate) Replicas(uint32) []string { return []string{"c"} }

func (s *shardGate) Flush(ctx context.Context, replica string, f *wire.Flush) error {
	s.mu.Lock()
	s.sizes[f.Shard] = len(f.Data)
	s.mu.Unlock()
	if f.Shard == 1 {
		select {
		case <-s.open:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return s.next.Flush(ctx, replica, f)
}

// A request is let go once every destination took it, though its cut's
// other requests still wait: the intent of a cut holds every window it took,
// and keeping them all until the last is delivered held hundreds of
// megabytes of flushes on a backfill.
func TestDeliveredRequestIsReleased(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := &shardGate{next: h.sink, open: make(chan struct{}), sizes: map[uint32]int{}}
	a, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: sink, Now: h.clock.Now, Grace: time.Second,
		FlushInterval: time.Hour, RetryBackoff: time.Millisecond, Registerer: h.reg})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	var b wire.Batch
	for i := range 200 {
		addGood(&b, h.ms(0), 1, i, i%3, i%2)
	}
	resp, err := a.Push(b.Request())
	if err != nil {
		t.Fatal(err)
	}
	want := tsdb.Step{Sum: float64(resp.Accepted), Count: resp.Accepted}
	h.clock.Set(h.clock.Now().Add(20 * time.Second))
	aggregator.Flush(a)
	poll(t, "shard 0's flush to be taken", func() bool { return len(h.sink.flushes()) == 1 })
	poll(t, "shard 1's flush to be tried", func() bool {
		sink.mu.Lock()
		defer sink.mu.Unlock()
		return sink.sizes[1] > 0
	})
	sink.mu.Lock()
	waiting := sink.sizes[1]
	sink.mu.Unlock()
	// The delivery is recorded by the confirmer, a moment after the sink
	// took it.
	poll(t, "the taken request to be let go", func() bool { return aggregator.HeldRequestBytes(a) == waiting })
	close(sink.open)
	poll(t, "shard 1's flush to be taken", func() bool { return len(a.Pending()) == 0 })
	if got := h.total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
}

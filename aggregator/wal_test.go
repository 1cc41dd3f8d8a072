package aggregator_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// replicaSink spreads a cube of shards shards over named replicas, each a
// real combiner over its own store, every replica holding every shard. A
// replica marked down answers Unavailable; one marked lossy applies a flush
// and then loses the reply.
type replicaSink struct {
	shards int
	names  []string
	stores map[string]*harness

	mu struct {
		sync.Mutex
		down, lossy map[string]bool
	}
}

func newReplicaSink(t *testing.T, h *harness, shards int, names ...string) *replicaSink {
	t.Helper()
	s := &replicaSink{shards: shards, names: names, stores: map[string]*harness{}}
	s.mu.down, s.mu.lossy = map[string]bool{}, map[string]bool{}
	for _, n := range names {
		r := newHarness(t, h.schema)
		r.window = h.window
		s.stores[n] = r
	}
	return s
}

func (s *replicaSink) Shards() int              { return s.shards }
func (s *replicaSink) Replicas(uint32) []string { return s.names }

func (s *replicaSink) Flush(ctx context.Context, replica string, req *wire.Flush) error {
	s.mu.Lock()
	down, lossy := s.mu.down[replica], s.mu.lossy[replica]
	s.mu.Unlock()
	if down {
		return status.Error(codes.Unavailable, replica+" is down")
	}
	err := s.stores[replica].sink.Flush(ctx, replica, req)
	if lossy {
		return status.Error(codes.DeadlineExceeded, "reply lost")
	}
	return err
}

func (s *replicaSink) set(replica string, down, lossy bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.down[replica], s.mu.lossy[replica] = down, lossy
}

// walAggregator opens an aggregator with a log in dir, flushing into sink
// on h's clock; the loop never flushes on its own.
func walAggregator(t *testing.T, h *harness, dir string, sink aggregator.Sink, opts aggregator.Options) *aggregator.Aggregator {
	t.Helper()
	opts.Schema, opts.Sink, opts.Now, opts.WALDir = h.schema, sink, h.clock.Now, dir
	opts.FlushInterval = time.Hour
	opts.RetryBackoff = time.Millisecond
	a, err := aggregator.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// acked pushes n events of value v spread over hosts, under the identity
// (source, seq), and returns what was acknowledged.
func acked(t *testing.T, h *harness, a *aggregator.Aggregator, source string, seq uint64, ts int64, n int, v float64) tsdb.Step {
	t.Helper()
	var b wire.Batch
	for i := range n {
		addGood(&b, ts, v, i, i%3, i%2)
	}
	req := b.Request()
	req.Source, req.BatchSeq = source, seq
	resp, err := a.Push(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Duplicate {
		return tsdb.Step{}
	}
	return tsdb.Step{Sum: v * float64(resp.Accepted), Count: resp.Accepted}
}

func add(x, y tsdb.Step) tsdb.Step { return tsdb.Step{Sum: x.Sum + y.Sum, Count: x.Count + y.Count} }

func TestWALReplayAfterCrash(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	a := walAggregator(t, h, dir, h.sink, aggregator.Options{})
	var want tsdb.Step
	want = add(want, acked(t, h, a, "pub", 1, h.ms(0), 50, 2))
	want = add(want, acked(t, h, a, "pub", 2, h.ms(-20*time.Second), 30, 1)) // an older window
	want = add(want, acked(t, h, a, "", 0, h.ms(0), 10, 3))                  // no identity
	aggregator.Crash(a)
	if n := len(h.sink.flushes()); n != 0 {
		t.Fatalf("%d flushes before the restart", n)
	}

	b := walAggregator(t, h, dir, h.sink, aggregator.Options{Registerer: h.reg})
	// A retry of an acknowledged batch counts once across the restart; a
	// new batch of the same source counts.
	if got := acked(t, h, b, "pub", 2, h.ms(-20*time.Second), 30, 1); got.Count != 0 {
		t.Errorf("the retry of batch 2 counted %d events again", got.Count)
	}
	want = add(want, acked(t, h, b, "pub", 3, h.ms(0), 5, 1))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := h.total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
	if got := h.counter(t, "dimsum_aggregator_wal_replayed_events_total"); got != 90 {
		t.Errorf("replayed %v events, want 90", got)
	}

	// The windows went out: a third start replays nothing pending and
	// counts nothing again.
	c := walAggregator(t, h, dir, h.sink, aggregator.Options{})
	closedHolds(t, h, c, want, "after a clean restart")
}

// closedHolds closes a and fails the test unless h's store then holds want.
func closedHolds(t *testing.T, h *harness, a *aggregator.Aggregator, want tsdb.Step, when string) {
	t.Helper()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if got := h.total(t); got != want {
		t.Errorf("%s the store holds %+v, acknowledged %+v", when, got, want)
	}
}

// A crash between a cut and its intent puts the cut windows back into the
// cube, and they go out once.
func TestWALCutWithoutIntentRestored(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	a := walAggregator(t, h, dir, h.sink, aggregator.Options{Grace: time.Second})
	want := acked(t, h, a, "pub", 1, h.ms(0), 40, 1)
	want = add(want, acked(t, h, a, "pub", 2, h.ms(time.Minute), 7, 1)) // a window still open
	h.clock.Set(h.window.Add(12 * time.Second))
	aggregator.CrashAfterCut(a)

	b := walAggregator(t, h, dir, h.sink, aggregator.Options{Grace: time.Second})
	aggregator.Flush(b)
	poll(t, "the restored window", func() bool { return len(h.sink.flushes()) == 1 })
	if got := h.total(t); got.Count != 40 {
		t.Errorf("the restored window holds %d events, want 40", got.Count)
	}
	b.Close()
	if got := h.total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
	if d := h.sink.duplicates(); d != 0 {
		t.Errorf("%d duplicate flushes", d)
	}
}

// An intent whose delivery was not confirmed goes out again after a crash
// under its first identity, so a combiner that had applied it counts it once.
func TestWALIntentResentWithSameIdentity(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	sink := newReplicaSink(t, h, 1, "r1")
	sink.set("r1", false, true) // applied, reply lost
	a := walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Second})
	want := acked(t, h, a, "pub", 1, h.ms(0), 25, 4)
	h.clock.Set(h.window.Add(12 * time.Second))
	aggregator.Flush(a)
	r1 := sink.stores["r1"]
	poll(t, "a first attempt", func() bool { return len(r1.sink.flushes()) > 0 })
	first := r1.sink.flushes()[0]
	if len(first.CellSums) == 0 || first.CellWholeSums != nil {
		t.Errorf("a flush to a combiner in another process has %d sums and %d whole sums: it must keep them as doubles", len(first.CellSums), len(first.CellWholeSums))
	}
	aggregator.Crash(a)

	sink.set("r1", false, false)
	b := walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Second})
	poll(t, "the resent request", func() bool { return len(b.Pending()) == 0 && r1.sink.duplicates() > 0 })
	b.Close()
	for _, f := range r1.sink.flushes() {
		if f.Source != first.Source || f.Sequence != first.Sequence || f.WindowStartMs != first.WindowStartMs {
			t.Errorf("flush (%s, %d, %d) after the restart, the first was (%s, %d, %d)",
				f.Source, f.WindowStartMs, f.Sequence, first.Source, first.WindowStartMs, first.Sequence)
		}
	}
	if first.Source == b.Source() {
		t.Errorf("the restarted aggregator reuses the source %s", first.Source)
	}
	if got := r1.total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
}

// segments counts the log's segment files.
func segments(t *testing.T, dir string) int {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.wal"))
	if err != nil {
		t.Fatal(err)
	}
	return len(files)
}

// With two replicas, one down: the other gets everything at once, the log
// keeps what the down one lacks, and when it answers again it catches up
// (its pending count goes to zero), applying each flush once; then the log
// drops the consumed segments.
func TestWALHandoffAndTruncation(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	sink := newReplicaSink(t, h, 3, "r1", "r2")
	a := walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Second, WALSegmentBytes: 8 << 10, Registerer: h.reg})
	defer a.Close()

	var want tsdb.Step
	seq := uint64(0)
	round := func(windows int) {
		for range windows {
			for range 4 {
				seq++
				want = add(want, acked(t, h, a, "pub", seq, h.ms(0), 20, 1))
			}
			h.clock.Set(h.clock.Now().Add(10 * time.Second))
			aggregator.Flush(a)
		}
	}
	round(6)
	poll(t, "both replicas", func() bool { return len(a.Pending()) == 0 })
	// One more flush after the deliveries lets the newest cut cover
	// every older segment.
	round(1)
	poll(t, "both replicas", func() bool { return len(a.Pending()) == 0 })
	if n := segments(t, dir); n > 3 {
		t.Errorf("%d segments while both replicas are up", n)
	}

	sink.set("r2", true, false)
	round(8)
	poll(t, "r1", func() bool { _, ok := a.Pending()["r1"]; return !ok })
	pending := a.Pending()["r2"]
	if pending == 0 {
		t.Fatal("nothing waits for the replica that is down")
	}
	// Only the replica that is down keeps requests waiting; r1 takes each
	// as it comes.
	if got, forwards := a.Waiting(0); !slices.Equal(got, []string{"r2"}) || len(forwards) != 0 {
		t.Errorf("waiting for %v, forwards for %v; want [r2], no forwards", got, forwards)
	}
	if got, _ := a.Waiting(time.Hour); len(got) != 0 {
		t.Errorf("waiting over an hour for %v, want none", got)
	}
	kept := segments(t, dir)
	t.Logf("segments: %d kept while r2 is down, %d pending", kept, pending)
	if kept < 5 {
		t.Errorf("%d segments kept while r2 is down", kept)
	}
	if got := sink.stores["r1"].total(t); got != want {
		t.Errorf("r1 holds %+v while r2 is down, acknowledged %+v", got, want)
	}

	sink.set("r2", false, false)
	poll(t, "r2 to catch up", func() bool { return len(a.Pending()) == 0 })
	round(1)
	poll(t, "both replicas", func() bool { return len(a.Pending()) == 0 })
	t.Logf("segments after catching up: %d", segments(t, dir))
	if n := segments(t, dir); n >= kept {
		t.Errorf("%d segments after r2 caught up, %d while it was down", n, kept)
	}
	for _, r := range []string{"r1", "r2"} {
		if got := sink.stores[r].total(t); got != want {
			t.Errorf("%s holds %+v, acknowledged %+v", r, got, want)
		}
		if d := sink.stores[r].sink.duplicates(); d != 0 {
			t.Errorf("%s saw %d duplicate flushes", r, d)
		}
		for _, f := range sink.stores[r].sink.flushes() {
			if f.Shards != 3 || f.Shard >= 3 {
				t.Fatalf("flush for shard %d of %d", f.Shard, f.Shards)
			}
		}
	}
}

// Past WALMaxBytes Push refuses batches, with ResourceExhausted over gRPC,
// until the combiner takes the windows and the log shrinks.
func TestWALBackPressure(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := newReplicaSink(t, h, 1, "r1")
	sink.set("r1", true, false)
	h.agg = walAggregator(t, h, t.TempDir(), sink, aggregator.Options{Grace: time.Second, WALMaxBytes: 20 << 10, WALSegmentBytes: 4 << 10})
	defer h.agg.Close()
	client := serve(t, h)
	var want tsdb.Step
	var err error
	for seq := uint64(1); seq < 200 && err == nil; seq++ {
		var b wire.Batch
		for i := range 20 {
			addGood(&b, h.ms(0), 1, i, 0, 0)
		}
		req := b.Request()
		req.Source, req.BatchSeq = "pub", seq
		var resp *wirepb.PushResponse
		if resp, err = client.Push(context.Background(), req); err == nil {
			want.Count += resp.Accepted
			want.Sum += float64(resp.Accepted)
		}
		h.clock.Set(h.clock.Now().Add(5 * time.Second))
		aggregator.Flush(h.agg)
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("Push: %v, want ResourceExhausted", err)
	}
	if _, err := h.agg.Push(new(wire.Batch).Request()); !errors.Is(err, aggregator.ErrLogFull) {
		t.Fatalf("Push: %v, want ErrLogFull", err)
	}
	sink.set("r1", false, false)
	poll(t, "the log to shrink", func() bool {
		if len(h.agg.Pending()) > 0 {
			return false
		}
		// A flush after the deliveries lets a cut cover the segments.
		var b wire.Batch
		addGood(&b, h.ms(0), 1, 0, 0, 0)
		resp, err := h.agg.Push(b.Request())
		if err == nil {
			want.Count += resp.Accepted
			want.Sum += float64(resp.Accepted)
		}
		h.clock.Set(h.clock.Now().Add(5 * time.Second))
		aggregator.Flush(h.agg)
		return err == nil
	})
	h.agg.Close()
	if got := sink.stores["r1"].total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
}

// A corrupt record in the middle of the log stops New with an error naming
// the file, instead of replaying past it.
func TestWALCorruptionRefused(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	a := walAggregator(t, h, dir, h.sink, aggregator.Options{})
	acked(t, h, a, "pub", 1, h.ms(0), 10, 1)
	acked(t, h, a, "pub", 2, h.ms(0), 10, 1)
	aggregator.Crash(a)
	files, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	data, _ := os.ReadFile(files[0])
	data[40] ^= 0xff
	os.WriteFile(files[0], data, 0o644)
	_, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: h.sink, WALDir: dir})
	if err == nil || !errors.Is(err, wal.ErrCorrupt) {
		t.Fatalf("New over a corrupt log: %v", err)
	}
}

// A restart with another grace replays the cuts the log lists, not the ones
// the new grace would make: a window that went out in a logged intent is
// neither counted again from the cube nor lost.
func TestWALReplayWithOtherGrace(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	sink := newReplicaSink(t, h, 1, "r1")
	sink.set("r1", true, false)
	a := walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Second})
	want := acked(t, h, a, "pub", 1, h.ms(0), 30, 1)
	h.clock.Set(h.window.Add(12 * time.Second))
	aggregator.Flush(a) // the intent is logged; r1 is down
	aggregator.Crash(a)

	sink.set("r1", false, false)
	b := walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Hour})
	poll(t, "the resent request", func() bool { return len(b.Pending()) == 0 })
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := sink.stores["r1"].total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
}

// TestRetryNow checks that a replica that comes back gets what waited for it
// when RetryNow says so, not at the end of a long backoff.
func TestRetryNow(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := newReplicaSink(t, h, 1, "r1")
	a := walAggregator(t, h, t.TempDir(), sink, aggregator.Options{Grace: time.Second, RetryBackoff: time.Hour, Registerer: h.reg})
	defer a.Close()
	sink.set("r1", true, false)
	want := acked(t, h, a, "pub", 1, h.ms(0), 20, 1)
	h.clock.Set(h.clock.Now().Add(10 * time.Second))
	aggregator.Flush(a)
	poll(t, "a failed delivery", func() bool { return h.counter(t, "dimsum_aggregator_flush_errors_total") > 0 })
	sink.set("r1", false, false)
	a.RetryNow()
	poll(t, "r1 to take the flush", func() bool { return len(a.Pending()) == 0 })
	if got := sink.stores["r1"].total(t); got != want {
		t.Errorf("r1 holds %+v, acknowledged %+v", got, want)
	}
}

// logBytes is the size of the log's segment files.
func logBytes(t *testing.T, dir string) int64 {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.wal"))
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		n += st.Size()
	}
	return n
}

// Once everything the log holds has reached the combiner, the log drops it,
// the segment appended to as well: an idle aggregator, and one stopped
// cleanly, keep only their dedupe state, and a restart replays nothing.
func TestWALEmptiesOnceConsumed(t *testing.T) {
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	a := walAggregator(t, h, dir, h.sink, aggregator.Options{Grace: time.Second})
	var want tsdb.Step
	for seq := uint64(1); seq <= 40; seq++ {
		want = add(want, acked(t, h, a, "pub", seq, h.ms(0), 1000, 1))
	}
	if n := logBytes(t, dir); n < 1<<20 {
		t.Fatalf("the log holds %d bytes before the flush; the test needs more than 1 MiB", n)
	}
	h.clock.Set(h.clock.Now().Add(20 * time.Second))
	aggregator.Flush(a)
	poll(t, "the log to drop what reached the combiner", func() bool { return logBytes(t, dir) < 64<<10 })
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if n := logBytes(t, dir); n >= 64<<10 {
		t.Errorf("the log holds %d bytes after a clean stop", n)
	}
	if got := h.total(t); got != want {
		t.Fatalf("store holds %+v, acknowledged %+v", got, want)
	}
	// A restart replays nothing and sends nothing again; the dedupe state
	// survives.
	a = walAggregator(t, h, dir, h.sink, aggregator.Options{Grace: time.Second})
	defer a.Close()
	if got := acked(t, h, a, "pub", 40, h.ms(0), 1000, 1); got != (tsdb.Step{}) {
		t.Errorf("batch 40 counted again after the restart: %+v", got)
	}
	aggregator.Flush(a)
	if got := h.total(t); got != want {
		t.Errorf("store holds %+v after the restart, acknowledged %+v", got, want)
	}
}

// gatedSink holds every flush until its gate opens, as a store that stopped
// taking them does.
type gatedSink struct {
	oneReplica
	next *combinerSink
	open chan struct{}
}

func (s *gatedSink) Flush(ctx context.Context, replica string, f *wire.Flush) error {
	select {
	case <-s.open:
	case <-ctx.Done():
		return ctx.Err()
	}
	return s.next.Flush(ctx, replica, f)
}

// Past MaxPendingBytes of flushes waiting for a store that takes none, Push
// refuses batches with ResourceExhausted and a RetryInfo that says when to
// come back; once the store takes them again, pushes are taken, and the
// store holds exactly what was acknowledged.
func TestBehindBackPressure(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := &gatedSink{next: h.sink, open: make(chan struct{})}
	a, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: sink, Now: h.clock.Now, Grace: time.Second,
		FlushInterval: time.Hour, RetryBackoff: time.Millisecond, MaxPendingBytes: 4 << 10, Registerer: h.reg})
	if err != nil {
		t.Fatal(err)
	}
	h.agg = a
	defer a.Close()
	client := serve(t, h)
	var want tsdb.Step
	push := func(seq uint64) error {
		var b wire.Batch
		for i := range 50 {
			addGood(&b, h.ms(0), 1, i, i%3, i%2)
		}
		req := b.Request()
		req.Source, req.BatchSeq = "pub", seq
		resp, err := client.Push(context.Background(), req)
		if err == nil {
			want = add(want, tsdb.Step{Sum: float64(resp.Accepted), Count: resp.Accepted})
		}
		return err
	}
	seq := uint64(0)
	var refused error
	for ; seq < 100 && refused == nil; seq++ {
		refused = push(seq + 1)
		h.clock.Set(h.clock.Now().Add(10 * time.Second))
		aggregator.Flush(a)
	}
	st := status.Convert(refused)
	if st.Code() != codes.ResourceExhausted || len(st.Details()) != 1 {
		t.Fatalf("push %d: %v, want ResourceExhausted with RetryInfo", seq, refused)
	}
	if ri, ok := st.Details()[0].(*errdetails.RetryInfo); !ok || ri.RetryDelay.AsDuration() <= 0 {
		t.Fatalf("details %v, want a RetryInfo with a delay", st.Details())
	}
	if _, err := a.Push(new(wire.Batch).Request()); !errors.Is(err, aggregator.ErrBehind) {
		t.Fatalf("Push: %v, want ErrBehind", err)
	}
	if got := h.counter(t, "dimsum_aggregator_batches_backpressured_total"); got < 2 {
		t.Errorf("%v refusals counted, want at least 2", got)
	}
	close(sink.open)
	poll(t, "pushes to be taken again", func() bool { return push(seq+1) == nil })
	h.clock.Set(h.clock.Now().Add(20 * time.Second))
	aggregator.Flush(a)
	poll(t, "the flushes to drain", func() bool { return len(a.Pending()) == 0 })
	if got := h.total(t); got != want {
		t.Errorf("store holds %+v, acknowledged %+v", got, want)
	}
}

// A replica that is down is not a store behind: with one of two replicas
// down, pushes go on being taken however much waits for it (the log bounds
// that), and once it is back it receives all of it.
func TestDownReplicaIsNotBehind(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := newReplicaSink(t, h, 1, "c1", "c2")
	sink.set("c2", true, false)
	a := walAggregator(t, h, t.TempDir(), sink, aggregator.Options{Grace: time.Second, RetryBackoff: time.Millisecond, MaxPendingBytes: 4 << 10})
	defer a.Close()
	var want tsdb.Step
	for seq := uint64(1); seq <= 100; seq++ {
		var b wire.Batch
		for i := range 50 {
			addGood(&b, h.ms(0), 1, i, i%3, i%2)
		}
		req := b.Request()
		req.Source, req.BatchSeq = "pub", seq
		resp, err := a.Push(req)
		if err != nil {
			t.Fatalf("push %d with one replica down: %v", seq, err)
		}
		want = add(want, tsdb.Step{Sum: float64(resp.Accepted), Count: resp.Accepted})
		h.clock.Set(h.clock.Now().Add(10 * time.Second))
		aggregator.Flush(a)
		// c1's store holds the flush a moment before the sender counts
		// it taken.
		poll(t, "c1 to take the flush", func() bool {
			return sink.stores["c1"].total(t) == want && aggregator.PendingBytes(a) == 0
		})
	}
	sink.set("c2", false, false)
	a.RetryNow()
	poll(t, "c2 to catch up", func() bool { return len(a.Pending()) == 0 })
	if got := sink.stores["c2"].total(t); got != want {
		t.Errorf("c2 holds %+v after it came back, acknowledged %+v", got, want)
	}
}

// localSink is the node's own combiner as the sink (combiner.Local), whose
// Sync fails while failing is set.
type localSink struct {
	*combiner.Local
	failing                       atomic.Bool
	flushes, syncs, synced, whole atomic.Int64
}

func (s *localSink) Flush(ctx context.Context, replica string, f *wire.Flush) error {
	s.flushes.Add(1)
	if f.Request != nil && len(f.Request.CellWholeSums) > 0 {
		s.whole.Add(1)
	}
	return s.Local.Flush(ctx, replica, f)
}

func (s *localSink) Sync(replica string) error {
	s.syncs.Add(1)
	if s.failing.Load() {
		return errors.New("sync failed")
	}
	s.synced.Add(1)
	return s.Local.Sync(replica)
}

// syncFailing starts an aggregator with a log flushing into the combiner in
// its process, whose Sync fails, and has it flush one acknowledged batch.
func syncFailing(t *testing.T) (*harness, string, *localSink, *aggregator.Aggregator, tsdb.Step) {
	t.Helper()
	h := newHarness(t, schema.Default())
	dir := t.TempDir()
	sink := &localSink{Local: h.sink.c.Local("c")}
	sink.failing.Store(true)
	a := walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Second})
	want := acked(t, h, a, "pub", 1, h.ms(0), 25, 4)
	h.clock.Set(h.window.Add(12 * time.Second))
	aggregator.Flush(a)
	return h, dir, sink, a, want
}

// A combiner in the same process takes a flush before it is durable: the
// aggregator records the delivery only once the combiner's Sync returned,
// and a flush it could not sync stays in its log, to go out again after a
// restart. Its flushes carry whole sums as varints: here the restarted
// aggregator's combiner has a store of its own, which counts the flush
// only if it reads it from the log whole.
func TestWALKeepsUnsyncedFlushes(t *testing.T) {
	h, dir, sink, a, want := syncFailing(t)
	poll(t, "the failed sync tried again", func() bool { return sink.syncs.Load() > 1 })
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if sink.whole.Load() == 0 {
		t.Error("no flush to the combiner in process carried whole sums")
	}

	fresh := newHarness(t, h.schema)
	fresh.window, fresh.clock = h.window, h.clock
	again := &localSink{Local: fresh.sink.c.Local("c")}
	b := walAggregator(t, fresh, dir, again, aggregator.Options{Grace: time.Second})
	poll(t, "the flush sent again", func() bool { return again.synced.Load() > 0 && len(b.Pending()) == 0 })
	closedHolds(t, fresh, b, want, "where the flush went again,")
}

// A failed Sync is tried again: once it succeeds the delivery is recorded,
// and a restart sends nothing.
func TestWALRetriesFailedSync(t *testing.T) {
	h, dir, sink, a, want := syncFailing(t)
	poll(t, "a failed sync", func() bool { return sink.syncs.Load() > 0 })
	sink.failing.Store(false)
	poll(t, "a sync that succeeds", func() bool { return sink.synced.Load() > 0 })
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	sent := sink.flushes.Load()
	closedHolds(t, h, walAggregator(t, h, dir, sink, aggregator.Options{Grace: time.Second}), want, "after a restart")
	if n := sink.flushes.Load() - sent; n != 0 {
		t.Errorf("%d flushes went out again after the sync that succeeded", n)
	}
}

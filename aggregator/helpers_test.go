package aggregator_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// family is the counter family of the default schema: datacenter/cluster/host,
// transaction and status, 4 x 2 x 2 = 16 cuboids.
const family = "requests"

// testWindow returns the start of a 10s window a few minutes in the past.
// The store measures retention from the wall clock, so test windows stay
// close to it; the aggregator runs on a clock of its own (see clock).
func testWindow() time.Time {
	return time.Now().UTC().Truncate(time.Minute).Add(-5 * time.Minute)
}

// clock is a settable clock for Options.Now, so that tests decide when a
// window closes instead of waiting for it.
type clock struct{ ms atomic.Int64 }

func newClock(t time.Time) *clock {
	c := &clock{}
	c.Set(t)
	return c
}

func (c *clock) Now() time.Time  { return time.UnixMilli(c.ms.Load()) }
func (c *clock) Set(t time.Time) { c.ms.Store(t.UnixMilli()) }

// combinerSink is the aggregator's Sink in tests: it applies every flush to a
// real combiner over a real store, and keeps the flushes it applied so that
// tests can check their identities.
type combinerSink struct {
	oneReplica
	c *combiner.Combiner

	mu struct {
		sync.Mutex
		flushes []*wirepb.FlushRequest // applied flushes, in order
		dups    int                    // flushes the combiner had seen before
		errs    []error                // flushes the combiner refused
	}
}

// oneReplica is the destination of an unsharded cube held by one combiner,
// named "c".
type oneReplica struct{}

func (oneReplica) Shards() int              { return 1 }
func (oneReplica) Replicas(uint32) []string { return []string{"c"} }

func (s *combinerSink) Flush(_ context.Context, _ string, f *wire.Flush) error {
	req := &wirepb.FlushRequest{}
	if err := proto.Unmarshal(f.Data, req); err != nil {
		return err
	}
	dup, err := s.c.Apply(req)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.mu.errs = append(s.mu.errs, err)
		return err
	}
	s.mu.flushes = append(s.mu.flushes, req)
	if dup {
		s.mu.dups++
	}
	return nil
}

// flushes returns the flushes applied so far.
func (s *combinerSink) flushes() []*wirepb.FlushRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*wirepb.FlushRequest(nil), s.mu.flushes...)
}

// errors returns the errors of the flushes the combiner refused.
func (s *combinerSink) errors() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.mu.errs...)
}

func (s *combinerSink) duplicates() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.dups
}

// harness is an aggregator flushing into a real combiner and store.
type harness struct {
	schema *schema.Schema
	db     *tsdb.DB
	sink   *combinerSink
	agg    *aggregator.Aggregator
	clock  *clock
	reg    *prometheus.Registry
	window time.Time // a window start near the wall clock
}

// newHarness builds a store in a temporary directory, a combiner over it, the
// sink into the combiner, a clock stopped 5s into h.window and a fresh
// registry, but no aggregator: tests that need their own sink or several
// aggregators build those over h.sink. The store is closed at the end of the
// test.
func newHarness(t testing.TB, s *schema.Schema) *harness {
	t.Helper()
	h := &harness{schema: s, window: testWindow(), reg: prometheus.NewRegistry()}
	h.clock = newClock(h.window.Add(5 * time.Second))
	var c *combiner.Combiner
	h.db, c = openStore(t, s)
	h.sink = &combinerSink{c: c}
	return h
}

// start builds a harness and an aggregator flushing into its combiner.
// Unset Schema, Now and Registerer become the default schema, the harness's
// clock and registry. The aggregator is closed at the end of the test.
func start(t testing.TB, opts aggregator.Options) *harness {
	t.Helper()
	if opts.Schema == nil {
		opts.Schema = schema.Default()
	}
	h := newHarness(t, opts.Schema)
	if opts.Now == nil {
		opts.Now = h.clock.Now
	}
	if opts.Registerer == nil {
		opts.Registerer = h.reg
	}
	opts.Sink = h.sink
	var err error
	h.agg, err = aggregator.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.close(t) })
	return h
}

// openStore opens a store in a temporary directory, closed at the end of the
// test, and a combiner over it.
func openStore(t testing.TB, s *schema.Schema) (*tsdb.DB, *combiner.Combiner) {
	t.Helper()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Error(err)
		}
	})
	c, err := combiner.New(combiner.Options{Store: db, Schema: s})
	if err != nil {
		t.Fatal(err)
	}
	return db, c
}

// close closes the aggregator, which flushes every window to the store.
func (h *harness) close(t testing.TB) {
	t.Helper()
	if err := h.agg.Close(); err != nil {
		t.Fatal(err)
	}
}

// push pushes a batch and fails the test on error.
func (h *harness) push(t testing.TB, req *wirepb.PushRequest) *wirepb.PushResponse {
	t.Helper()
	resp, err := h.agg.Push(req)
	if err != nil {
		t.Fatalf("Push: %v", err)
	}
	return resp
}

// ms is the clock's time plus d, in unix milliseconds: an event timestamp.
func (h *harness) ms(d time.Duration) int64 { return h.clock.Now().Add(d).UnixMilli() }

// read returns every cell of a cuboid as stored at resolution res, keyed by
// its values joined with "/", each with its steps summed. Times are those
// of the window's day.
func (h *harness) read(t testing.TB, res int, cuboid schema.CuboidID) map[string]tsdb.Step {
	t.Helper()
	return h.readFamily(t, res, family, cuboid)
}

// readFamily is read for any family.
func (h *harness) readFamily(t testing.TB, res int, family string, cuboid schema.CuboidID) map[string]tsdb.Step {
	t.Helper()
	cells, err := h.db.Cells(family, cuboid, nil)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]tsdb.Step{}
	var steps []tsdb.Step
	for _, c := range cells {
		steps, err = h.db.Steps(res, family, cuboid, c.ID, h.window.Add(-48*time.Hour).UnixMilli(), h.window.Add(48*time.Hour).UnixMilli(), steps[:0])
		if err != nil {
			t.Fatal(err)
		}
		var sum tsdb.Step
		for _, s := range steps {
			sum.Sum += s.Sum
			sum.Count += s.Count
		}
		out[strings.Join(c.Values, "/")] = sum
	}
	return out
}

// total returns the apex cell at the finest resolution: the sum and count of
// every event the store holds.
func (h *harness) total(t testing.TB) tsdb.Step {
	t.Helper()
	cells := h.read(t, 0, 0)
	if len(cells) > 1 {
		t.Fatalf("apex has %d cells, want at most 1", len(cells))
	}
	return cells[""]
}

// everything returns the sum of the apex cells of every family: every event
// the store holds.
func (h *harness) everything(t testing.TB) tsdb.Step {
	t.Helper()
	var sum tsdb.Step
	for _, f := range h.schema.Families {
		for _, s := range h.readFamily(t, 0, f.Name, 0) {
			sum.Sum += s.Sum
			sum.Count += s.Count
		}
	}
	return sum
}

// counter returns the value of a counter the aggregator registered, summed
// over its label values.
func (h *harness) counter(t testing.TB, name string) float64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var v float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				v += m.GetCounter().GetValue()
			}
		}
	}
	return v
}

// histogram returns the sample count and sum of a histogram the aggregator
// registered.
func (h *harness) histogram(t testing.TB, name string) (uint64, float64) {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			hist := mf.GetMetric()[0].GetHistogram()
			return hist.GetSampleCount(), hist.GetSampleSum()
		}
	}
	t.Fatalf("no histogram %s", name)
	return 0, 0
}

// labels returns the labels of a default-schema event for host h (out of
// 3 datacenters of 2 clusters), transaction tx and status st.
func labels(h, tx, st int) []string {
	return []string{
		"datacenter", fmt.Sprintf("dc%d", h%3),
		"cluster", fmt.Sprintf("dc%d-c%d", h%3, h%2),
		"host", fmt.Sprintf("host%03d", h),
		"transaction", fmt.Sprintf("txn%02d", tx),
		"status", fmt.Sprint(200 + 100*st),
	}
}

// cellOf returns the finest cell of an event's labels as harness.read keys
// it: the values joined with "/".
func cellOf(l []string) string {
	var vals []string
	for i := 1; i < len(l); i += 2 {
		vals = append(vals, l[i])
	}
	return strings.Join(vals, "/")
}

// addGood adds a valid event of family to b.
func addGood(b *wire.Batch, ts int64, value float64, h, tx, st int) {
	b.Add(family, ts, value, labels(h, tx, st)...)
}

// poll calls cond until it reports true or 10s have passed.
func poll(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

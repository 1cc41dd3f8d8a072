package aggregator_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// TestRejectReasons pushes, for every reason, a batch of three good events
// around one bad event at index 2, and checks that the bad one alone is
// reported, with a detail naming what is wrong, and that the good ones alone
// reach the store.
func TestRejectReasons(t *testing.T) {
	const maxLateness, maxSkew = time.Hour, time.Minute
	for _, tc := range []struct {
		name string
		// add adds the event under test at index 2; ts is a valid timestamp.
		add func(b *wire.Batch, ts int64)
		// edit, when set, corrupts the encoded event.
		edit     func(e *wirepb.Event)
		reason   wirepb.RejectReason
		detail   []string // substrings the detail must hold
		maxCells int
		// at, when set, is the offending timestamp's offset from the valid
		// one: the detail must show that instant.
		at time.Duration
	}{
		{
			name:   "unknown family",
			add:    func(b *wire.Batch, ts int64) { b.Add("responses", ts, 1, labels(0, 0, 0)...) },
			reason: wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY,
			detail: []string{`"responses"`},
		},
		{
			name:   "unknown dimension",
			add:    func(b *wire.Batch, ts int64) { b.Add(family, ts, 1, append(labels(0, 0, 0), "region", "eu")...) },
			reason: wirepb.RejectReason_REJECT_REASON_UNKNOWN_DIMENSION,
			detail: []string{`"region"`, `"requests"`},
		},
		{
			name:   "missing dimension",
			add:    func(b *wire.Batch, ts int64) { b.Add(family, ts, 1, labels(0, 0, 0)[:8]...) },
			reason: wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION,
			detail: []string{`"status"`, "missing"},
		},
		{
			name: "empty value",
			add: func(b *wire.Batch, ts int64) {
				l := labels(0, 0, 0)
				l[5] = ""
				b.Add(family, ts, 1, l...)
			},
			reason: wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION,
			detail: []string{`"host"`, "empty"},
		},
		{
			name: "duplicate dimension",
			add: func(b *wire.Batch, ts int64) {
				b.Add(family, ts, 1, append(labels(0, 0, 0), "transaction", "txn07")...)
			},
			reason: wirepb.RejectReason_REJECT_REASON_DUPLICATE_DIMENSION,
			detail: []string{`"transaction"`, "twice"},
		},
		{
			name:   "NaN",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, math.NaN(), 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_NOT_FINITE,
			detail: []string{"NaN"},
		},
		{
			name:   "+Inf",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, math.Inf(1), 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_NOT_FINITE,
			detail: []string{"+Inf"},
		},
		{
			name:   "-Inf",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, math.Inf(-1), 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_NOT_FINITE,
			detail: []string{"-Inf"},
		},
		{
			name:   "negative delta",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, -3.5, 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA,
			detail: []string{"-3.5"},
		},
		{
			name:   "too old",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts-maxLateness.Milliseconds()-1, 1, 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_TOO_OLD,
			detail: []string{"1h0m0s"},
			at:     -maxLateness - time.Millisecond,
		},
		{
			name:   "too new",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts+maxSkew.Milliseconds()+1, 1, 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_TOO_NEW,
			detail: []string{"1m0s"},
			at:     maxSkew + time.Millisecond,
		},
		{
			name:   "family reference outside the dictionary",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, 1, 0, 0, 0) },
			edit:   func(e *wirepb.Event) { e.Family = 1000 },
			reason: wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE,
			detail: []string{"family index 1000"},
		},
		{
			name:   "label name reference outside the dictionary",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, 1, 0, 0, 0) },
			edit:   func(e *wirepb.Event) { e.Labels[4] = 1000 },
			reason: wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE,
			detail: []string{"label index", "outside the dictionary"},
		},
		{
			name:   "label value reference outside the dictionary",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, 1, 0, 0, 0) },
			edit:   func(e *wirepb.Event) { e.Labels[9] = 1000 },
			reason: wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE,
			detail: []string{"label index", "outside the dictionary"},
		},
		{
			name:   "odd label count",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, 1, 0, 0, 0) },
			edit:   func(e *wirepb.Event) { e.Labels = append(e.Labels, e.Labels[0]) },
			reason: wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE,
			detail: []string{"11 label indexes"},
		},
		{
			// A 16 MiB value was once taken, and broke every query of its
			// series for the retention; the detail quotes no more than a
			// few bytes of what it refuses.
			name: "label value too long",
			add: func(b *wire.Batch, ts int64) {
				b.Add(family, ts, 1, "datacenter", "dc0", "cluster", "c0", "host", strings.Repeat("h", 16<<20), "transaction", "t", "status", "200")
			},
			reason: wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG,
			detail: []string{`label "host"`, "16777216 bytes", "limit is 2048"},
		},
		{
			name: "label name too long",
			add: func(b *wire.Batch, ts int64) {
				b.Add(family, ts, 1, "datacenter", "dc0", "cluster", "c0", "host", "h", "transaction", "t", strings.Repeat("s", 300), "200")
			},
			reason: wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG,
			detail: []string{`"sss`, "(300 bytes)", "limit is 256"},
		},
		{
			name:   "too many labels",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, 1, 0, 0, 0) },
			edit:   func(e *wirepb.Event) { e.Labels = append(e.Labels, e.Labels...) },
			reason: wirepb.RejectReason_REJECT_REASON_TOO_MANY_LABELS,
			detail: []string{"10 labels", "more than 8"},
		},
		{
			name:   "value too large",
			add:    func(b *wire.Batch, ts int64) { addGood(b, ts, math.MaxFloat64, 0, 0, 0) },
			reason: wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE,
			detail: []string{"2^53"},
		},
		{
			// Events 0 and 1 fill the window's two finest cells; event 2
			// would add a third, event 3 falls in an existing one.
			name:     "cardinality limit",
			add:      func(b *wire.Batch, ts int64) { addGood(b, ts, 1, 2, 0, 0) },
			reason:   wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT,
			detail:   []string{`"requests"`, "2 cells"},
			maxCells: 2,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, aggregator.Options{MaxLateness: maxLateness, MaxFutureSkew: maxSkew, MaxCellsPerWindow: tc.maxCells})
			ts := h.ms(0)
			var b wire.Batch
			addGood(&b, ts, 1, 0, 0, 0)
			addGood(&b, ts, 2, 1, 0, 0)
			tc.add(&b, ts)
			addGood(&b, ts, 4, 0, 0, 0)
			req := b.Request()
			if tc.edit != nil {
				tc.edit(req.Events[2])
			}

			resp := h.push(t, req)
			if resp.Accepted != 3 || len(resp.Rejects) != 1 {
				t.Fatalf("accepted %d, rejects %v; want 3 accepted and one reject", resp.Accepted, resp.Rejects)
			}
			r := resp.Rejects[0]
			if r.Index != 2 || r.Reason != tc.reason {
				t.Errorf("reject %d %v, want 2 %v", r.Index, r.Reason, tc.reason)
			}
			detail := tc.detail
			if tc.at != 0 {
				detail = append(detail, time.UnixMilli(ts).Add(tc.at).UTC().Format(time.RFC3339Nano))
			}
			for _, s := range detail {
				if !strings.Contains(r.Detail, s) {
					t.Errorf("detail %q does not name %q", r.Detail, s)
				}
			}
			if got := h.counter(t, "dimsum_aggregator_events_rejected_total"); got != 1 {
				t.Errorf("rejected counter %v, want 1", got)
			}

			h.close(t)
			if got := h.total(t); got.Sum != 7 || got.Count != 3 {
				t.Errorf("store holds sum %v count %d, want 7 and 3 (the good events only)", got.Sum, got.Count)
			}
		})
	}
}

// TestRejectTimestampBounds checks that the lateness and skew bounds are
// inclusive: an event exactly MaxLateness old or MaxFutureSkew ahead counts.
func TestRejectTimestampBounds(t *testing.T) {
	h := start(t, aggregator.Options{MaxLateness: 10 * time.Minute, MaxFutureSkew: 30 * time.Second})
	var b wire.Batch
	addGood(&b, h.ms(-10*time.Minute), 1, 0, 0, 0)
	addGood(&b, h.ms(-10*time.Minute-time.Millisecond), 10, 0, 0, 0)
	addGood(&b, h.ms(30*time.Second), 100, 0, 0, 0)
	addGood(&b, h.ms(30*time.Second+time.Millisecond), 1000, 0, 0, 0)
	resp := h.push(t, b.Request())
	want := []wirepb.RejectReason{1: wirepb.RejectReason_REJECT_REASON_TOO_OLD, 3: wirepb.RejectReason_REJECT_REASON_TOO_NEW}
	if resp.Accepted != 2 || len(resp.Rejects) != 2 {
		t.Fatalf("accepted %d, rejects %v; want 2 and 2", resp.Accepted, resp.Rejects)
	}
	for _, r := range resp.Rejects {
		if int(r.Index) >= len(want) || want[r.Index] != r.Reason {
			t.Errorf("reject %d %v unexpected", r.Index, r.Reason)
		}
	}
	h.close(t)
	if got := h.total(t); got.Sum != 101 || got.Count != 2 {
		t.Errorf("store holds sum %v count %d, want 101 and 2", got.Sum, got.Count)
	}
}

// TestMixedBatch checks that in a batch of good and bad events the good ones
// are counted, cell by cell, and each bad one is reported once with its
// index, in index order, whichever check refused it.
func TestMixedBatch(t *testing.T) {
	h := start(t, aggregator.Options{MaxCellsPerWindow: 3})
	ts := h.ms(0)
	var b wire.Batch
	type want struct {
		reason wirepb.RejectReason
		cell   string // finest cell of a good event
		value  float64
	}
	var wants []want
	good := func(value float64, host int) {
		addGood(&b, ts, value, host, 1, 0)
		wants = append(wants, want{cell: cellOf(labels(host, 1, 0)), value: value})
	}
	bad := func(r wirepb.RejectReason, add func()) {
		add()
		wants = append(wants, want{reason: r})
	}
	good(1, 0)
	bad(wirepb.RejectReason_REJECT_REASON_NOT_FINITE, func() { addGood(&b, ts, math.NaN(), 0, 1, 0) })
	good(2, 1)
	bad(wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY, func() { b.Add("bytes", ts, 1, labels(0, 1, 0)...) })
	good(4, 2)
	// A fourth finest cell: refused after validation, by the cube.
	bad(wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT, func() { addGood(&b, ts, 1, 3, 1, 0) })
	bad(wirepb.RejectReason_REJECT_REASON_TOO_OLD, func() { addGood(&b, ts-2*time.Hour.Milliseconds(), 1, 0, 1, 0) })
	good(8, 0)
	bad(wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION, func() { b.Add(family, ts, 1, labels(0, 1, 0)[2:]...) })
	bad(wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA, func() { addGood(&b, ts, -1, 1, 1, 0) })
	good(16, 1)

	resp := h.push(t, b.Request())

	var wantRejects []string
	cells := map[string]tsdb.Step{}
	var accepted uint64
	for i, w := range wants {
		if w.reason != 0 {
			wantRejects = append(wantRejects, fmt.Sprintf("%d %v", i, w.reason))
			continue
		}
		accepted++
		s := cells[w.cell]
		s.Sum += w.value
		s.Count++
		cells[w.cell] = s
	}
	var gotRejects []string
	for _, r := range resp.Rejects {
		gotRejects = append(gotRejects, fmt.Sprintf("%d %v", r.Index, r.Reason))
		if r.Detail == "" {
			t.Errorf("reject %d has no detail", r.Index)
		}
	}
	if !slices.Equal(gotRejects, wantRejects) {
		t.Errorf("rejects\n%s\nwant\n%s", strings.Join(gotRejects, "\n"), strings.Join(wantRejects, "\n"))
	}
	if resp.Accepted != accepted {
		t.Errorf("accepted %d, want %d", resp.Accepted, accepted)
	}
	if got := h.counter(t, "dimsum_aggregator_events_accepted_total"); got != float64(accepted) {
		t.Errorf("accepted counter %v, want %d", got, accepted)
	}

	h.close(t)
	finest := h.schema.Family(family).Finest()
	got := h.read(t, 0, finest.ID)
	if len(got) != len(cells) {
		t.Errorf("store has %d finest cells %v, want %d", len(got), got, len(cells))
	}
	for cell, w := range cells {
		if g := got[cell]; g.Sum != w.Sum || g.Count != w.Count {
			t.Errorf("cell %s: sum %v count %d, want %v and %d", cell, g.Sum, g.Count, w.Sum, w.Count)
		}
	}
}

// TestCardinalityLimitPerWindow checks that the limit counts the finest cells
// of one window: a full window still takes events for its own cells, and the
// next window starts empty.
func TestCardinalityLimitPerWindow(t *testing.T) {
	h := start(t, aggregator.Options{MaxCellsPerWindow: 2})
	ts := h.ms(0)
	next := h.window.Add(10 * time.Second).UnixMilli()
	var b wire.Batch
	for host := range 4 {
		addGood(&b, ts, 1, host, 0, 0) // hosts 2 and 3 are refused
		addGood(&b, next, 1, host, 0, 0)
		addGood(&b, ts, 1, 0, 0, 0) // always an existing cell
	}
	resp := h.push(t, b.Request())
	var got []uint32
	for _, r := range resp.Rejects {
		if r.Reason != wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT {
			t.Errorf("reject %d: %v %s", r.Index, r.Reason, r.Detail)
		}
		got = append(got, r.Index)
	}
	if want := []uint32{6, 7, 9, 10}; !slices.Equal(got, want) {
		t.Errorf("rejected %v, want %v", got, want)
	}
	h.close(t)
	if got := h.total(t); got.Count != 8 {
		t.Errorf("store counts %d events, want 8", got.Count)
	}
}

// TestBatchTooLarge checks that a batch over MaxBatchEvents is refused whole
// and that the aggregator goes on taking batches.
func TestBatchTooLarge(t *testing.T) {
	h := start(t, aggregator.Options{MaxBatchEvents: 10})
	var big, ok wire.Batch
	for i := range 11 {
		addGood(&big, h.ms(0), 1, i, 0, 0)
		if i < 10 {
			addGood(&ok, h.ms(0), 2, i, 0, 0)
		}
	}
	resp, err := h.agg.Push(big.Request())
	if !errors.Is(err, aggregator.ErrBatchTooLarge) || resp != nil {
		t.Fatalf("Push of 11 events: %v, %v; want ErrBatchTooLarge", resp, err)
	}
	if !strings.Contains(err.Error(), "11") {
		t.Errorf("error %q does not say how many events the batch has", err)
	}
	if resp := h.push(t, ok.Request()); resp.Accepted != 10 {
		t.Errorf("batch of exactly 10: accepted %d", resp.Accepted)
	}
	h.close(t)
	if got := h.total(t); got.Sum != 20 || got.Count != 10 {
		t.Errorf("store holds sum %v count %d, want 20 and 10: the refused batch was counted", got.Sum, got.Count)
	}
}

// TestPushAfterClose checks that Push after Close is refused, and that Close
// may be called twice.
func TestPushAfterClose(t *testing.T) {
	h := start(t, aggregator.Options{})
	var b wire.Batch
	addGood(&b, h.ms(0), 1, 0, 0, 0)
	h.push(t, b.Request())
	h.close(t)
	h.close(t)
	if resp, err := h.agg.Push(b.Request()); !errors.Is(err, aggregator.ErrClosed) || resp != nil {
		t.Errorf("Push after Close: %v, %v; want ErrClosed", resp, err)
	}
	if got := h.total(t); got.Count != 1 {
		t.Errorf("store counts %d events, want 1", got.Count)
	}
}

// TestLateEvent checks that an event for a window already flushed goes out
// as a second flush of that window with the next sequence, and that the
// store counts both.
func TestLateEvent(t *testing.T) {
	const grace = 2 * time.Second
	h := start(t, aggregator.Options{Grace: grace, FlushInterval: time.Millisecond})
	w := h.window.UnixMilli()
	cell := cellOf(labels(0, 0, 0))
	finest := h.schema.Family(family).Finest().ID

	var b wire.Batch
	addGood(&b, w+1000, 3, 0, 0, 0)
	h.push(t, b.Request())
	if f := h.sink.flushes(); len(f) != 0 {
		t.Fatalf("%d flushes while the window is open", len(f))
	}

	// Close the window: the flush loop sends it.
	h.clock.Set(h.window.Add(10*time.Second + grace))
	poll(t, "the window's first flush", func() bool { return len(h.sink.flushes()) == 1 })
	if got := h.read(t, 0, finest)[cell]; got.Sum != 3 || got.Count != 1 {
		t.Errorf("after the first flush the store holds %v, want sum 3 count 1", got)
	}

	// Well past the grace period, but within MaxLateness.
	h.clock.Set(h.window.Add(10 * time.Minute))
	b.Reset()
	addGood(&b, w+2000, 4, 0, 0, 0)
	if resp := h.push(t, b.Request()); resp.Accepted != 1 {
		t.Fatalf("late event: %v", resp)
	}
	if got := h.counter(t, "dimsum_aggregator_events_late_total"); got != 1 {
		t.Errorf("late counter %v, want 1", got)
	}
	poll(t, "the window's second flush", func() bool { return len(h.sink.flushes()) == 2 })
	h.close(t)

	f := h.sink.flushes()
	if len(f) != 2 {
		t.Fatalf("%d flushes, want 2", len(f))
	}
	for i, r := range f {
		if r.Source != h.agg.Source() || r.WindowStartMs != w {
			t.Errorf("flush %d is of (%q, %d), want (%q, %d)", i, r.Source, r.WindowStartMs, h.agg.Source(), w)
		}
		if len(r.CellCounts) != 16 {
			t.Errorf("flush %d has %d cells, want one per cuboid", i, len(r.CellCounts))
		}
	}
	if f[1].Sequence <= f[0].Sequence {
		t.Errorf("the late flush has sequence %d, the first %d: want a higher one", f[1].Sequence, f[0].Sequence)
	}
	if n := h.sink.duplicates(); n != 0 {
		t.Errorf("the combiner took %d flushes as duplicates", n)
	}
	if got := h.read(t, 0, finest)[cell]; got.Sum != 7 || got.Count != 2 {
		t.Errorf("store holds %v, want sum 7 count 2", got)
	}
	// The flush lag is the time from the window's end to each delivery:
	// the grace for the first, 9m50s for the late delta.
	if n, sum := h.histogram(t, "dimsum_aggregator_flush_lag_seconds"); n != 2 || sum != 2+590 {
		t.Errorf("flush lag: %d observations summing to %vs, want 2 summing to 592s", n, sum)
	}
}

// lossySink applies each flush to the real combiner and then, while lose is
// set, reports an error, as a flush does whose reply is lost after the
// combiner committed it (a deadline exceeded on a slow link).
type lossySink struct {
	oneReplica
	next *combinerSink
	lose atomic.Bool
	lost atomic.Int32 // replies lost so far
}

func (s *lossySink) Flush(ctx context.Context, replica string, req *wire.Flush) error {
	err := s.next.Flush(ctx, replica, req)
	if s.lose.Load() {
		s.lost.Add(1)
		return context.DeadlineExceeded
	}
	return err
}

// TestCloseResendsUndeliveredFlush checks that a loop flush still being
// retried when Close begins goes out again under its own identity: its
// failed attempt may have been applied, and the combiner must be able to
// recognise the retry, or the window would count twice.
func TestCloseResendsUndeliveredFlush(t *testing.T) {
	h := newHarness(t, schema.Default())
	sink := &lossySink{next: h.sink}
	a, err := aggregator.New(aggregator.Options{Schema: h.schema, Sink: sink, Now: h.clock.Now,
		Grace: time.Second, FlushInterval: time.Millisecond, RetryBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	var b wire.Batch
	addGood(&b, h.ms(0), 5, 0, 0, 0)
	if _, err := a.Push(b.Request()); err != nil {
		t.Fatal(err)
	}
	sink.lose.Store(true)
	h.clock.Set(h.window.Add(11 * time.Second))
	// The loop's first attempt is applied but reported lost; its next
	// attempt is an hour away, so Close interrupts it.
	poll(t, "the first flush attempt", func() bool { return sink.lost.Load() > 0 })
	sink.lose.Store(false)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	f := sink.next.flushes()
	if len(f) != 2 {
		t.Fatalf("the combiner saw %d flushes, want 2", len(f))
	}
	if f[0].Source != f[1].Source || f[0].WindowStartMs != f[1].WindowStartMs || f[0].Sequence != f[1].Sequence {
		t.Errorf("the resent flush has identity (%q, %d, %d), the first (%q, %d, %d)",
			f[1].Source, f[1].WindowStartMs, f[1].Sequence, f[0].Source, f[0].WindowStartMs, f[0].Sequence)
	}
	if n := sink.next.duplicates(); n != 1 {
		t.Errorf("the combiner took %d flushes as duplicates, want 1", n)
	}
	if got := h.total(t); got.Sum != 5 || got.Count != 1 {
		t.Errorf("store holds sum %v count %d, want 5 and 1", got.Sum, got.Count)
	}
}

// TestCloseFlushesOpenWindows checks that Close sends windows whose grace
// has not passed, each once, in window order, under growing sequences.
func TestCloseFlushesOpenWindows(t *testing.T) {
	h := start(t, aggregator.Options{FlushInterval: time.Millisecond})
	var b wire.Batch
	for i := range 3 {
		addGood(&b, h.ms(time.Duration(i)*10*time.Second), float64(i+1), 0, 0, 0)
	}
	h.push(t, b.Request())
	h.close(t)
	var got []int64
	flushes := h.sink.flushes()
	for i, f := range flushes {
		got = append(got, (f.WindowStartMs-h.window.UnixMilli())/1000)
		if f.Source != h.agg.Source() || (i > 0 && f.Sequence <= flushes[i-1].Sequence) {
			t.Errorf("flush %d has identity (%q, %d), want (%q, a sequence above the last)", i, f.Source, f.Sequence, h.agg.Source())
		}
	}
	if want := []int64{0, 10, 20}; !slices.Equal(got, want) {
		t.Errorf("flushed windows (offsets in s) %v, want %v", got, want)
	}
	if got := h.total(t); got.Sum != 6 || got.Count != 3 {
		t.Errorf("store holds %v, want sum 6 count 3", got)
	}
}

// TestLattice checks that every event reaches every cuboid of its family's
// lattice: per cuboid the cells are the distinct projections of the events,
// each holding the sum of its events, so every cuboid sums to the total, at
// every resolution.
func TestLattice(t *testing.T) {
	h := start(t, aggregator.Options{})
	fam := h.schema.Family(family)
	cuboids := fam.Cuboids()
	if len(cuboids) != 16 {
		t.Fatalf("default family has %d cuboids, want 16", len(cuboids))
	}

	rng := rand.New(rand.NewPCG(1, 2))
	var b wire.Batch
	var events [][]string
	var total float64
	for range 2000 {
		l := labels(rng.IntN(12), rng.IntN(5), rng.IntN(3))
		v := float64(rng.IntN(100))
		b.Add(family, h.ms(-time.Duration(rng.IntN(15000))*time.Millisecond), v, l...)
		events = append(events, l)
		total += v
	}
	resp := h.push(t, b.Request())
	if resp.Accepted != 2000 {
		t.Fatalf("accepted %d of 2000: %v", resp.Accepted, resp.Rejects)
	}
	h.close(t)

	for res := range h.schema.Resolutions {
		for _, c := range cuboids {
			want := map[string]tsdb.Step{}
			for i, l := range events {
				var vals []string
				for _, name := range c.Labels {
					vals = append(vals, l[slices.Index(l, name)+1])
				}
				k := strings.Join(vals, "/")
				s := want[k]
				s.Sum += b.Request().Events[i].Value
				s.Count++
				want[k] = s
			}
			got := h.read(t, res, c.ID)
			var sum tsdb.Step
			for _, s := range got {
				sum.Sum += s.Sum
				sum.Count += s.Count
			}
			if sum.Sum != total || sum.Count != 2000 {
				t.Errorf("resolution %v, cuboid %v: cells sum to %v over %d events, want %v over 2000", h.schema.Resolutions[res], c.Labels, sum.Sum, sum.Count, total)
			}
			if len(got) != len(want) {
				t.Errorf("resolution %v, cuboid %v: %d cells, want %d", h.schema.Resolutions[res], c.Labels, len(got), len(want))
			}
			for k, w := range want {
				if got[k] != w {
					t.Errorf("resolution %v, cuboid %v, cell %q: %+v, want %+v", h.schema.Resolutions[res], c.Labels, k, got[k], w)
				}
			}
		}
	}
	if got := h.total(t); got.Sum != total {
		t.Errorf("apex sum %v, want %v", got.Sum, total)
	}
}

// TestOptionsValidate checks every error of Options.Validate, and that New
// refuses what Validate refuses.
func TestOptionsValidate(t *testing.T) {
	hourly, err := schema.Parse([]byte("resolutions: [\"10s:1h\"]\nfamilies: [{name: requests, dimensions: [host]}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	valid := func() aggregator.Options {
		o := aggregator.Options{Schema: schema.Default(), Sink: &combinerSink{}}
		o.EnsureDefaults()
		return o
	}
	f := func(name string, edit func(o *aggregator.Options), want string) {
		t.Helper()
		t.Run(name, func(t *testing.T) {
			o := valid()
			edit(&o)
			err := o.Validate()
			switch {
			case want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case want == "":
				return
			case !errors.Is(err, aggregator.ErrOptions):
				t.Fatalf("Validate: %v, want ErrOptions", err)
			case !strings.Contains(err.Error(), want):
				t.Errorf("Validate: %q does not say %q", err, want)
			}
			if a, err := aggregator.New(o); err == nil || !errors.Is(err, aggregator.ErrOptions) {
				if a != nil {
					a.Close()
				}
				t.Errorf("New: %v, want ErrOptions", err)
			}
		})
	}
	f("defaults", func(o *aggregator.Options) {}, "")
	f("no schema", func(o *aggregator.Options) { o.Schema = nil }, "no schema")
	f("no sink", func(o *aggregator.Options) { o.Sink = nil }, "no sink")
	f("negative grace", func(o *aggregator.Options) { o.Grace = -time.Second }, "negative grace")
	f("negative lateness", func(o *aggregator.Options) { o.MaxLateness = -time.Second }, "negative lateness")
	f("negative skew", func(o *aggregator.Options) { o.MaxFutureSkew = -time.Second }, "skew")
	f("lateness beyond retention", func(o *aggregator.Options) {
		o.Schema = hourly
		o.MaxLateness = time.Hour + time.Second
	}, "exceeds the finest retention")
	f("lateness at retention", func(o *aggregator.Options) {
		o.Schema = hourly
		o.MaxLateness = time.Hour
	}, "")
	f("negative batch limit", func(o *aggregator.Options) { o.MaxBatchEvents = -1 }, "negative limit")
	f("label limit over the ceiling", func(o *aggregator.Options) { o.MaxLabelValueBytes = aggregator.LabelBytesCeiling + 1 }, "may exceed")
	f("negative log bound", func(o *aggregator.Options) { o.WALMaxBytes = -1 }, "write-ahead log")
	f("negative segment size", func(o *aggregator.Options) { o.WALSegmentBytes = -1 }, "write-ahead log")
	f("negative cell limit", func(o *aggregator.Options) { o.MaxCellsPerWindow = -1 }, "negative limit")
	f("negative flush interval", func(o *aggregator.Options) { o.FlushInterval = -time.Second }, "flush interval")
	f("negative retry backoff", func(o *aggregator.Options) { o.RetryBackoff = -time.Second }, "retry backoff")

	t.Run("zero value", func(t *testing.T) {
		var o aggregator.Options
		o.EnsureDefaults()
		if err := o.Validate(); !errors.Is(err, aggregator.ErrOptions) {
			t.Errorf("Validate of the zero value: %v, want ErrOptions (no schema)", err)
		}
		o = aggregator.Options{Schema: schema.Default(), Sink: &combinerSink{}}
		o.EnsureDefaults()
		want := aggregator.Options{Grace: 10 * time.Second, MaxLateness: time.Hour, MaxFutureSkew: time.Minute,
			MaxBatchEvents: 100_000, MaxCellsPerWindow: 1_000_000, FlushInterval: time.Second, RetryBackoff: 200 * time.Millisecond}
		if o.Grace != want.Grace || o.MaxLateness != want.MaxLateness || o.MaxFutureSkew != want.MaxFutureSkew ||
			o.MaxBatchEvents != want.MaxBatchEvents || o.MaxCellsPerWindow != want.MaxCellsPerWindow ||
			o.FlushInterval != want.FlushInterval || o.RetryBackoff != want.RetryBackoff ||
			o.Name == "" || o.Logger == nil || o.Now == nil {
			t.Errorf("defaults %+v", o)
		}
	})
}

// TestFlushListsCellsInOrderMade requires a flush to list each cuboid's
// cells in the order of their first events, so that the store numbers a
// cell and its only child alike and a read following the first's alias row
// to the second moves forward: with the cells in a map's order, reading a
// cuboid of aliases cost a seek a cell.
func TestFlushListsCellsInOrderMade(t *testing.T) {
	h := start(t, aggregator.Options{FlushInterval: time.Millisecond})
	w := h.window.UnixMilli()
	order := []int{5, 2, 7, 0, 11, 3, 9}
	var b wire.Batch
	for i, host := range order {
		addGood(&b, w+int64(i), 1, host, 0, 0)
	}
	h.push(t, b.Request())
	h.clock.Set(h.window.Add(time.Minute))
	poll(t, "the window's flush", func() bool { return len(h.sink.flushes()) == 1 })
	h.close(t)

	f := h.sink.flushes()[0]
	fam := h.schema.Family(family)
	hosts := map[uint32][]string{} // the hosts of each cuboid keeping them, in flush order
	values := f.CellValues
	for _, id := range f.CellCuboids {
		c, _ := fam.Cuboid(schema.CuboidID(id))
		vals := values[:len(c.Labels)]
		values = values[len(c.Labels):]
		if j := slices.Index(c.Labels, "host"); j >= 0 {
			hosts[id] = append(hosts[id], f.Dict[vals[j]])
		}
	}
	var want []string
	for _, host := range order {
		want = append(want, fmt.Sprintf("host%03d", host))
	}
	if len(hosts) != 4 {
		t.Fatalf("%d cuboids keep the host, want 4", len(hosts))
	}
	for id, got := range hosts {
		if !slices.Equal(got, want) {
			t.Errorf("cuboid %d lists hosts %v, want %v", id, got, want)
		}
	}
}

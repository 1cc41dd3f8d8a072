package aggregator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Sink takes the partial cubes of closed windows: in a node, a gRPC client of
// the combiner that owns them. Flush must be safe to retry with the same
// request; the combiner applies a flush identity once.
type Sink interface {
	Flush(ctx context.Context, req *wirepb.FlushRequest) error
}

var (
	// ErrBatchTooLarge is returned for a batch over MaxBatchEvents. Nothing
	// of it is taken.
	ErrBatchTooLarge = errors.New("aggregator: batch too large")
	// ErrClosed is returned by Push after Close.
	ErrClosed = errors.New("aggregator: closed")
)

// Aggregator validates events, rolls each one up into every cuboid of its
// family in an in-memory cube per window, and flushes a window's partial cube
// to the Sink once the window's grace period has passed.
type Aggregator struct {
	opts    Options
	source  string            // Name plus incarnation, in every flush identity
	window  schema.Resolution // the finest resolution; its step is the window
	step    int64             // window length, ms
	fams    []*family
	byName  map[string]int
	metrics *metrics

	mu struct {
		sync.Mutex
		closed bool
		// intern maps a dimension value to its ID; values is the reverse.
		// ID 0 is reserved for "label absent in this cuboid". values only
		// grows, and its elements never change, so a copy of the slice
		// header taken under mu stays valid outside it.
		intern map[string]uint32
		values []string
		// windows holds the open (and late) windows by start time.
		windows map[int64]*window
		// sources remembers the recent batch sequences of each publisher
		// source, so that a retried batch is counted once.
		sources map[string]*seqWindow
		// seq is the sequence of the next flush. It grows across windows,
		// so (source, window, sequence) never repeats within an
		// incarnation, however late a window is reopened.
		seq uint64
	}

	flushMu sync.Mutex // one flush at a time, so sequences go out in order
	// pending holds the requests a loop flush could not deliver before
	// Close; guarded by flushMu.
	pending []*wirepb.FlushRequest
	stop    chan struct{}
	done    chan struct{}
}

// family is the aggregator's precomputed view of a schema family.
type family struct {
	*schema.Family
	// masks hold, per cuboid ID, a bit per family label the cuboid keeps.
	masks  []uint16
	finest schema.CuboidID
}

// cellKey identifies one cell: a family, a cuboid, and the interned value of
// each label the cuboid keeps (0 elsewhere). It is a fixed-size comparable
// array so that looking a cell up allocates nothing.
type cellKey struct {
	fam    uint16
	cuboid schema.CuboidID
	v      [schema.MaxLevels]uint32
}

type agg struct {
	sum   float64
	count uint64
}

// window is the cube of one window. An event's finest cell (a leaf) is found
// with one map lookup; the leaf's fan lists where its value goes in every
// cuboid, so an event of a known leaf costs one lookup, not one per cuboid.
type window struct {
	// leaves maps a finest cell to the offset of its fan in fan.
	leaves map[cellKey]int32
	// fan holds, per leaf, the aggs index of the leaf's cell in each
	// cuboid, by cuboid ID.
	fan []int32
	// cells maps the cells of every cuboid but the finest to aggs.
	cells  map[cellKey]int32
	aggs   []agg
	finest []int // leaves per family, for the cardinality limit
}

func newWindow(families int) *window {
	return &window{leaves: map[cellKey]int32{}, cells: map[cellKey]int32{}, finest: make([]int, families)}
}

// addLeaf creates a leaf, finding or creating its cell in every cuboid, and
// returns the offset of its fan.
func (w *window) addLeaf(f *family, leaf cellKey) int32 {
	off := int32(len(w.fan))
	key := leaf
	for c, mask := range f.masks {
		if schema.CuboidID(c) == f.finest {
			w.fan = append(w.fan, int32(len(w.aggs)))
			w.aggs = append(w.aggs, agg{})
			continue
		}
		key.cuboid = schema.CuboidID(c)
		for j := range key.v {
			if mask&(1<<j) != 0 {
				key.v[j] = leaf.v[j]
			} else {
				key.v[j] = 0
			}
		}
		i, ok := w.cells[key]
		if !ok {
			i = int32(len(w.aggs))
			w.aggs = append(w.aggs, agg{})
			w.cells[key] = i
		}
		w.fan = append(w.fan, i)
	}
	w.leaves[leaf] = off
	w.finest[leaf.fam]++
	return off
}

// New builds an aggregator and starts its flush loop.
func New(opts Options) (*Aggregator, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	a := &Aggregator{
		opts: opts,
		// The wall clock and a random number, so that no two incarnations
		// of one name share a source, whatever clock the options inject.
		source:  opts.Name + "/" + strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + strconv.FormatUint(uint64(rand.Uint32()), 36),
		window:  opts.Schema.Resolutions[0],
		step:    opts.Schema.Window().Milliseconds(),
		byName:  map[string]int{},
		metrics: newMetrics(opts.Registerer),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	for i, f := range opts.Schema.Families {
		cuboids := f.Cuboids()
		fam := &family{Family: f, finest: f.Finest().ID, masks: make([]uint16, len(cuboids))}
		for _, c := range cuboids {
			for _, s := range c.Slots {
				fam.masks[c.ID] |= 1 << s
			}
		}
		a.fams = append(a.fams, fam)
		a.byName[f.Name] = i
	}
	a.mu.intern = map[string]uint32{}
	a.mu.values = []string{""}
	a.mu.windows = map[int64]*window{}
	a.mu.sources = map[string]*seqWindow{}
	go a.loop()
	return a, nil
}

// Source is the identity this aggregator puts on its flushes.
func (a *Aggregator) Source() string { return a.source }

// event is a validated event, its labels as batch dictionary indexes plus 1.
type event struct {
	index int
	fam   int
	ts    int64
	value float64
	vals  [schema.MaxLevels]uint32
}

var eventPool = sync.Pool{New: func() any { return new([]event) }}

// Push validates and counts a batch. Every event is either counted or listed
// in the response's rejects with its index and reason. A batch whose identity
// (source, batch sequence) was counted recently is acknowledged with
// Duplicate set and not counted again.
func (a *Aggregator) Push(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	if n := len(req.Events); n > a.opts.MaxBatchEvents {
		a.metrics.batchesRefused.Inc()
		return nil, fmt.Errorf("%w: %d events, at most %d", ErrBatchTooLarge, n, a.opts.MaxBatchEvents)
	}
	now := a.opts.Now().UnixMilli()
	resp := &wirepb.PushResponse{}
	evp := eventPool.Get().(*[]event)
	evs := (*evp)[:0]
	v := validator{a: a, dict: req.Dict, now: now}
	for i, e := range req.Events {
		ev := event{index: i}
		if reason, detail := v.check(e, &ev); reason != wirepb.RejectReason_REJECT_REASON_UNSPECIFIED {
			resp.Rejects = append(resp.Rejects, &wirepb.Reject{Index: uint32(i), Reason: reason, Detail: detail})
			continue
		}
		evs = append(evs, ev)
	}

	a.mu.Lock()
	if a.mu.closed {
		a.mu.Unlock()
		*evp = evs
		eventPool.Put(evp)
		return nil, ErrClosed
	}
	switch a.markLocked(req, now) {
	case seqRepeat:
		a.mu.Unlock()
		*evp = evs
		eventPool.Put(evp)
		a.metrics.duplicates.Inc()
		resp.Duplicate = true
		resp.Accepted = uint64(len(evs))
		return resp, nil
	case seqForgotten:
		a.metrics.forgotten.Inc()
	}
	ids := make([]uint32, len(req.Dict)) // batch dictionary index -> interned ID
	late := 0
	for i := range evs {
		ev := &evs[i]
		for j := range a.fams[ev.fam].Labels {
			d := ev.vals[j] - 1
			if ids[d] == 0 {
				ids[d] = a.internLocked(req.Dict[d])
			}
			ev.vals[j] = ids[d]
		}
		start := a.window.StepStart(ev.ts)
		if reason := a.addLocked(ev, start); reason != noReason {
			r := &wirepb.Reject{Index: uint32(ev.index), Reason: reason}
			if reason == wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT {
				r.Detail = fmt.Sprintf("family %q has %d cells in this window, the limit", a.fams[ev.fam].Name, a.opts.MaxCellsPerWindow)
			} else {
				r.Detail = fmt.Sprintf("value %v would overflow the window's total of family %q", ev.value, a.fams[ev.fam].Name)
			}
			resp.Rejects = append(resp.Rejects, r)
			continue
		}
		if start+a.step+a.opts.Grace.Milliseconds() <= now {
			late++
		}
		resp.Accepted++
	}
	a.mu.Unlock()
	*evp = evs
	eventPool.Put(evp)

	slices.SortFunc(resp.Rejects, func(x, y *wirepb.Reject) int { return int(x.Index) - int(y.Index) })
	a.metrics.accepted.Add(float64(resp.Accepted))
	a.metrics.late.Add(float64(late))
	for _, r := range resp.Rejects {
		a.metrics.rejected.WithLabelValues(wire.ReasonName(r.Reason)).Inc()
	}
	return resp, nil
}

func (a *Aggregator) internLocked(s string) uint32 {
	if id, ok := a.mu.intern[s]; ok {
		return id
	}
	id := uint32(len(a.mu.values))
	a.mu.values = append(a.mu.values, s)
	a.mu.intern[s] = id
	return id
}

// addLocked rolls one event up into every cuboid of its family in the window
// starting at start. It changes nothing and returns a reject reason when the
// event would create a finest cell beyond the cardinality limit, or would
// overflow a sum to infinity.
func (a *Aggregator) addLocked(ev *event, start int64) wirepb.RejectReason {
	w := a.mu.windows[start]
	if w == nil {
		w = newWindow(len(a.fams))
		a.mu.windows[start] = w
	}
	f := a.fams[ev.fam]
	leaf := cellKey{fam: uint16(ev.fam), cuboid: f.finest, v: ev.vals}
	off, ok := w.leaves[leaf]
	// Counter values are non-negative, so the apex cell (cuboid 0, every
	// label absent) holds the largest sum of the family's window: if it
	// stays finite, every cell does.
	apex, hasApex := int32(0), true
	if ok {
		apex = w.fan[off]
	} else {
		apex, hasApex = w.cells[cellKey{fam: uint16(ev.fam)}]
	}
	if hasApex && math.IsInf(w.aggs[apex].sum+ev.value, 0) {
		return wirepb.RejectReason_REJECT_REASON_NOT_FINITE
	}
	if !ok {
		if w.finest[ev.fam] >= a.opts.MaxCellsPerWindow {
			return wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT
		}
		off = w.addLeaf(f, leaf)
	}
	for _, i := range w.fan[off : off+int32(len(f.masks))] {
		w.aggs[i].sum += ev.value
		w.aggs[i].count++
	}
	return noReason
}

// validator checks events of one batch, caching per family which dictionary
// entries name which label.
type validator struct {
	a     *Aggregator
	dict  []string
	now   int64
	slots [][]int8 // per family, per dict index: label slot, -1 none, -2 unknown yet
}

const noReason = wirepb.RejectReason_REJECT_REASON_UNSPECIFIED

func (v *validator) check(e *wirepb.Event, ev *event) (wirepb.RejectReason, string) {
	if int(e.Family) >= len(v.dict) {
		return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("family index %d is outside the dictionary of %d strings", e.Family, len(v.dict))
	}
	fi, ok := v.a.byName[v.dict[e.Family]]
	if !ok {
		return wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY, fmt.Sprintf("unknown family %q", v.dict[e.Family])
	}
	f := v.a.fams[fi]
	if len(e.Labels)%2 != 0 {
		return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("%d label indexes, want name/value pairs", len(e.Labels))
	}
	if v.slots == nil {
		v.slots = make([][]int8, len(v.a.fams))
	}
	if v.slots[fi] == nil {
		v.slots[fi] = make([]int8, len(v.dict))
		for i := range v.slots[fi] {
			v.slots[fi][i] = -2
		}
	}
	slots := v.slots[fi]
	var seen uint16
	for i := 0; i < len(e.Labels); i += 2 {
		n, val := e.Labels[i], e.Labels[i+1]
		if int(n) >= len(v.dict) || int(val) >= len(v.dict) {
			return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("label indexes %d, %d: outside the dictionary of %d strings", n, val, len(v.dict))
		}
		if slots[n] == -2 {
			slots[n] = -1
			if s, ok := f.LabelIndex(v.dict[n]); ok {
				slots[n] = int8(s)
			}
		}
		s := slots[n]
		switch {
		case s < 0:
			return wirepb.RejectReason_REJECT_REASON_UNKNOWN_DIMENSION, fmt.Sprintf("label %q is not a dimension of family %q", v.dict[n], f.Name)
		case seen&(1<<s) != 0:
			return wirepb.RejectReason_REJECT_REASON_DUPLICATE_DIMENSION, fmt.Sprintf("label %q appears twice", v.dict[n])
		case v.dict[val] == "":
			return wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION, fmt.Sprintf("label %q is empty", v.dict[n])
		}
		seen |= 1 << s
		ev.vals[s] = val + 1
	}
	if want := uint16(1)<<len(f.Labels) - 1; seen != want {
		for s, l := range f.Labels {
			if seen&(1<<s) == 0 {
				return wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION, fmt.Sprintf("label %q of family %q is missing", l, f.Name)
			}
		}
	}
	switch {
	case math.IsNaN(e.Value) || math.IsInf(e.Value, 0):
		return wirepb.RejectReason_REJECT_REASON_NOT_FINITE, fmt.Sprintf("value %v is not finite", e.Value)
	case e.Value < 0 && f.Kind == schema.KindCounter:
		return wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA, fmt.Sprintf("counter delta %v is negative", e.Value)
	case e.TimestampMs < v.now-v.a.opts.MaxLateness.Milliseconds():
		return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the maximum lateness %s", time.UnixMilli(e.TimestampMs).UTC().Format(time.RFC3339Nano), v.a.opts.MaxLateness)
	case e.TimestampMs > v.now+v.a.opts.MaxFutureSkew.Milliseconds():
		return wirepb.RejectReason_REJECT_REASON_TOO_NEW, fmt.Sprintf("timestamp %s is more than %s ahead of this node's clock", time.UnixMilli(e.TimestampMs).UTC().Format(time.RFC3339Nano), v.a.opts.MaxFutureSkew)
	}
	ev.fam = fi
	ev.ts = e.TimestampMs
	ev.value = e.Value
	return noReason, ""
}

// loop flushes closed windows until Close.
func (a *Aggregator) loop() {
	defer close(a.done)
	for {
		jitter := time.Duration(rand.Int64N(int64(a.opts.FlushInterval)/10 + 1))
		select {
		case <-a.stop:
			return
		case <-time.After(a.opts.FlushInterval + jitter):
		}
		a.forgetSources(a.opts.Now().UnixMilli())
		a.flush(false)
	}
}

// flush sends every window whose grace has passed (all of them when final)
// to the sink, retrying each until it is taken. A loop flush interrupted by
// Close leaves its undelivered requests in pending, and the final flush sends
// them first under the same identities: an attempt that failed on this side
// may still have been applied by the combiner, so the data must never go out
// again under a new sequence.
func (a *Aggregator) flush(final bool) {
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	now := a.opts.Now().UnixMilli()
	grace := a.opts.Grace.Milliseconds()

	type ready struct {
		start int64
		w     *window
	}
	var todo []ready
	a.mu.Lock()
	for start, w := range a.mu.windows {
		if final || start+a.step+grace <= now {
			todo = append(todo, ready{start: start, w: w})
			delete(a.mu.windows, start)
		}
	}
	values := a.mu.values
	open, live := len(a.mu.windows), 0
	for _, w := range a.mu.windows {
		live += len(w.aggs)
	}
	a.mu.Unlock()
	a.metrics.openWindows.Set(float64(open))
	a.metrics.liveCells.Set(float64(live))
	slices.SortFunc(todo, func(x, y ready) int { return cmp.Compare(x.start, y.start) })

	var fresh []*wirepb.FlushRequest
	for _, r := range todo {
		fresh = append(fresh, a.flushRequests(r.start, r.w, values)...)
	}
	a.mu.Lock()
	for _, req := range fresh {
		req.Sequence = a.mu.seq
		a.mu.seq++
	}
	a.mu.Unlock()
	reqs := append(a.pending, fresh...)
	a.pending = nil
	deadline := time.Now().Add(finalFlushTimeout)
	for i, req := range reqs {
		err := a.send(req, final, deadline)
		switch {
		case errors.Is(err, errStopping):
			a.pending = reqs[i:]
			return
		case errors.Is(err, errRefused):
			a.opts.Logger.Error("partial cube lost: the combiner refused it",
				"window", time.UnixMilli(req.WindowStartMs).UTC(), "sequence", req.Sequence, "cells", len(req.Cells), "err", err)
		case err != nil:
			a.opts.Logger.Error("partial cube lost: the combiner did not take it before shutdown",
				"window", time.UnixMilli(req.WindowStartMs).UTC(), "sequence", req.Sequence, "cells", len(req.Cells), "err", err)
		}
	}
}

// maxFlushCells bounds the cells of one flush request. A request holds about
// 36 bytes a cell, so a window of any size goes out in requests of about
// 3.6 MB, well under the combiner's message limit.
const maxFlushCells = 100_000

// flushRequests encodes one window's cells as requests of at most
// maxFlushCells cells, each with its own string dictionary. The caller
// numbers them.
func (a *Aggregator) flushRequests(start int64, w *window, values []string) []*wirepb.FlushRequest {
	var (
		reqs   []*wirepb.FlushRequest
		req    *wirepb.FlushRequest
		remap  map[uint32]uint32
		fams   []uint32 // dictionary index of each family's name in req
		cells  = make([]wirepb.FlushCell, len(w.aggs))
		filled int
	)
	add := func(key cellKey, i int32) {
		if req == nil || len(req.Cells) == maxFlushCells {
			req = &wirepb.FlushRequest{Source: a.source, WindowStartMs: start}
			req.Cells = make([]*wirepb.FlushCell, 0, min(maxFlushCells, len(w.aggs)-filled))
			remap = map[uint32]uint32{}
			fams = make([]uint32, len(a.fams))
			for i, f := range a.fams {
				fams[i] = uint32(len(req.Dict))
				req.Dict = append(req.Dict, f.Name)
			}
			reqs = append(reqs, req)
		}
		c := &cells[i]
		c.Family = fams[key.fam]
		c.Cuboid = uint32(key.cuboid)
		mask := a.fams[key.fam].masks[key.cuboid]
		for j := range key.v {
			if mask&(1<<j) == 0 {
				continue
			}
			d, ok := remap[key.v[j]]
			if !ok {
				d = uint32(len(req.Dict))
				req.Dict = append(req.Dict, values[key.v[j]])
				remap[key.v[j]] = d
			}
			c.Values = append(c.Values, d)
		}
		c.Sum = w.aggs[i].sum
		c.Count = w.aggs[i].count
		req.Cells = append(req.Cells, c)
		filled++
	}
	for key, i := range w.cells {
		add(key, i)
	}
	for key, off := range w.leaves {
		add(key, w.fan[off+int32(key.cuboid)])
	}
	return reqs
}

// send delivers a flush, retrying with backoff. A final send gives up at the
// deadline; any other gives up only when the aggregator is closing, with
// errStopping.
func (a *Aggregator) send(req *wirepb.FlushRequest, final bool, deadline time.Time) error {
	backoff := a.opts.RetryBackoff
	for {
		timeout := flushTimeout
		if final {
			timeout = max(min(timeout, time.Until(deadline)), time.Millisecond)
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		err := a.opts.Sink.Flush(ctx, req)
		cancel()
		if err == nil {
			a.metrics.flushes.Inc()
			a.metrics.flushedCells.Add(float64(len(req.Cells)))
			return nil
		}
		a.metrics.flushErrors.Inc()
		if status.Code(err) == codes.InvalidArgument {
			// The combiner refused the flush as malformed: no retry can
			// change that, and retrying would hold up every later window.
			return fmt.Errorf("%w: %w", errRefused, err)
		}
		a.opts.Logger.Warn("flush failed, retrying", "window", time.UnixMilli(req.WindowStartMs).UTC(),
			"sequence", req.Sequence, "cells", len(req.Cells), "backoff", backoff, "err", err)
		if final {
			if time.Now().Add(backoff).After(deadline) {
				return err
			}
			time.Sleep(backoff)
		} else {
			select {
			case <-a.stop:
				return errStopping
			case <-time.After(backoff):
			}
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

const (
	flushTimeout      = 10 * time.Second
	finalFlushTimeout = 30 * time.Second
)

var (
	// errStopping interrupts a loop flush's retries when Close begins.
	errStopping = errors.New("aggregator: stopping")
	// errRefused marks a flush the combiner refused as malformed.
	errRefused = errors.New("aggregator: flush refused")
)

// Close stops taking events and flushes every window, open or not, so a
// graceful stop loses nothing the combiner can take within 30s.
func (a *Aggregator) Close() error {
	a.mu.Lock()
	if a.mu.closed {
		a.mu.Unlock()
		return nil
	}
	a.mu.closed = true
	a.mu.Unlock()
	close(a.stop)
	<-a.done
	a.flush(true)
	return nil
}

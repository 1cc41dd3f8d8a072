package aggregator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dimsum/dimsum/internal/dedupe"
	"github.com/dimsum/dimsum/internal/disk"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Sink takes the partial cubes of closed windows: in a node, gRPC clients
// of the combiners that hold each shard of the global cube.
type Sink interface {
	// Shards is how many shards the global cube is split into (1:
	// unsharded).
	Shards() int
	// Replicas names the combiners that hold a shard now; at least one.
	Replicas(shard uint32) []string
	// Flush delivers one request to one named combiner. It must be safe to
	// retry; the combiner applies a flush identity once.
	Flush(ctx context.Context, replica string, f *wire.Flush) error
}

// Peers delivers the parts of a batch that other aggregators own (see
// PushRouted): in a node, gRPC clients of the other aggregators
// (PeerClients).
type Peers interface {
	// Forward delivers one part to the aggregator that owns it, which
	// counts it with PushForwarded. It must be safe to retry: the part
	// carries the publisher's batch identity, and the owner counts an
	// identity once.
	Forward(ctx context.Context, owner string, req *wirepb.PushRequest) (*wirepb.PushResponse, error)
}

var (
	// ErrBatchTooLarge is returned for a batch over MaxBatchEvents. Nothing
	// of it is taken.
	ErrBatchTooLarge = errors.New("aggregator: batch too large")
	// ErrClosed is returned by Push after Close.
	ErrClosed = errors.New("aggregator: closed")
	// ErrLogFull is returned by Push while the write-ahead log is over
	// WALMaxBytes: its windows cannot go out (a combiner is down), and
	// taking more would grow the log without bound. Nothing of the batch
	// is taken; the publisher should retry later.
	ErrLogFull = errors.New("aggregator: write-ahead log full")
	// ErrBehind is returned by Push while the flushes waiting for the
	// combiners hold more than MaxPendingBytes: the store takes less than
	// the aggregator does, and taking more would queue without bound.
	// Nothing of the batch is taken; the publisher should retry later.
	ErrBehind = errors.New("aggregator: the combiners are behind")
	// ErrDiskLow is returned by Push while the log's filesystem has less
	// free space than MinFreeBytes. Nothing of the batch is taken; the
	// publisher should retry later.
	ErrDiskLow = errors.New("aggregator: free disk space below the floor")
	// ErrLogFailed is returned by Push when the write-ahead log cannot
	// write: the batch is not known to be durable here, and another node
	// may take it.
	ErrLogFailed = errors.New("aggregator: write-ahead log failed")
	// ErrNotReady is returned by Push while Options.Ready reports an
	// error.
	ErrNotReady = errors.New("aggregator: not ready")
	// ErrNotInternal refuses a batch marked as forwarded by another
	// aggregator on a listener that is not the cluster's internal one:
	// only a member may say that a batch was checked already.
	ErrNotInternal = errors.New("aggregator: a forwarded batch is taken only on the internal listener")
)

// Aggregator validates events, rolls each one up into every cuboid of its
// family in an in-memory cube per window, and flushes a window's partial cube
// to the Sink once the window's grace period has passed.
type Aggregator struct {
	opts   Options
	source string // Name plus incarnation, in every flush identity
	// forwardSeq numbers the forwarded parts of batches that came without
	// an identity.
	forwardSeq atomic.Uint64
	// pushes counts the pushes past the closed check that have not yet
	// queued their forwarded parts.
	pushes  sync.WaitGroup
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
		// hint is the size of the largest window the last cut took, for
		// window.reserve.
		hint sizeHint
		// spare holds flushed windows, emptied, for reuse, and spareRoom
		// the leaves they have room for.
		spare     []*window
		spareRoom int
		// sources remembers the recent batch sequences of each publisher
		// source, so that a retried batch is counted once.
		sources map[string]*seqWindow
		// seq is the sequence of the next flush. It grows across windows,
		// so (source, window, sequence) never repeats within an
		// incarnation, however late a window is reopened.
		seq uint64

		// With a log, every record is appended under mu, so the log's
		// order is the cube's; the bookkeeping below decides which
		// segments are consumed (see truncateLocked).

		// segLast holds, per segment with batch records, the position of
		// the last one: a cut after it took every window they touched up
		// to its upto.
		segLast map[uint64]wal.Pos
		// segMax holds, per segment with batch records, the latest window
		// start they touched.
		segMax map[uint64]int64
		// intents holds the intents some destination has not confirmed.
		intents map[*intent]struct{}
		// doneCuts are the cuts whose intents were fully delivered, in a
		// segment that is still there.
		doneCuts []cutMark
		// replaying is set while New replays the log.
		replaying bool
	}

	// wal is the write-ahead log; nil without Options.WALDir.
	wal *wal.Log
	// logFull is set while Push refuses batches for the log's size, and
	// behind while it refuses them for the bytes the outbox holds, so that
	// the reason is logged once a stretch.
	logFull, behind atomic.Bool
	// floor refuses batches while the log's filesystem is nearly full.
	floor *disk.Floor
	out   outbox

	flushMu sync.Mutex // one flush at a time: a cut, then its intent
	encode  encodeScratch
	stop    chan struct{}
	done    chan struct{}
}

// family is the aggregator's precomputed view of a schema family.
type family struct {
	*schema.Family
	// masks hold, per cuboid ID, a bit per family label the cuboid keeps.
	masks  []uint16
	finest schema.CuboidID
	// order lists the cuboids but the finest, those that keep the most
	// labels first; below[c] lists the cuboids whose labels are a subset
	// of c's, c among them.
	order []schema.CuboidID
	below [][]schema.CuboidID
}

// cuboidSet holds a bit per cuboid ID: a family has at most
// 2^schema.MaxLevels cuboids.
type cuboidSet [1 << schema.MaxLevels / 64]uint64

func (s *cuboidSet) has(c schema.CuboidID) bool { return s[c/64]&(1<<(c%64)) != 0 }

func (s *cuboidSet) add(c schema.CuboidID) { s[c/64] |= 1 << (c % 64) }

// newFamily precomputes the aggregator's view of f.
func newFamily(f *schema.Family) *family {
	cuboids := f.Cuboids()
	fam := &family{Family: f, finest: f.Finest().ID, masks: make([]uint16, len(cuboids))}
	for _, c := range cuboids {
		for _, s := range c.Slots {
			fam.masks[c.ID] |= 1 << s
		}
	}
	fam.below = make([][]schema.CuboidID, len(cuboids))
	for c, mask := range fam.masks {
		id := schema.CuboidID(c)
		if id != fam.finest {
			fam.order = append(fam.order, id)
		}
		for sub, m := range fam.masks {
			if m&^mask == 0 {
				fam.below[c] = append(fam.below[c], schema.CuboidID(sub))
			}
		}
	}
	slices.SortStableFunc(fam.order, func(x, y schema.CuboidID) int {
		return bits.OnesCount16(fam.masks[y]) - bits.OnesCount16(fam.masks[x])
	})
	return fam
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
	// cells maps each cell of every cuboid but the finest to the fan of
	// the first leaf that reached it, which holds the cell's aggs index
	// and those of every cell below it (cells of cuboids keeping a subset
	// of its labels).
	cells  map[cellKey]int32
	aggs   []agg
	finest []int // leaves per family, for the cardinality limit
	room   int   // leaves its maps were made for by reserve
}

func newWindow(families int) *window {
	return &window{leaves: map[cellKey]int32{}, cells: map[cellKey]int32{}, finest: make([]int, families)}
}

// spareLeaves bounds the room of the flushed windows the aggregator keeps
// for reuse, in leaves (about 200 bytes each): a window's maps and slices
// keep their room when cleared, so a backfill, which opens windows as fast
// as it flushes them, allocates none.
const spareLeaves = 1 << 19

// newWindowLocked returns an empty window, a spare one if there is one.
func (a *Aggregator) newWindowLocked() *window {
	if n := len(a.mu.spare); n > 0 {
		w := a.mu.spare[n-1]
		a.mu.spare = a.mu.spare[:n-1]
		a.mu.spareRoom -= max(w.room, reserveAt)
		return w
	}
	return newWindow(len(a.fams))
}

// recycle keeps flushed windows, emptied, for newWindowLocked.
func (a *Aggregator) recycle(todo []ready) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range todo {
		w := r.w
		if a.mu.spareRoom+max(w.room, reserveAt) > spareLeaves {
			return
		}
		a.mu.spareRoom += max(w.room, reserveAt)
		clear(w.leaves)
		clear(w.cells)
		clear(w.finest)
		w.fan, w.aggs = w.fan[:0], w.aggs[:0]
		a.mu.spare = append(a.mu.spare, w)
	}
}

// reserveAt is the number of leaves at which a window that is growing takes
// the room the last cut's largest window needed, at once: growing a map or
// slice of a million entries step by step copies it many times over, while
// a window of a few late events must not take a full window's room.
const reserveAt = 256

// sizeHint is the size of the largest window the last cut took.
type sizeHint struct{ leaves, cells, fan int }

// reserve makes room for h at once, unless the window has it.
func (w *window) reserve(h sizeHint) {
	if h.leaves <= max(len(w.leaves), w.room) {
		return
	}
	w.room = h.leaves
	leaves := make(map[cellKey]int32, h.leaves)
	for k, v := range w.leaves {
		leaves[k] = v
	}
	cells := make(map[cellKey]int32, h.cells)
	for k, v := range w.cells {
		cells[k] = v
	}
	w.leaves, w.cells = leaves, cells
	w.fan = slices.Grow(w.fan, h.fan-len(w.fan))
	w.aggs = slices.Grow(w.aggs, h.cells+h.leaves-len(w.aggs))
}

// addLeaf creates a leaf, finding or creating its cell in every cuboid, and
// returns the offset of its fan. The cuboids are looked at most labels
// first: a cell found takes the fan of the leaf that first reached it, and
// with it the cells below, which then need no lookup of their own. A new
// leaf of a sparse window, whose coarse cells exist already, costs a few
// lookups instead of one per cuboid.
func (w *window) addLeaf(f *family, leaf cellKey) int32 {
	off := int32(len(w.fan))
	w.fan = slices.Grow(w.fan, len(f.masks))[:int(off)+len(f.masks)]
	fan := w.fan[off:]
	fan[f.finest] = int32(len(w.aggs))
	w.aggs = append(w.aggs, agg{})
	var done cuboidSet
	key := leaf
	for _, c := range f.order {
		if done.has(c) {
			continue
		}
		key.cuboid = c
		mask := f.masks[c]
		for j := range key.v {
			if mask&(1<<j) != 0 {
				key.v[j] = leaf.v[j]
			} else {
				key.v[j] = 0
			}
		}
		if first, ok := w.cells[key]; ok {
			for _, sub := range f.below[c] {
				fan[sub] = w.fan[first+int32(sub)]
				done.add(sub)
			}
			continue
		}
		fan[c] = int32(len(w.aggs))
		w.aggs = append(w.aggs, agg{})
		w.cells[key] = off
	}
	w.leaves[leaf] = off
	w.finest[leaf.fam]++
	return off
}

// New builds an aggregator, replays its write-ahead log if it has one,
// sends again what the log holds undelivered, and starts its flush loop.
func New(opts Options) (*Aggregator, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	a := &Aggregator{
		opts: opts,
		// The wall clock and a random number, so that no two incarnations
		// of one name share a source, whatever clock the options inject.
		source: opts.Name + "/" + strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + strconv.FormatUint(uint64(rand.Uint32()), 36),
		window: opts.Schema.Resolutions[0],
		step:   opts.Schema.Window().Milliseconds(),
		byName: map[string]int{},
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	for i, f := range opts.Schema.Families {
		a.fams = append(a.fams, newFamily(f))
		a.byName[f.Name] = i
	}
	a.mu.intern = map[string]uint32{}
	a.mu.values = []string{""}
	a.mu.windows = map[int64]*window{}
	a.mu.sources = map[string]*seqWindow{}
	a.mu.segMax = map[uint64]int64{}
	a.mu.segLast = map[uint64]wal.Pos{}
	a.mu.intents = map[*intent]struct{}{}
	a.out.init()
	a.floor = &disk.Floor{Dir: opts.WALDir, Min: uint64(opts.MinFreeBytes), Logger: opts.Logger, What: "batches"}
	a.metrics = newMetrics(opts.Registerer, a.logSize, func() float64 { return float64(a.out.bytes.Load()) }, a.floor.FreeBytes)
	if opts.WALDir != "" {
		if err := a.openLog(); err != nil {
			return nil, err
		}
	}
	go a.loop()
	return a, nil
}

// openLog replays the log in WALDir, opens it for appending and queues the
// requests it holds undelivered.
func (a *Aggregator) openLog() error {
	r := newReplay(a)
	a.mu.Lock()
	a.mu.replaying = true
	l, err := wal.Open(wal.Options{
		Dir:         a.opts.WALDir,
		SegmentSize: a.opts.WALSegmentBytes,
		// Called under a.mu, as every append is: the dedupe state heads
		// each segment, so deleting older segments loses none of it.
		Head:   func() (wal.Type, []byte) { return recCheckpoint, appendCheckpoint(nil, a.mu.sources) },
		Logger: a.opts.Logger,
	}, r.record)
	if err != nil {
		a.mu.Unlock()
		return fmt.Errorf("aggregator: cannot open the write-ahead log: %w", err)
	}
	a.wal = l
	a.mu.replaying = false
	pending := r.finish()
	if a.opts.Peers == nil {
		for _, it := range pending {
			if it.entries[0].kind == entryForward {
				a.mu.Unlock()
				l.Close()
				return fmt.Errorf("%w: the write-ahead log holds batches to forward to other aggregators, and no Peers are set to deliver them", ErrOptions)
			}
		}
	}
	a.truncateLocked()
	windows := len(a.mu.windows)
	a.mu.Unlock()
	a.opts.Logger.Info("write-ahead log replayed", "records", r.records, "events", r.events,
		"windows", windows, "pending_intents", len(pending))
	for _, it := range pending {
		a.enqueue(it)
	}
	return nil
}

// logSize is the log's size in bytes, 0 without one.
func (a *Aggregator) logSize() float64 {
	if a.wal == nil {
		return 0
	}
	return float64(a.wal.Size())
}

// noteSegmentLocked records that the batch record at pos touched windows up
// to maxStart.
func (a *Aggregator) noteSegmentLocked(pos wal.Pos, maxStart int64) {
	if cur, ok := a.mu.segMax[pos.Segment]; !ok || maxStart > cur {
		a.mu.segMax[pos.Segment] = maxStart
	}
	a.mu.segLast[pos.Segment] = pos
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

var (
	eventPool  = sync.Pool{New: func() any { return new([]event) }}
	recordPool = sync.Pool{New: func() any { return new([]byte) }}
)

// Push validates and counts a batch. Every event is either counted or listed
// in the response's rejects with its index and reason. A batch whose identity
// (source, batch sequence) was counted recently is acknowledged with
// Duplicate set and not counted again. With a log, Push returns once the
// batch is on disk.
func (a *Aggregator) Push(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	return a.push(req, nil, false)
}

// PushRouted takes a batch for a cluster: owner(f, partition) names the
// aggregator that owns a valid event of family f whose partition levels
// (schema.Family.PartitionLevels) hold the values partition, "" for this
// one; partition is valid only during the call. It is Push,
// except that the events other aggregators own are not counted here: each
// owner's events become a batch of their own under the publisher's
// identity, logged here in the same write as the local part and then sent
// by the owner's sender in the outbox, retried until the owner answers,
// across restarts. The reply counts them as accepted: they are on this
// node's disk and will be delivered. The identity is checked here, once for
// the whole batch. It needs Options.Peers.
func (a *Aggregator) PushRouted(req *wirepb.PushRequest, owner func(f *schema.Family, partition []string) string) (*wirepb.PushResponse, error) {
	if a.opts.Peers == nil {
		return nil, fmt.Errorf("%w: routing a batch needs Peers to forward parts to their owners", ErrOptions)
	}
	return a.push(req, owner, false)
}

// PushForwarded counts a part of a batch that another aggregator took and
// forwarded here (PushRouted), as Push does but with the MaxLateness and
// MaxFutureSkew bounds of the moment that aggregator received the batch
// (req.ReceivedMs), not of now: the part may arrive late, after this node
// was down. Events older than the finest resolution's retention are
// rejected all the same, since they could not be stored.
func (a *Aggregator) PushForwarded(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	return a.push(req, nil, true)
}

// push is Push, PushRouted (owner set) and PushForwarded (forwarded set).
func (a *Aggregator) push(req *wirepb.PushRequest, owner func(*schema.Family, []string) string, forwarded bool) (*wirepb.PushResponse, error) {
	if n := len(req.Events); n > a.opts.MaxBatchEvents {
		a.metrics.batchesRefused.Inc()
		return nil, fmt.Errorf("%w: %d events, at most %d", ErrBatchTooLarge, n, a.opts.MaxBatchEvents)
	}
	if err := a.checkLog(); err != nil {
		return nil, err
	}
	now := a.opts.Now().UnixMilli()
	resp := &wirepb.PushResponse{}
	evp := eventPool.Get().(*[]event)
	evs := (*evp)[:0]
	v := a.newValidator(req.Dict, now, false)
	if forwarded {
		v = a.forwardedValidator(req.Dict, req.ReceivedMs, now)
	}
	fw := forwards{received: now}
	var partition [schema.MaxLevels]string
	for i, e := range req.Events {
		ev := event{index: i}
		if reason, detail := v.check(e, &ev); reason != wirepb.RejectReason_REJECT_REASON_UNSPECIFIED {
			resp.Rejects = append(resp.Rejects, &wirepb.Reject{Index: uint32(i), Reason: reason, Detail: detail})
			continue
		}
		if owner != nil {
			f := a.fams[ev.fam].Family
			p := partition[:f.PartitionLevels()]
			for s := range p {
				p[s] = req.Dict[ev.vals[s]-1]
			}
			if o := owner(f, p); o != "" {
				fw.add(o, req, i)
				continue
			}
		}
		evs = append(evs, ev)
	}
	// The records are encoded before the lock; the rare batch with events
	// refused under it is encoded again.
	identity := req.Source != "" && req.BatchSeq != 0
	if !identity {
		// A part is re-sent until its owner answers, so it needs an
		// identity for the owner to count it once, even when the batch
		// has none: this incarnation's, numbered.
		for _, e := range fw.entries {
			e.push.Source, e.push.BatchSeq = a.source+"/forward", a.forwardSeq.Add(1)
		}
	}
	var fwdRec []byte
	if a.wal != nil && fw.entries != nil {
		var err error
		fwdRec, err = appendForward(nil, forwardRecord{source: req.Source, batchSeq: req.BatchSeq, nowMS: now, entries: fw.entries})
		if err != nil {
			*evp = evs
			eventPool.Put(evp)
			return nil, err
		}
	}
	var rec *[]byte
	// The forward record marks the identity at replay when no event is
	// counted here.
	if a.wal != nil && (len(evs) > 0 || identity && fwdRec == nil) {
		rec = recordPool.Get().(*[]byte)
		*rec = appendBatch((*rec)[:0], req, now, evs)
		defer recordPool.Put(rec)
	}
	checkedEvs := len(evs)

	a.mu.Lock()
	if a.mu.closed {
		a.mu.Unlock()
		*evp = evs
		eventPool.Put(evp)
		return nil, ErrClosed
	}
	// Close waits for this push to queue its parts before it drains the
	// outbox.
	a.pushes.Add(1)
	defer a.pushes.Done()
	switch a.markLocked(req.Source, req.BatchSeq, now) {
	case dedupe.Repeat:
		a.mu.Unlock()
		*evp = evs
		eventPool.Put(evp)
		a.metrics.duplicates.Inc()
		resp.Duplicate = true
		resp.Accepted = uint64(len(evs) + fw.events)
		return resp, nil
	case dedupe.Forgotten:
		a.metrics.forgotten.Inc()
	}
	ids := make([]uint32, len(req.Dict)) // batch dictionary index -> interned ID
	late, kept := 0, 0
	maxStart := int64(math.MinInt64)
	for i := range evs {
		ev := &evs[i]
		a.internEventLocked(ev, req.Dict, ids)
		start := a.window.StepStart(ev.ts)
		if reason := a.addLocked(ev, start, a.opts.MaxCellsPerWindow); reason != noReason {
			r := &wirepb.Reject{Index: uint32(ev.index), Reason: reason}
			if reason == wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT {
				r.Detail = fmt.Sprintf("family %q has %d cells in this window, the limit", a.fams[ev.fam].Name, a.opts.MaxCellsPerWindow)
			} else {
				r.Detail = fmt.Sprintf("value %v would take the window's total of family %q beyond 2^53, past which sums of counts are no longer exact", ev.value, a.fams[ev.fam].Name)
			}
			resp.Rejects = append(resp.Rejects, r)
			continue
		}
		if start+a.step+a.opts.Grace.Milliseconds() <= now {
			late++
		}
		maxStart = max(maxStart, start)
		evs[kept] = *ev
		kept++
	}
	evs = evs[:kept]
	var pos wal.Pos
	var logErr error
	if rec != nil {
		if kept < checkedEvs {
			*rec = appendBatch((*rec)[:0], req, now, evs)
		}
		if pos, logErr = a.wal.Append(recBatch, *rec); logErr == nil && kept > 0 {
			a.noteSegmentLocked(pos, maxStart)
		}
	}
	var fwd *intent
	if fw.entries != nil {
		var fpos wal.Pos
		if fwdRec != nil && logErr == nil {
			if fpos, logErr = a.wal.Append(recForward, fwdRec); logErr == nil {
				pos = fpos
			}
		}
		fwd = a.newIntent(fpos, cutMark{}, fw.entries)
		a.mu.intents[fwd] = struct{}{}
	}
	a.mu.Unlock()
	*evp = evs
	eventPool.Put(evp)
	if (rec != nil || fwdRec != nil) && logErr == nil {
		t := time.Now()
		logErr = a.wal.Sync(pos)
		a.metrics.walSync.Observe(time.Since(t).Seconds())
	}
	if fwd != nil {
		// Queued even when the log failed: the identity is marked, so a
		// retry would be a duplicate, and like the local events in the
		// cube, the parts go out unless the process dies first.
		a.enqueue(fwd)
		a.metrics.forwarded.WithLabelValues("queued").Add(float64(fw.events))
	}
	if logErr != nil {
		// The events are in the cube and go out with their windows, but
		// a crash before then would lose them: the publisher must not
		// take the batch as safe.
		a.opts.Logger.Error("batch not acknowledged: the write-ahead log failed", "err", logErr)
		return nil, fmt.Errorf("%w: batch not logged: %w", ErrLogFailed, logErr)
	}

	slices.SortFunc(resp.Rejects, func(x, y *wirepb.Reject) int { return int(x.Index) - int(y.Index) })
	resp.Accepted = uint64(kept + fw.events)
	a.metrics.accepted.Add(float64(kept))
	a.metrics.late.Add(float64(late))
	for _, r := range resp.Rejects {
		a.metrics.rejected.WithLabelValues(wire.ReasonName(r.Reason)).Inc()
	}
	return resp, nil
}

// forwards gathers the events of a batch that other aggregators own: per
// owner, a batch of their own events with a dictionary of the strings they
// use and the publisher's identity, as an outbox entry addressed to it.
type forwards struct {
	entries  []*entry
	byOwner  map[string]*forwardPart
	events   int
	received int64 // when the batch was received, unix ms
}

type forwardPart struct {
	req   *wirepb.PushRequest
	remap map[uint32]uint32 // batch dictionary index -> index in req.Dict
}

// add puts event i of batch into owner's part.
func (f *forwards) add(owner string, batch *wirepb.PushRequest, i int) {
	if f.byOwner == nil {
		f.byOwner = map[string]*forwardPart{}
	}
	p := f.byOwner[owner]
	if p == nil {
		p = &forwardPart{req: &wirepb.PushRequest{Source: batch.Source, BatchSeq: batch.BatchSeq, ReceivedMs: f.received}, remap: map[uint32]uint32{}}
		f.byOwner[owner] = p
		f.entries = append(f.entries, &entry{kind: entryForward, dests: []string{owner}, push: p.req})
	}
	e := batch.Events[i]
	fe := &wirepb.Event{Family: p.ref(batch.Dict, e.Family), Labels: make([]uint32, len(e.Labels)), TimestampMs: e.TimestampMs, Value: e.Value}
	for j, l := range e.Labels {
		fe.Labels[j] = p.ref(batch.Dict, l)
	}
	p.req.Events = append(p.req.Events, fe)
	f.events++
}

// ref returns the index in the part's dictionary of the batch's string d.
func (p *forwardPart) ref(dict []string, d uint32) uint32 {
	if x, ok := p.remap[d]; ok {
		return x
	}
	x := uint32(len(p.req.Dict))
	p.req.Dict = append(p.req.Dict, dict[d])
	p.remap[d] = x
	return x
}

// internEventLocked turns an event's label values from batch dictionary
// indexes (plus 1) into interned IDs, caching them per dictionary index in
// ids.
func (a *Aggregator) internEventLocked(ev *event, dict []string, ids []uint32) {
	for j := range a.fams[ev.fam].Labels {
		d := ev.vals[j] - 1
		if ids[d] == 0 {
			ids[d] = a.internLocked(dict[d])
		}
		ev.vals[j] = ids[d]
	}
}

// LogErr is the error that broke the write-ahead log, wrapping
// ErrLogFailed, and nil while it works (or without a log). A broken log
// stays broken: batches are refused until a restart.
func (a *Aggregator) LogErr() error {
	if a.wal == nil {
		return nil
	}
	if err := a.wal.Err(); err != nil && !errors.Is(err, wal.ErrClosed) {
		return fmt.Errorf("%w, batches cannot be made durable: %w", ErrLogFailed, err)
	}
	return nil
}

// checkLog refuses a batch while the node is not ready, while the outbox
// holds more than MaxPendingBytes, while the log is broken (so that nothing
// is counted that cannot be logged), its filesystem below the free-space
// floor or the log over WALMaxBytes, logging the reason when a stretch of
// refusals begins and ends.
func (a *Aggregator) checkLog() error {
	if a.opts.Ready != nil {
		if err := a.opts.Ready(); err != nil {
			return fmt.Errorf("%w: %w", ErrNotReady, err)
		}
	}
	pending := a.out.bytes.Load()
	if pending > a.opts.MaxPendingBytes {
		a.metrics.batchesBackpressured.WithLabelValues("behind").Inc()
		if a.behind.CompareAndSwap(false, true) {
			a.opts.Logger.Warn("the combiners take less than this aggregator takes: refusing batches until the flushes waiting for them fall below the limit",
				"pending_bytes", pending, "limit", a.opts.MaxPendingBytes, "pending", a.Pending())
		}
		return fmt.Errorf("%w: %d bytes of flushes wait for the combiners, the limit is %d", ErrBehind, pending, a.opts.MaxPendingBytes)
	}
	if a.behind.CompareAndSwap(true, false) {
		a.opts.Logger.Info("the combiners caught up: taking batches", "pending_bytes", pending, "limit", a.opts.MaxPendingBytes)
	}
	if a.wal == nil {
		return nil
	}
	if err := a.LogErr(); err != nil {
		return err
	}
	if err := a.floor.Check(); err != nil {
		a.metrics.batchesLowDisk.Inc()
		return fmt.Errorf("%w: %w", ErrDiskLow, err)
	}
	size := a.wal.Size()
	if size <= a.opts.WALMaxBytes {
		if a.logFull.CompareAndSwap(true, false) {
			a.opts.Logger.Info("write-ahead log below its limit again: taking batches", "bytes", size, "limit", a.opts.WALMaxBytes)
		}
		return nil
	}
	a.metrics.batchesBackpressured.WithLabelValues("log_full").Inc()
	if a.logFull.CompareAndSwap(false, true) {
		a.opts.Logger.Warn("write-ahead log over its limit: refusing batches until the combiners take the windows it holds",
			"bytes", size, "limit", a.opts.WALMaxBytes, "pending", a.Pending())
	}
	return fmt.Errorf("%w: %d bytes, the limit is %d; windows wait for %v", ErrLogFull, size, a.opts.WALMaxBytes, a.Pending())
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

// MaxValue bounds the magnitude of an event's value and of a cell's sum for
// one window at one aggregator: 2^53, up to which float64 holds every
// integer exactly, so that sums of counts stay exact. A stored step adds up
// the sums of every aggregator and late flush, and a coarser step those of
// its finer steps, so a stored sum stays finite however many are added (it
// would take 2^970 of them to overflow); it stays exact while the true
// count is at most 2^53.
const MaxValue = 1 << 53

// addLocked rolls one event up into every cuboid of its family in the window
// starting at start. It changes nothing and returns a reject reason when the
// event would create a finest cell beyond maxCells, or take a sum beyond
// MaxValue.
func (a *Aggregator) addLocked(ev *event, start int64, maxCells int) wirepb.RejectReason {
	w := a.mu.windows[start]
	if w == nil {
		w = a.newWindowLocked()
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
		var first int32
		if first, hasApex = w.cells[cellKey{fam: uint16(ev.fam)}]; hasApex {
			apex = w.fan[first]
		}
	}
	if hasApex && w.aggs[apex].sum+ev.value > MaxValue {
		return wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE
	}
	if !ok {
		if w.finest[ev.fam] >= maxCells {
			return wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT
		}
		off = w.addLeaf(f, leaf)
		if len(w.leaves) == reserveAt {
			w.reserve(a.mu.hint)
		}
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
	a    *Aggregator
	dict []string
	// oldest and newest bound the timestamps it takes. retained is the
	// oldest the finest resolution keeps; received, for a forwarded part,
	// when its batch was received.
	oldest, newest, retained, received int64
	slots                              [][]int8 // per family, per dict index: label slot, -1 none, -2 unknown yet
}

// newValidator checks events taken at now. An event a publisher pushed here
// must lie within MaxLateness and MaxFutureSkew of now; one checked before
// (replayed from the log) only within the finest resolution's retention, or
// it could not be stored.
func (a *Aggregator) newValidator(dict []string, now int64, checked bool) validator {
	v := validator{a: a, dict: dict, retained: now - a.window.Retention.Milliseconds(),
		oldest: now - a.opts.MaxLateness.Milliseconds(), newest: now + a.opts.MaxFutureSkew.Milliseconds()}
	if checked {
		v.oldest, v.newest = v.retained, math.MaxInt64
	}
	return v
}

// forwardedValidator checks the events of a part another aggregator
// forwarded at now: within MaxLateness and MaxFutureSkew of when that
// aggregator received the batch, as its publisher's events were checked
// there, and within the finest resolution's retention of now. A part may
// arrive long after it was received (its owner was down), so the bounds
// follow the reception, not now; the reception itself may lie at most
// MaxFutureSkew ahead of this node's clock, so no forwarded event lies more
// than twice the skew ahead of it. A part without a reception time (logged
// by an older version) is held to now.
func (a *Aggregator) forwardedValidator(dict []string, received, now int64) validator {
	if received == 0 {
		received = now
	}
	received = min(received, now+a.opts.MaxFutureSkew.Milliseconds())
	v := a.newValidator(dict, received, false)
	v.received = received
	v.retained = now - a.window.Retention.Milliseconds()
	v.oldest = max(v.oldest, v.retained)
	return v
}

const noReason = wirepb.RejectReason_REJECT_REASON_UNSPECIFIED

func (v *validator) check(e *wirepb.Event, ev *event) (wirepb.RejectReason, string) {
	if int(e.Family) >= len(v.dict) {
		return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("family index %d is outside the dictionary of %d strings", e.Family, len(v.dict))
	}
	fi, ok := v.a.byName[v.dict[e.Family]]
	if !ok {
		return wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY, fmt.Sprintf("unknown family %s", quote(v.dict[e.Family]))
	}
	f := v.a.fams[fi]
	switch {
	case len(e.Labels)%2 != 0:
		return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("%d label indexes, want name/value pairs", len(e.Labels))
	case len(e.Labels) > 2*schema.MaxLevels:
		// No family has more labels; the loop below would stop at the
		// first one unknown or repeated, but this says why at once.
		return wirepb.RejectReason_REJECT_REASON_TOO_MANY_LABELS, fmt.Sprintf("%d labels, no family has more than %d", len(e.Labels)/2, schema.MaxLevels)
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
		if reason, detail := v.checkLength(v.dict[n], v.dict[val]); reason != noReason {
			return reason, detail
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
			return wirepb.RejectReason_REJECT_REASON_UNKNOWN_DIMENSION, fmt.Sprintf("label %s is not a dimension of family %q", quote(v.dict[n]), f.Name)
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
	case math.Abs(e.Value) > MaxValue:
		return wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE, fmt.Sprintf("value %v is beyond 2^53, past which sums of counts are no longer exact", e.Value)
	case e.TimestampMs < v.oldest || e.TimestampMs > v.newest:
		return v.outside(e.TimestampMs)
	}
	ev.fam = fi
	ev.ts = e.TimestampMs
	ev.value = e.Value
	return noReason, ""
}

// checkLength refuses a label name or value over the limits.
func (v *validator) checkLength(name, value string) (wirepb.RejectReason, string) {
	switch o := &v.a.opts; {
	case len(name) > o.MaxLabelNameBytes:
		return wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG, fmt.Sprintf("label name %s is %d bytes long, the limit is %d", quote(name), len(name), o.MaxLabelNameBytes)
	case len(value) > o.MaxLabelValueBytes:
		return wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG, fmt.Sprintf("label %s has a value of %d bytes, the limit is %d", quote(name), len(value), o.MaxLabelValueBytes)
	}
	return noReason, ""
}

// outside is the reason and detail of a timestamp outside the validator's
// bounds.
func (v *validator) outside(ts int64) (wirepb.RejectReason, string) {
	at := time.UnixMilli(ts).UTC().Format(time.RFC3339Nano)
	switch {
	case ts > v.newest && v.received != 0:
		return wirepb.RejectReason_REJECT_REASON_TOO_NEW, fmt.Sprintf("timestamp %s is more than %s ahead of the time its batch was received, %s", at, v.a.opts.MaxFutureSkew, time.UnixMilli(v.received).UTC().Format(time.RFC3339Nano))
	case ts > v.newest:
		return wirepb.RejectReason_REJECT_REASON_TOO_NEW, fmt.Sprintf("timestamp %s is more than %s ahead of this node's clock", at, v.a.opts.MaxFutureSkew)
	case v.oldest == v.retained:
		return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the finest resolution's retention %s", at, v.a.window.Retention)
	case v.received != 0:
		return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the maximum lateness %s before its batch was received, %s", at, v.a.opts.MaxLateness, time.UnixMilli(v.received).UTC().Format(time.RFC3339Nano))
	}
	return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the maximum lateness %s", at, v.a.opts.MaxLateness)
}

// maxQuoted is the most bytes of a string a reject's detail quotes: a
// label may be megabytes long, and the detail goes back to the publisher.
const maxQuoted = 64

// quote quotes s for a reject's detail, cut after maxQuoted bytes.
func quote(s string) string {
	if len(s) <= maxQuoted {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:maxQuoted]) + fmt.Sprintf("... (%d bytes)", len(s))
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

// ready is a window taken out of the cube to be flushed.
type ready struct {
	start int64
	w     *window
}

// cutLocked takes out of the cube every window whose grace has passed at
// now, or every window when final, and returns them in window order with
// the record that says which they were.
func (a *Aggregator) cutLocked(now int64, final bool) ([]ready, cutRecord) {
	c := cutRecord{upto: now - a.step - a.opts.Grace.Milliseconds(), final: final}
	for start := range a.mu.windows {
		if final || start <= c.upto {
			c.starts = append(c.starts, start)
		}
	}
	return a.takeLocked(c.starts), c
}

// takeLocked takes the windows starting at starts out of the cube, in window
// order. Replay takes the windows a cut record lists, so it takes what the
// live process took whatever the options are now.
func (a *Aggregator) takeLocked(starts []int64) []ready {
	var todo []ready
	var hint sizeHint
	for _, start := range starts {
		if w := a.mu.windows[start]; w != nil {
			todo = append(todo, ready{start: start, w: w})
			delete(a.mu.windows, start)
			if len(w.leaves) > hint.leaves {
				hint = sizeHint{leaves: len(w.leaves), cells: len(w.cells), fan: len(w.fan)}
			}
		}
	}
	if len(todo) > 0 {
		a.mu.hint = hint
	}
	slices.SortFunc(todo, func(x, y ready) int { return cmp.Compare(x.start, y.start) })
	return todo
}

// flush sends every window whose grace has passed (all of them when final).
// With a log, the cut is logged at the moment the windows leave the cube,
// and the requests built from them, with their destinations, are logged and
// synced before any goes out: a restart sends the same requests under the
// same identities to the replicas that did not confirm them, or, if the
// crash came between the two records, puts the windows back into the cube.
func (a *Aggregator) flush(final bool) {
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	shards := max(a.opts.Sink.Shards(), 1)
	replicas := make([][]string, shards)
	for s := range replicas {
		if replicas[s] = a.opts.Sink.Replicas(uint32(s)); len(replicas[s]) == 0 {
			a.opts.Logger.Error("no combiner holds a shard: windows stay in memory", "shard", s, "shards", shards)
			return
		}
	}
	now := a.opts.Now().UnixMilli()

	a.mu.Lock()
	todo, rec := a.cutLocked(now, final)
	cut := cutMark{upto: rec.upto, final: final}
	if len(todo) > 0 && a.wal != nil {
		pos, err := a.wal.Append(recCut, appendCut(nil, rec))
		if err != nil {
			a.opts.Logger.Error("cannot log a cut; its windows go out unlogged", "err", err)
		}
		cut.pos = pos
	}
	values := a.mu.values
	open, live := len(a.mu.windows), 0
	for _, w := range a.mu.windows {
		live += len(w.aggs)
	}
	a.mu.Unlock()
	// The gauges change once the cut's requests are queued (and counted in
	// the pending gauge), so that no moment shows the cut's cells neither
	// live nor pending.
	defer func() {
		a.metrics.openWindows.Set(float64(open))
		a.metrics.liveCells.Set(float64(live))
	}()
	if len(todo) == 0 {
		return
	}

	var reqs []*wirepb.FlushRequest
	for _, r := range todo {
		reqs = append(reqs, a.flushRequests(r.start, r.w, values, shards)...)
	}
	a.recycle(todo)
	a.mu.Lock()
	for _, req := range reqs {
		req.Sequence = a.mu.seq
		a.mu.seq++
	}
	a.mu.Unlock()
	entries := make([]*entry, len(reqs))
	for i, req := range reqs {
		f, err := wire.EncodeFlush(req)
		if err != nil {
			// A message of well-formed fields always marshals.
			panic(err)
		}
		entries[i] = &entry{kind: entryFlush, dests: replicas[req.Shard], flush: f}
	}
	var payload []byte
	if a.wal != nil {
		var err error
		if payload, err = appendIntent(nil, cut.pos, entries); err != nil {
			a.opts.Logger.Error("cannot log an intent; its requests go out unlogged", "err", err)
		}
	}
	a.mu.Lock()
	var pos wal.Pos
	var err error
	if payload != nil {
		pos, err = a.wal.Append(recIntent, payload)
	}
	it := a.newIntent(pos, cut, entries)
	a.mu.intents[it] = struct{}{}
	if it.remaining == 0 {
		a.completeLocked(it)
	}
	a.mu.Unlock()
	if payload != nil && err == nil {
		err = a.wal.Sync(pos)
	}
	if err != nil {
		a.opts.Logger.Error("cannot log an intent; its requests go out unlogged", "err", err)
	}
	a.enqueue(it)
}

const (
	flushTimeout      = 10 * time.Second
	finalFlushTimeout = 30 * time.Second
)

// Close stops taking events and flushes every window, open or not, waiting
// up to 30s for the combiners to take them. Without a log, what they did not
// take by then is lost; with one, it stays in the log and goes out after the
// next start.
func (a *Aggregator) Close() error {
	a.mu.Lock()
	if a.mu.closed {
		a.mu.Unlock()
		return nil
	}
	a.mu.closed = true
	a.mu.Unlock()
	a.pushes.Wait()
	close(a.stop)
	<-a.done
	a.flush(true)
	left := a.drain(time.Now().Add(finalFlushTimeout))
	if a.wal == nil {
		if left > 0 {
			a.opts.Logger.Error("partial cubes lost: the combiners did not take them before shutdown", "requests", left)
		}
		return nil
	}
	if left > 0 {
		a.opts.Logger.Warn("requests the combiners did not take stay in the write-ahead log for the next start", "requests", left)
	}
	return a.wal.Close()
}

package aggregator

import (
	"context"
	"errors"
	"fmt"
	"math"
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

// InProcess is a Sink some of whose replicas are combiners in the same
// process (combiner.Local), which a crash takes down with the aggregator.
// Such a replica takes a flush before it is durable: the aggregator calls
// Sync(replica) before it records that the replica took flushes, and its
// log keeps them until then, so that a restart delivers them again; one
// Sync covers every flush the replica took before it. It also reads every
// field this aggregator writes, so flushes meant only for such replicas
// carry their sums in the smaller layout (wire.WholeSums).
type InProcess interface {
	InProcess(replica string) bool
	Sync(replica string) error
}

// Peers delivers the parts of a batch that other aggregators own (see
// PushRouted): in a node, gRPC clients of the other aggregators
// (PeerClients).
type Peers interface {
	// Forward delivers one part to the aggregator that owns it, which
	// counts it with PushForwarded. It must be safe to retry: the part
	// carries the publisher's batch identity, and the owner counts an
	// identity once. An error wrapping ErrNotSent says the request never
	// left this node.
	Forward(ctx context.Context, owner string, req *wirepb.PushRequest) (*wirepb.PushResponse, error)
}

var (
	// ErrBatchTooLarge is returned for a batch over MaxBatchEvents. Nothing
	// of it is taken.
	ErrBatchTooLarge = errors.New("aggregator: batch too large")
	// ErrClosed is returned by Push after Close.
	ErrClosed = errors.New("aggregator: closed")
	// ErrNotSent marks a Peers.Forward error for a request that never
	// left this node (there was no connection to the owner), so the owner
	// cannot have taken it. Only a part whose every failed delivery said
	// so may be handed over to other owners (Router.HandOver): any other
	// error may hide a delivery.
	ErrNotSent = errors.New("aggregator: not sent")
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
	// errNotLogged marks a push whose log failed after it counted the
	// batch: its events are in the cube and its parts queued, though not
	// durable.
	errNotLogged = errors.New("batch not logged")
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
		// reg numbers the cells of the windows.
		reg *registry
		// windows holds the open (and late) windows by start time.
		windows map[int64]*window
		// hint is the cells of the largest window the last cut took, the
		// room a growing window takes at once (window.addFan).
		hint int
		// spare holds flushed windows, emptied, for reuse, and spareRoom
		// the cells they have room for.
		spare     []*window
		spareRoom int
		// cuttable counts the cells events created, since the last cut,
		// in windows whose grace had passed: past cutCells, the flush
		// loop cuts at once rather than at its next tick.
		cuttable int
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
	// cutNow wakes the flush loop for a cut before its tick.
	cutNow chan struct{}
	stop   chan struct{}
	done   chan struct{}
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
		cutNow: make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	for i, f := range opts.Schema.Families {
		a.fams = append(a.fams, newFamily(f))
		a.byName[f.Name] = i
	}
	a.mu.intern = map[string]uint32{}
	a.mu.values = []string{""}
	a.mu.reg = newRegistry(1)
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
	go a.confirmer()
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
	return a.push(req, nil, fromPublisher)
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
	return a.push(req, owner, fromPublisher)
}

// PushForwarded counts a part of a batch that another aggregator took and
// forwarded here (PushRouted), as Push does but with the MaxLateness and
// MaxFutureSkew bounds of the moment that aggregator received the batch
// (req.ReceivedMs), not of now: the part may arrive late, after this node
// was down. Events older than the finest resolution's retention are
// rejected all the same, since they could not be stored.
func (a *Aggregator) PushForwarded(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	return a.push(req, nil, fromPeer)
}

// origin is where push takes a batch from.
type origin int

const (
	fromPublisher origin = iota // Push and PushRouted
	fromPeer                    // PushForwarded: a part another aggregator took
	fromHandOver                // a part handed over from a dead owner (handOver)
)

// push is Push, PushRouted (owner set) and PushForwarded, and takes the
// parts handOver moves (owner set).
func (a *Aggregator) push(req *wirepb.PushRequest, owner func(*schema.Family, []string) string, from origin) (*wirepb.PushResponse, error) {
	forwarded := from != fromPublisher
	if n := len(req.Events); n > a.opts.MaxBatchEvents {
		a.metrics.batchesRefused.Inc()
		return nil, fmt.Errorf("%w: %d events, at most %d", ErrBatchTooLarge, n, a.opts.MaxBatchEvents)
	}
	if err := a.checkLog(from == fromHandOver); err != nil {
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
	if forwarded {
		// The bounds of the first reception go on with a part handed
		// over to other owners.
		fw.received = req.ReceivedMs
	}
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
		cells, reason := a.addLocked(ev, start, a.opts.MaxCellsPerWindow)
		if reason != noReason {
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
			a.mu.cuttable += cells
		}
		maxStart = max(maxStart, start)
		evs[kept] = *ev
		kept++
	}
	evs = evs[:kept]
	if a.mu.cuttable > cutCells {
		select {
		case a.cutNow <- struct{}{}:
		default:
		}
	}
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
		return nil, fmt.Errorf("%w: %w: %w", ErrLogFailed, errNotLogged, logErr)
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
// refusals begins and ends. A hand-over is held back by neither bound of
// the backlog: it moves what the log holds already, and the backlog for a
// dead owner is what keeps the log over its bound.
func (a *Aggregator) checkLog(handOver bool) error {
	if a.opts.Ready != nil {
		if err := a.opts.Ready(); err != nil {
			return fmt.Errorf("%w: %w", ErrNotReady, err)
		}
	}
	if !handOver {
		if err := a.checkPending(); err != nil {
			return err
		}
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
	if handOver {
		return nil
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

// checkPending refuses a batch while the outbox holds more than
// MaxPendingBytes of flushes.
func (a *Aggregator) checkPending() error {
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
	return nil
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

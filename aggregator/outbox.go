package aggregator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The outbox holds the requests of intents until every destination of each
// has taken it: the flushes built from a cut, and the parts of a batch that
// other aggregators own. Each destination has its own queue and its own
// sender, so a destination that is down (a combiner or an aggregator
// killed) holds up none of the others:
// its requests wait, in order, and go out when it answers again (hinted
// handoff). With a log, each delivery is confirmed with a recDelivered
// record, and what is unconfirmed at a restart is sent again under the same
// identity.

// entry is one request of an intent, addressed to its destinations. kind
// says which field holds the request.
type entry struct {
	intent *intent
	index  int // in intent.entries
	kind   byte
	dests  []string
	flush  *wire.Flush         // entryFlush
	push   *wirepb.PushRequest // entryForward: one owner, in dests[0]
	queued time.Time           // when it was first queued; guarded by outbox.mu
	// sending marks a forwarded part its sender is delivering now, and
	// reached one a failed delivery may have reached all the same (the
	// error did not wrap ErrNotSent): neither may be handed over to
	// another owner. Guarded by outbox.mu.
	sending, reached bool
	// size is the memory the request holds until every destination took
	// it: the bytes of a flush, the encoded size of a forwarded part.
	size int64
	// untaken marks a flush no destination has taken yet, whose size
	// counts against MaxPendingBytes. Guarded by Aggregator.mu.
	untaken bool
}

// intent is the requests of one record: the flushes built from one cut
// (recIntent), or the parts of one batch that other aggregators own
// (recForward, with a zero cut).
type intent struct {
	pos     wal.Pos // of its record; zero without a log
	cut     cutMark // zero when the cut's record is gone, or for forwards
	entries []*entry
	// left holds, per entry, the destinations that have not confirmed it;
	// remaining counts them all. Guarded by Aggregator.mu.
	left      []map[string]bool
	remaining int
}

// newIntent makes the intent of entries, and counts the memory of its
// flushes against MaxPendingBytes until a first replica takes each: that
// bound is for combiners that take less than the aggregator does. A flush
// that waits only for a replica that is down, or a part for an aggregator
// that is down, is bounded by the log (WALMaxBytes) instead, as a replica
// may be down for hours without the others falling behind.
func (a *Aggregator) newIntent(pos wal.Pos, cut cutMark, entries []*entry) *intent {
	it := &intent{pos: pos, cut: cut, entries: entries, left: make([]map[string]bool, len(entries))}
	for i, e := range entries {
		e.intent, e.index = it, i
		it.left[i] = map[string]bool{}
		for _, d := range e.dests {
			if !it.left[i][d] {
				it.left[i][d] = true
				it.remaining++
			}
		}
		if e.size == 0 {
			if e.kind == entryFlush {
				e.size = e.flush.Size()
			} else {
				e.size = int64(proto.Size(e.push))
			}
		}
		if e.kind == entryFlush && len(it.left[i]) > 0 {
			e.untaken = true
			a.out.bytes.Add(e.size)
		}
	}
	return it
}

// cutMark is a cut whose windows went out: once its intent is fully
// delivered, it covers every segment before its own whose windows it took.
type cutMark struct {
	pos   wal.Pos
	upto  int64 // the cut took every window starting at or before upto
	final bool  // the cut took every window
}

// outbox holds a queue per destination.
type outbox struct {
	mu struct {
		sync.Mutex
		cond *sync.Cond // signalled when a queue grows or shrinks, a delivery is made, or on stop
		// queues holds, per destination, the entries it has not taken, in
		// order. A destination's sender runs from its first entry on.
		queues  map[string][]*entry
		stopped bool
		// confirmed holds the deliveries the senders made that the
		// confirmer has yet to record, in the order they were made.
		confirmed []delivery
		// finished is set once the senders are gone: the confirmer then
		// records what is left and returns.
		finished bool
		// wake is closed, and replaced, by RetryNow: senders waiting out a
		// backoff try again at once.
		wake chan struct{}
	}
	closing chan struct{} // closed when Close begins: senders retry at once
	// bytes is the memory of the flushes no destination has taken yet
	// (entry.size of the untaken ones), which MaxPendingBytes bounds.
	bytes  atomic.Int64
	ctx    context.Context
	cancel context.CancelFunc // stops the senders
	wg     sync.WaitGroup     // the senders
	// confirmerDone is closed when the confirmer returned.
	confirmerDone chan struct{}
}

// delivery is a request a destination took.
type delivery struct {
	e    *entry
	dest string
}

func (o *outbox) init() {
	o.mu.cond = sync.NewCond(&o.mu.Mutex)
	o.mu.queues = map[string][]*entry{}
	o.mu.wake = make(chan struct{})
	o.closing = make(chan struct{})
	o.confirmerDone = make(chan struct{})
	o.ctx, o.cancel = context.WithCancel(context.Background())
}

// enqueue queues the undelivered entries of it for their destinations. Each
// intent is enqueued whole before the next, so every destination gets its
// requests in intent order.
func (a *Aggregator) enqueue(it *intent) {
	a.mu.Lock()
	left := make([][]string, len(it.entries))
	for i, e := range it.entries {
		for _, d := range e.dests {
			if it.left[i][d] && !slices.Contains(left[i], d) {
				left[i] = append(left[i], d)
			}
		}
	}
	a.mu.Unlock()
	o := &a.out
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	for i, e := range it.entries {
		if e.queued.IsZero() {
			e.queued = now
		}
		for _, d := range left[i] {
			q, ok := o.mu.queues[d]
			if !ok && !o.mu.stopped {
				o.wg.Add(1)
				go a.sender(d)
			}
			o.mu.queues[d] = append(q, e)
			a.metrics.handoffPending.WithLabelValues(d).Set(float64(len(o.mu.queues[d])))
		}
	}
	o.mu.cond.Broadcast()
}

// sender delivers dest's queue in order until the outbox stops.
func (a *Aggregator) sender(dest string) {
	o := &a.out
	defer o.wg.Done()
	for {
		o.mu.Lock()
		for len(o.mu.queues[dest]) == 0 && !o.mu.stopped {
			o.mu.cond.Wait()
		}
		if o.mu.stopped {
			o.mu.Unlock()
			return
		}
		e := o.mu.queues[dest][0]
		o.mu.Unlock()
		if err := a.send(dest, e); errors.Is(err, errHandedOver) {
			continue
		} else if err != nil {
			return // the outbox is stopping
		}
		o.mu.Lock()
		// A part being sent is never handed over, so e is still first.
		e.sending = false
		o.mu.queues[dest] = o.mu.queues[dest][1:]
		o.mu.confirmed = append(o.mu.confirmed, delivery{e: e, dest: dest})
		a.metrics.handoffPending.WithLabelValues(dest).Set(float64(len(o.mu.queues[dest])))
		o.mu.cond.Broadcast()
		o.mu.Unlock()
	}
}

// confirmer records the senders' deliveries until the outbox has stopped
// and they are gone: all those made since it last looked in one hold of the
// cube's lock. A sender hands its delivery over and goes on to its next
// request: waiting for that lock itself, which a push holds while it
// counts a batch, took a quarter of the time of the sender to the node's
// own combiner during a backfill.
func (a *Aggregator) confirmer() {
	o := &a.out
	defer close(o.confirmerDone)
	o.mu.Lock()
	defer o.mu.Unlock()
	syncFailing := false
	for {
		for len(o.mu.confirmed) == 0 && !o.mu.finished {
			o.mu.cond.Wait()
		}
		if len(o.mu.confirmed) == 0 {
			return
		}
		ds := o.mu.confirmed
		o.mu.confirmed = nil
		o.mu.Unlock()
		synced, unsynced, err := a.synced(ds)
		switch {
		case err != nil && !syncFailing:
			a.opts.Logger.Error("cannot make the flushes the node's own combiner took durable; trying again, and they stay in the log until then", "err", err)
		case err == nil && syncFailing:
			a.opts.Logger.Info("the node's own combiner syncs again")
		}
		syncFailing = err != nil
		if pos := a.confirm(synced); pos != (wal.Pos{}) {
			// A forwarded part's delivery is synced: were it lost in a
			// crash, the part would be pending again here, and once its
			// owner died, handed over to another owner while the first
			// counted it too. A flush delivered twice is a duplicate.
			if err := a.wal.Sync(pos); err != nil {
				a.opts.Logger.Error("cannot sync the deliveries of forwarded parts; after a crash they could be handed over and count twice", "err", err)
			}
		}
		if len(unsynced) > 0 {
			// Tried again until the store syncs them, or until the
			// senders are gone: then they stay in the log.
			time.Sleep(syncRetry)
		}
		o.mu.Lock()
		switch {
		case len(unsynced) == 0:
		case o.mu.finished:
			a.opts.Logger.Warn("flushes the node's own combiner did not sync stay in the write-ahead log for the next start", "requests", len(unsynced))
		default:
			o.mu.confirmed = append(unsynced, o.mu.confirmed...)
		}
	}
}

// syncRetry is how long the confirmer waits before it asks a combiner in
// process again to sync the flushes it took.
const syncRetry = 100 * time.Millisecond

// synced splits ds into the deliveries that are durable at their
// destinations and those that are not yet: each in-process destination of
// a flush in ds syncs once, and the flush deliveries of one that fails
// are not; err is the last failure.
func (a *Aggregator) synced(ds []delivery) (synced, unsynced []delivery, err error) {
	s, ok := a.opts.Sink.(InProcess)
	if !ok {
		return ds, nil, nil
	}
	var done, failed []string
	for _, d := range ds {
		if d.e.kind == entryFlush && s.InProcess(d.dest) {
			if !slices.Contains(done, d.dest) {
				done = append(done, d.dest)
				if e := s.Sync(d.dest); e != nil {
					failed = append(failed, d.dest)
					err = fmt.Errorf("combiner %s: %w", d.dest, e)
				}
			}
			if slices.Contains(failed, d.dest) {
				unsynced = append(unsynced, d)
				continue
			}
		}
		synced = append(synced, d)
	}
	return synced, unsynced, err
}

// Pending returns, per destination, how many requests wait for it: the
// hinted handoff a cluster gossips about. Destinations with none are left
// out.
func (a *Aggregator) Pending() map[string]int {
	o := &a.out
	o.mu.Lock()
	defer o.mu.Unlock()
	p := map[string]int{}
	for d, q := range o.mu.queues {
		if len(q) > 0 {
			p[d] = len(q)
		}
	}
	return p
}

// RetryNow makes every destination whose delivery failed try again at once,
// rather than at the end of its backoff: the node calls it when a member
// comes back, so that what waited for it goes out without delay.
func (a *Aggregator) RetryNow() {
	o := &a.out
	o.mu.Lock()
	defer o.mu.Unlock()
	close(o.mu.wake)
	o.mu.wake = make(chan struct{})
}

// Waiting names the destinations whose oldest request has waited longer
// than age: a member that is down or far behind, rather than one whose
// requests are on their way. Of those, forwards names the ones for which a
// forwarded part has waited that long: an aggregator whose events are in
// no cube until it takes them, where a flush waiting for a combiner may
// already be on another replica of its shard.
func (a *Aggregator) Waiting(age time.Duration) (names, forwards []string) {
	o := &a.out
	o.mu.Lock()
	defer o.mu.Unlock()
	for d, q := range o.mu.queues {
		// A queue is mostly in the order its entries were queued, but a
		// hand-over that failed puts parts back at its end: every entry
		// is looked at.
		old, forward := false, false
		for _, e := range q {
			if time.Since(e.queued) > age {
				old = true
				forward = forward || e.kind == entryForward
			}
		}
		if old {
			names = append(names, d)
		}
		if forward {
			forwards = append(forwards, d)
		}
	}
	slices.Sort(names)
	slices.Sort(forwards)
	return names, forwards
}

// drain waits until every queue is empty or the deadline passes, then stops
// the senders. It returns how many requests were left undelivered.
func (a *Aggregator) drain(deadline time.Time) int {
	o := &a.out
	close(o.closing)
	timer := time.AfterFunc(time.Until(deadline), func() {
		o.mu.Lock()
		o.mu.cond.Broadcast()
		o.mu.Unlock()
	})
	defer timer.Stop()
	o.mu.Lock()
	left := func() int {
		n := 0
		for _, q := range o.mu.queues {
			n += len(q)
		}
		return n
	}
	for left() > 0 && time.Now().Before(deadline) {
		o.mu.cond.Wait()
	}
	n := left()
	o.mu.stopped = true
	o.mu.cond.Broadcast()
	o.mu.Unlock()
	o.cancel()
	o.wg.Wait()
	o.mu.Lock()
	o.mu.finished = true
	o.mu.cond.Broadcast()
	o.mu.Unlock()
	<-o.confirmerDone
	return n
}

// errHandedOver is send's error for a part that left dest's queue while it
// waited to be retried: it went to the owners that took dest's keys.
var errHandedOver = errors.New("aggregator: handed over")

// send delivers one entry to one destination, retrying with backoff until
// it is taken, the outbox stops, or (a forwarded part) it is handed over. A
// request the destination refuses as malformed (InvalidArgument) is logged
// and counts as delivered: no retry can change the answer, and retrying
// would hold up every later request.
func (a *Aggregator) send(dest string, e *entry) error {
	o := &a.out
	backoff := a.opts.RetryBackoff
	closing := o.closing
	for {
		o.mu.Lock()
		if q := o.mu.queues[dest]; len(q) == 0 || q[0] != e {
			o.mu.Unlock()
			return errHandedOver
		}
		e.sending = e.kind == entryForward
		// Taken before the attempt, so that a RetryNow during it counts.
		wake := o.mu.wake
		o.mu.Unlock()
		ctx, cancel := context.WithTimeout(o.ctx, flushTimeout)
		err := a.attempt(ctx, dest, e)
		cancel()
		if err == nil {
			return nil
		}
		stopping := o.ctx.Err() != nil
		if !stopping && status.Code(err) == codes.InvalidArgument {
			a.refused(dest, e, err)
			return nil
		}
		// Described before a forwarded part stops being sent: then a
		// hand-over may deliver it elsewhere and drop its request. (A
		// flush keeps its request until this destination takes it.)
		desc := describe(dest, e)
		if e.kind == entryForward {
			// Marked reached before it stops being sent, and released
			// only once this sender no longer reads it: a hand-over may
			// take it from then on, until the next attempt. An attempt
			// the outbox's stop cut short is marked too: it may have
			// reached its owner just the same.
			o.mu.Lock()
			reached := !e.reached && !errors.Is(err, ErrNotSent)
			e.reached = e.reached || reached
			o.mu.Unlock()
			if reached {
				a.logReached(dest, e)
			}
			o.mu.Lock()
			e.sending = false
			o.mu.Unlock()
		}
		if stopping {
			return o.ctx.Err()
		}
		a.opts.Logger.Warn("delivery failed, retrying", append(desc, "backoff", backoff, "err", err)...)
		select {
		case <-o.ctx.Done():
			return o.ctx.Err()
		case <-closing:
			// Close began: try once more at once, then back off again.
			closing = nil
		case <-wake:
			// A member came back: try at once, from the first backoff.
			backoff = a.opts.RetryBackoff
		case <-time.After(backoff):
			backoff = min(2*backoff, 30*time.Second)
		}
	}
}

// attempt makes one delivery of e to dest and counts its outcome.
func (a *Aggregator) attempt(ctx context.Context, dest string, e *entry) error {
	if e.kind == entryForward {
		resp, err := a.opts.Peers.Forward(ctx, dest, e.push)
		if err != nil {
			a.metrics.forwardErrors.Inc()
			return err
		}
		// The receiver validated every event, so the owner rejects none
		// unless the two disagree on the schema or one hit a limit.
		refused := len(resp.Rejects)
		a.metrics.forwarded.WithLabelValues("delivered").Add(float64(len(e.push.Events) - refused))
		if refused > 0 {
			a.metrics.forwarded.WithLabelValues("refused").Add(float64(refused))
			a.opts.Logger.Error("the owner rejected forwarded events", append(describe(dest, e),
				"rejected", refused, "first_reason", resp.Rejects[0].Reason.String(), "first_detail", resp.Rejects[0].Detail)...)
		}
		return nil
	}
	if err := a.opts.Sink.Flush(ctx, dest, e.flush); err != nil {
		a.metrics.flushErrors.Inc()
		return err
	}
	a.metrics.flushes.Inc()
	a.metrics.flushedCells.Add(float64(e.flush.Cells))
	a.metrics.flushLag.Observe(float64(a.opts.Now().UnixMilli()-e.flush.WindowStartMs-a.step) / 1000)
	return nil
}

// refused logs and counts a request its destination refused as malformed.
func (a *Aggregator) refused(dest string, e *entry, err error) {
	if e.kind == entryForward {
		a.metrics.forwarded.WithLabelValues("refused").Add(float64(len(e.push.Events)))
		a.opts.Logger.Error("forwarded events lost: the owner refused them", append(describe(dest, e), "err", err)...)
		return
	}
	a.opts.Logger.Error("partial cube lost: the combiner refused it", append(describe(dest, e), "err", err)...)
}

// logReached records, synced, that a delivery of the forwarded part e to
// dest may have reached it, so that a restart keeps the part waiting for
// dest rather than free to be handed over.
func (a *Aggregator) logReached(dest string, e *entry) {
	if a.wal == nil || e.intent.pos == (wal.Pos{}) {
		return
	}
	rec := appendDelivered(nil, deliveredRecord{intent: e.intent.pos, index: e.index, dest: dest})
	a.mu.Lock()
	pos, err := a.wal.Append(recReached, rec)
	a.mu.Unlock()
	if err == nil {
		err = a.wal.Sync(pos)
	}
	if err != nil {
		a.opts.Logger.Error("cannot log that a forwarded part may have reached its owner; after a restart it could be handed over and count twice", append(describe(dest, e), "err", err)...)
	}
}

// describe names a request and its destination for the log.
func describe(dest string, e *entry) []any {
	if e.kind == entryForward {
		return []any{"owner", dest, "source", e.push.Source, "batch_seq", e.push.BatchSeq, "events", len(e.push.Events)}
	}
	return []any{"replica", dest, "window", time.UnixMilli(e.flush.WindowStartMs).UTC(), "sequence", e.flush.Sequence, "cells", e.flush.Cells}
}

// confirm records the deliveries ds. Once every destination has taken every
// request of an intent, its cut covers the segments before it, and the log
// drops what is consumed. It returns the position of the last delivery of
// a forwarded part it logged, zero if none, for the caller to sync.
func (a *Aggregator) confirm(ds []delivery) (forwarded wal.Pos) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, d := range ds {
		it := d.e.intent
		if !a.deliveredLocked(it, d.e.index, d.dest) || a.wal == nil {
			continue
		}
		// Logged after the intent may have completed and its segment
		// gone: a replay ignores the confirmation of an intent it does
		// not know.
		rec := appendDelivered(nil, deliveredRecord{intent: it.pos, index: d.e.index, dest: d.dest})
		pos, err := a.wal.Append(recDelivered, rec)
		if err != nil {
			a.opts.Logger.Error("cannot log a delivery; the request will go out again after a restart", "err", err)
		} else if d.e.kind == entryForward {
			forwarded = pos
		}
	}
	return forwarded
}

// deliveredLocked records that dest took request index of it, completes the
// intent once every request reached every destination, and reports whether
// the delivery was news. Deliveries and their replay both go through it.
func (a *Aggregator) deliveredLocked(it *intent, index int, dest string) bool {
	if !it.left[index][dest] {
		return false
	}
	delete(it.left[index], dest)
	e := it.entries[index]
	if e.untaken {
		e.untaken = false
		a.out.bytes.Add(-e.size)
	}
	if len(it.left[index]) == 0 {
		// Every destination took it: the request is no longer needed,
		// though its intent lives until all its requests are taken. A
		// cut's intent holds the flushes of every window it took, which
		// would otherwise stay in memory until the last is delivered.
		e.flush, e.push = nil, nil
	}
	if it.remaining--; it.remaining == 0 {
		a.completeLocked(it)
	}
	return true
}

// completeLocked forgets a fully delivered intent and drops the segments it
// was the last to need.
func (a *Aggregator) completeLocked(it *intent) {
	delete(a.mu.intents, it)
	if c := it.cut; c.pos != (wal.Pos{}) {
		// A cut no earlier in the log that took at least as much covers
		// whatever an older one covers.
		a.mu.doneCuts = slices.DeleteFunc(a.mu.doneCuts, func(d cutMark) bool {
			return d.pos.Segment <= c.pos.Segment && (c.final || !d.final && d.upto <= c.upto)
		})
		a.mu.doneCuts = append(a.mu.doneCuts, c)
	}
	if a.wal != nil && !a.mu.replaying {
		a.truncateLocked()
	}
}

// truncateLocked deletes the longest run of oldest segments that are
// consumed: no intent in them waits for a delivery, and every window their
// batch records touched was taken by a cut, after the last of them in the
// log, whose intent was fully delivered. When every segment is consumed,
// the one appended to as well, and it holds more than rotateBytes, the log
// moves to a new segment and drops them all: an idle or cleanly stopped
// aggregator keeps nothing but its dedupe state. See docs/format/wal.md.
func (a *Aggregator) truncateLocked() {
	segs := a.wal.Segments()
	// No segment at or after the oldest one an intent waits in is consumed.
	pending := uint64(math.MaxUint64)
	for it := range a.mu.intents {
		if it.pos != (wal.Pos{}) { // an intent the log failed to take holds no segment
			pending = min(pending, it.pos.Segment)
		}
	}
	upto := uint64(0)
	for _, s := range segs {
		consumed := s < pending
		if maxStart, ok := a.mu.segMax[s]; ok && consumed {
			consumed = false
			for _, c := range a.mu.doneCuts {
				if c.pos.Compare(a.mu.segLast[s]) > 0 && (c.final || maxStart <= c.upto) {
					consumed = true
					break
				}
			}
		}
		if !consumed {
			break
		}
		upto = s + 1
	}
	if last := segs[len(segs)-1]; upto > last {
		// Every segment is consumed. The one appended to cannot be deleted;
		// a new one can take its place once it holds enough to be worth it.
		upto = last
		if a.wal.Size() > rotateBytes {
			if err := a.wal.Rotate(); err != nil {
				a.opts.Logger.Error("cannot start a new log segment", "err", err)
			} else {
				upto = last + 1
			}
		}
	}
	if upto == 0 || upto == segs[0] {
		return
	}
	if err := a.wal.DeleteBefore(upto); err != nil {
		a.opts.Logger.Error("cannot delete consumed log segments", "err", err)
		return
	}
	for s := range a.mu.segMax {
		if s < upto {
			delete(a.mu.segMax, s)
			delete(a.mu.segLast, s)
		}
	}
	a.mu.doneCuts = slices.DeleteFunc(a.mu.doneCuts, func(c cutMark) bool { return c.pos.Segment < upto })
	a.opts.Logger.Debug("consumed log segments deleted", "below", fmt.Sprint(upto))
}

// rotateBytes is how much a wholly consumed log must hold before it moves
// to a new segment and drops what it held.
const rotateBytes = 1 << 20

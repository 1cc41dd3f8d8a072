package aggregator

import (
	"errors"
	"fmt"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// HandOver gives the parts of batches queued here for gone, an aggregator
// declared dead and so no longer an owner, to the aggregators that own
// their events now: it counts those this node owns and forwards the others,
// each part once, and returns how many parts it moved. The node calls it
// once gone's keys have moved (Owner no longer names it).
//
// A part leaves gone's queue only if it cannot have reached gone: no
// delivery of it was under way when it was looked at, and every failed one
// failed before it left this node (ErrNotSent). Any other part may be in
// gone's log, to be counted when gone returns, so it waits for gone.
//
// A moved part goes on as a batch taken from a publisher (PushRouted) under
// an identity of its own: its batch's source with " via " and gone's name
// appended, and its batch sequence, which the new owners count once however
// often it is handed over; with the bounds of lateness of its first
// reception. The batch's identity itself cannot serve: another part of the
// same batch may already be counted at the new owner. The hand-over is
// logged before gone's delivery is confirmed, so a crash between the two
// makes the next hand-over of the part a repeat, which counts nothing.
func (r *Router) HandOver(gone string) (int, error) {
	if gone == r.opts.Self {
		return 0, fmt.Errorf("%w: an aggregator cannot hand its own keys over", ErrOptions)
	}
	return r.opts.Local.handOver(gone, r.owner)
}

// handOver is HandOver, with owner choosing among the owners of now.
func (a *Aggregator) handOver(gone string, owner func(*schema.Family, []string) string) (int, error) {
	o := &a.out
	o.mu.Lock()
	var keep, move []*entry
	for _, e := range o.mu.queues[gone] {
		if e.kind == entryForward && !e.sending && !e.reached {
			move = append(move, e)
		} else {
			keep = append(keep, e)
		}
	}
	if len(move) > 0 {
		o.mu.queues[gone] = keep
		a.metrics.handoffPending.WithLabelValues(gone).Set(float64(len(keep)))
		o.mu.cond.Broadcast() // gone's sender may be retrying a part moved
	}
	o.mu.Unlock()

	for i, e := range move {
		req := &wirepb.PushRequest{Source: e.push.Source + " via " + gone, BatchSeq: e.push.BatchSeq,
			ReceivedMs: e.push.ReceivedMs, Dict: e.push.Dict, Events: e.push.Events}
		resp, err := a.push(req, owner, fromHandOver)
		if err != nil {
			// The log failed or the aggregator closes: the parts not
			// moved wait for gone again (forwarded parts carry their own
			// identities, so their order does not matter). A push whose
			// log failed after it counted the part moved it all the same.
			rest := move[i:]
			if errors.Is(err, errNotLogged) {
				a.confirm([]delivery{{e: e, dest: gone}})
				rest = move[i+1:]
			}
			o.mu.Lock()
			o.mu.queues[gone] = append(o.mu.queues[gone], rest...)
			a.metrics.handoffPending.WithLabelValues(gone).Set(float64(len(o.mu.queues[gone])))
			o.mu.cond.Broadcast()
			o.mu.Unlock()
			return len(move) - len(rest), fmt.Errorf("aggregator: cannot hand over the parts queued for %s: %w", gone, err)
		}
		events := len(e.push.Events)
		a.metrics.forwarded.WithLabelValues("handed_over").Add(float64(events))
		if n := len(resp.Rejects); n > 0 {
			a.opts.Logger.Error("events handed over from a dead owner were rejected", append(describe(gone, e),
				"rejected", n, "first_reason", resp.Rejects[0].Reason.String(), "first_detail", resp.Rejects[0].Detail)...)
		}
		a.opts.Logger.Debug("forwarded part handed over from a dead owner", append(describe(gone, e), "duplicate", resp.Duplicate)...)
		a.confirm([]delivery{{e: e, dest: gone}})
	}
	return len(move), a.carry(gone)
}

// carry logs again, in the log's newest segment, each part that stays
// queued for gone because it may have reached it, and confirms its first
// record as if gone took it: an owner that never returns would otherwise
// keep the segment of every such part, and every later one, until the log
// fills. The new record is a carried one, which a replay queues as reached,
// synced before the first is confirmed: a crash between the two leaves
// two copies of the part for gone, which counts its identity once.
func (a *Aggregator) carry(gone string) error {
	if a.wal == nil {
		return nil
	}
	segs := a.wal.Segments()
	newest := segs[len(segs)-1]
	o := &a.out
	// The parts carried leave gone's queue meanwhile, so that its sender
	// does not deliver a part whose record is changing.
	o.mu.Lock()
	var keep, old []*entry
	for _, e := range o.mu.queues[gone] {
		if e.kind == entryForward && e.reached && !e.sending && e.intent.pos != (wal.Pos{}) && e.intent.pos.Segment < newest {
			old = append(old, e)
		} else {
			keep = append(keep, e)
		}
	}
	o.mu.queues[gone] = keep
	o.mu.Unlock()
	if len(old) == 0 {
		return nil
	}
	carried := make([]*entry, 0, len(old))
	var err error
	var last wal.Pos
	a.mu.Lock()
	for _, e := range old {
		c := &entry{kind: entryForward, dests: []string{gone}, push: e.push, size: e.size, queued: e.queued, reached: true}
		var rec []byte
		if rec, err = appendForward(nil, forwardRecord{source: e.push.Source, batchSeq: e.push.BatchSeq, nowMS: e.push.ReceivedMs, entries: []*entry{c}}); err != nil {
			break
		}
		if last, err = a.wal.Append(recCarried, rec); err != nil {
			break
		}
		a.mu.intents[a.newIntent(last, cutMark{}, []*entry{c})] = struct{}{}
		carried = append(carried, c)
	}
	a.mu.Unlock()
	if err == nil {
		err = a.wal.Sync(last)
	}
	if err != nil {
		// Every part stays as it was, and those carried are queued beside
		// them: a repeat, which gone counts once.
		carried = append(carried, old...)
		old = nil
	}
	o.mu.Lock()
	o.mu.queues[gone] = append(carried, o.mu.queues[gone]...)
	a.metrics.handoffPending.WithLabelValues(gone).Set(float64(len(o.mu.queues[gone])))
	o.mu.cond.Broadcast()
	o.mu.Unlock()
	if err != nil {
		return fmt.Errorf("aggregator: cannot carry the parts that may have reached %s to a newer log segment: %w", gone, err)
	}
	ds := make([]delivery, len(old))
	for i, e := range old {
		ds[i] = delivery{e: e, dest: gone}
	}
	a.confirm(ds)
	a.opts.Logger.Debug("parts that may have reached a dead owner carried to a newer log segment", "owner", gone, "parts", len(old))
	return nil
}

// owner names the aggregator that owns a valid event of family f whose
// partition levels hold partition: "" for this one.
func (r *Router) owner(f *schema.Family, partition []string) string {
	if owner := r.opts.Owner(schema.PartitionKey(f.Name, partition)); owner != r.opts.Self {
		return owner
	}
	return ""
}

package aggregator

import (
	"fmt"

	"github.com/dimsum/dimsum/schema"
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
			// identities, so their order does not matter).
			o.mu.Lock()
			o.mu.queues[gone] = append(o.mu.queues[gone], move[i:]...)
			a.metrics.handoffPending.WithLabelValues(gone).Set(float64(len(o.mu.queues[gone])))
			o.mu.cond.Broadcast()
			o.mu.Unlock()
			return i, fmt.Errorf("aggregator: cannot hand over the parts queued for %s: %w", gone, err)
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
	return len(move), nil
}

// owner names the aggregator that owns a valid event of family f whose
// partition levels hold partition: "" for this one.
func (r *Router) owner(f *schema.Family, partition []string) string {
	if owner := r.opts.Owner(schema.PartitionKey(f.Name, partition)); owner != r.opts.Self {
		return owner
	}
	return ""
}

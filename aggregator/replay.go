package aggregator

import (
	"fmt"
	"math"
	"slices"

	"github.com/dimsum/dimsum/wal"
)

// replay rebuilds what a crashed process held from its log: the cube from
// batch records, the publishers' dedupe state, and the intents (flushes and
// forwarded parts of batches) not yet fully delivered. See docs/format/wal.md for the rules.
type replay struct {
	a *Aggregator
	// held keeps the windows of each cut until its intent shows up; a cut
	// still without one when the next cut (or the end of the log) comes
	// was interrupted by the crash, and its windows go back into the cube.
	held map[wal.Pos][]ready
	cuts map[wal.Pos]cutMark
	// intents are the intents replayed, by position.
	intents map[wal.Pos]*intent
	// records and events count what was replayed, for the log.
	records, events int
}

func newReplay(a *Aggregator) *replay {
	return &replay{a: a, held: map[wal.Pos][]ready{}, cuts: map[wal.Pos]cutMark{}, intents: map[wal.Pos]*intent{}}
}

// record applies one record. It runs before the aggregator serves, with
// a.mu held.
func (r *replay) record(pos wal.Pos, typ wal.Type, payload []byte) error {
	a := r.a
	a.metrics.replayedRecords.Inc()
	r.records++
	switch typ {
	case recBatch:
		b, err := decodeBatch(payload)
		if err != nil {
			return err
		}
		r.batch(pos, b)
	case recCut:
		c, err := decodeCut(payload)
		if err != nil {
			return err
		}
		r.restore()
		r.held[pos] = a.takeLocked(c.starts)
		r.cuts[pos] = cutMark{pos: pos, upto: c.upto, final: c.final}
	case recIntent:
		cut, entries, err := decodeIntent(payload)
		if err != nil {
			return err
		}
		// The intent's requests hold the cut's windows; a cut whose record
		// was deleted with its segment is known by its intent alone.
		delete(r.held, cut)
		r.intent(pos, r.cuts[cut], entries)
	case recForward:
		f, err := decodeForward(payload)
		if err != nil {
			return err
		}
		// The batch's identity was checked and marked here, whichever
		// aggregators own its events.
		a.markLocked(f.source, f.batchSeq, f.nowMS)
		for _, e := range f.entries {
			// Parts logged before they carried their reception time hold
			// it in the record.
			if e.push.ReceivedMs == 0 {
				e.push.ReceivedMs = f.nowMS
			}
		}
		r.intent(pos, cutMark{}, f.entries)
	case recCarried:
		f, err := decodeForward(payload)
		if err != nil {
			return err
		}
		// Its identity was marked by its first record.
		for _, e := range f.entries {
			e.reached = true
		}
		r.intent(pos, cutMark{}, f.entries)
	case recDelivered:
		d, err := decodeDelivered(payload)
		if err != nil {
			return err
		}
		// An intent fully delivered before its segment was deleted leaves
		// confirmations of nothing behind.
		if it := r.intents[d.intent]; it != nil && d.index < len(it.entries) {
			a.deliveredLocked(it, d.index, d.dest)
		}
	case recReached:
		d, err := decodeDelivered(payload)
		if err != nil {
			return err
		}
		if it := r.intents[d.intent]; it != nil && d.index < len(it.entries) {
			it.entries[d.index].reached = true
		}
	case recCheckpoint:
		sources, err := decodeCheckpoint(payload)
		if err != nil {
			return err
		}
		a.mu.sources = sources
	default:
		return fmt.Errorf("%w: unknown type %d", errRecord, typ)
	}
	return nil
}

// intent makes the requests of an intent or forward record pending until
// their deliveries show up.
func (r *replay) intent(pos wal.Pos, cut cutMark, entries []*entry) {
	it := r.a.newIntent(pos, cut, entries)
	r.intents[pos] = it
	r.a.mu.intents[it] = struct{}{}
	if it.remaining == 0 {
		r.a.completeLocked(it)
	}
}

// batch counts a batch record's events again, as Push did, and marks its
// identity. The events were checked when they were taken; one the schema
// now refuses, or older than the finest retention, is logged and left out.
func (r *replay) batch(pos wal.Pos, b batchRecord) {
	a := r.a
	a.markLocked(b.source, b.batchSeq, b.nowMS)
	v := a.newValidator(b.dict, b.nowMS, true)
	ids := make([]uint32, len(b.dict))
	maxStart, any := int64(math.MinInt64), false
	for i, e := range b.events {
		ev := event{index: i}
		if reason, detail := v.check(e, &ev); reason != noReason {
			a.opts.Logger.Error("logged event no longer valid, left out", "segment", pos.Segment, "offset", pos.Offset, "event", i, "reason", detail)
			a.metrics.replaySkipped.Inc()
			continue
		}
		a.internEventLocked(&ev, b.dict, ids)
		start := a.window.StepStart(ev.ts)
		if _, reason := a.addLocked(&ev, start, math.MaxInt); reason != noReason {
			a.opts.Logger.Error("logged event would overflow its window, left out", "segment", pos.Segment, "offset", pos.Offset, "event", i)
			a.metrics.replaySkipped.Inc()
			continue
		}
		a.metrics.replayedEvents.Inc()
		r.events++
		maxStart, any = max(maxStart, start), true
	}
	if any {
		a.noteSegmentLocked(pos, maxStart)
	}
}

// restore puts the windows of cuts that never got an intent back into the
// cube, as the process that restarted after the crash did.
func (r *replay) restore() {
	for pos, todo := range r.held {
		for _, t := range todo {
			r.a.mergeWindowLocked(t.start, t.w)
		}
		delete(r.held, pos)
	}
}

// finish ends the replay and returns the intents still waiting for a
// delivery, in log order.
func (r *replay) finish() []*intent {
	r.restore()
	var pending []*intent
	for _, it := range r.intents {
		if it.remaining > 0 {
			pending = append(pending, it)
		}
	}
	slices.SortFunc(pending, func(x, y *intent) int { return x.pos.Compare(y.pos) })
	return pending
}

// mergeWindowLocked adds the cells of w to the cube's window at start: each
// leaf's count goes to every cuboid of its fan, which rebuilds the coarser
// cells as the sums of their leaves.
func (a *Aggregator) mergeWindowLocked(start int64, w *window) {
	dst := a.mu.windows[start]
	if dst == nil {
		a.mu.windows[start] = w
		return
	}
	r := a.mu.reg
	for i, id := range w.ids {
		leaf := r.keys[id]
		f := a.fams[leaf.fam]
		if leaf.cuboid != f.finest {
			continue
		}
		if dst.index(id) == 0 {
			dst.newLeaf(int(leaf.fam), a.mu.hint)
		}
		src := w.aggs[i]
		dst.addFan(r, f, r.fanOf[id], src.sum, src.count)
	}
}

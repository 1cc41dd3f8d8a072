package wire

import "github.com/dimsum/dimsum/wire/wirepb"

// Batch builds a PushRequest, interning every string into the request's
// dictionary so that a value repeated across events is sent once. The zero
// value is ready to use.
type Batch struct {
	req   wirepb.PushRequest
	index map[string]uint32
	// events and their label indexes are allocated in blocks so that
	// adding one costs no allocation in the common case.
	block  []wirepb.Event
	labels []uint32
	// prev holds the labels of the event added last and prevIdx their
	// indexes: a label equal to the one in the same place of the event
	// before (its name, nearly always, and often its value) takes that
	// index without a lookup in index.
	prev    []string
	prevIdx []uint32
}

// Add appends one event. labels alternate name, value, name, value.
func (b *Batch) Add(family string, timestampMS int64, value float64, labels ...string) {
	if len(b.block) == 0 {
		b.block = make([]wirepb.Event, 256)
	}
	ev := &b.block[0]
	b.block = b.block[1:]
	ev.Family = b.intern(family)
	ev.TimestampMs = timestampMS
	ev.Value = value
	if len(b.labels) < len(labels) {
		b.labels = make([]uint32, max(4096, len(labels)))
	}
	ev.Labels = b.labels[:len(labels):len(labels)]
	b.labels = b.labels[len(labels):]
	for i, l := range labels {
		if i < len(b.prev) && l == b.prev[i] {
			ev.Labels[i] = b.prevIdx[i]
			continue
		}
		ev.Labels[i] = b.intern(l)
	}
	// A copy: the caller may reuse its slice for the next event.
	b.prev, b.prevIdx = append(b.prev[:0], labels...), ev.Labels
	b.req.Events = append(b.req.Events, ev)
}

func (b *Batch) intern(s string) uint32 {
	if i, ok := b.index[s]; ok {
		return i
	}
	if b.index == nil {
		b.index = map[string]uint32{}
	}
	i := uint32(len(b.req.Dict))
	b.req.Dict = append(b.req.Dict, s)
	b.index[s] = i
	return i
}

// Identify gives the batch its identity: the publisher's source and the
// batch's sequence, from 1. An aggregator counts a batch of one identity
// once, however often it is retried.
func (b *Batch) Identify(source string, seq uint64) {
	b.req.Source = source
	b.req.BatchSeq = seq
}

// Len is the number of events in the batch.
func (b *Batch) Len() int { return len(b.req.Events) }

// Request returns the batch as a PushRequest. The batch must not be changed
// while the request is in use; call Reset to start the next one.
func (b *Batch) Request() *wirepb.PushRequest { return &b.req }

// Reset empties the batch for reuse.
func (b *Batch) Reset() {
	b.req = wirepb.PushRequest{}
	clear(b.index)
	b.prev, b.prevIdx = b.prev[:0], nil
}

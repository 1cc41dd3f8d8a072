package wire

import "github.com/dimsum/dimsum/wire/wirepb"

// Batch builds a PushRequest, interning every string into the request's
// dictionary so that a value repeated across events is sent once. The zero
// value is ready to use.
type Batch struct {
	req   wirepb.PushRequest
	index map[string]uint32
	// events and their label indexes are allocated in blocks, which Reset
	// keeps for the next batch: adding an event costs no allocation once
	// a batch as large was built, and leaves the collector nothing.
	blocks       [][]wirepb.Event
	block, used  int // the block being filled, and its events used
	labels       [][]uint32
	label, lused int
	// prev holds the labels of the event added last and prevIdx their
	// indexes: a label equal to the one in the same place of the event
	// before (its name, nearly always, and often its value) takes that
	// index without a lookup in index.
	prev    []string
	prevIdx []uint32
}

// Add appends one event. labels alternate name, value, name, value.
func (b *Batch) Add(family string, timestampMS int64, value float64, labels ...string) {
	ev := b.event()
	ev.Family = b.intern(family)
	ev.TimestampMs = timestampMS
	ev.Value = value
	ev.Labels = b.labelRoom(len(labels))
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

// event returns the next event of the blocks, a block of 256 made when
// they are all used.
func (b *Batch) event() *wirepb.Event {
	if b.block < len(b.blocks) && b.used == len(b.blocks[b.block]) {
		b.block, b.used = b.block+1, 0
	}
	if b.block == len(b.blocks) {
		b.blocks = append(b.blocks, make([]wirepb.Event, 256))
	}
	ev := &b.blocks[b.block][b.used]
	b.used++
	return ev
}

// labelRoom returns room for n label indexes from the blocks, a block of
// at least 4,096 made when the one being filled lacks it.
func (b *Batch) labelRoom(n int) []uint32 {
	for b.label < len(b.labels) && len(b.labels[b.label])-b.lused < n {
		b.label, b.lused = b.label+1, 0
	}
	if b.label == len(b.labels) {
		b.labels = append(b.labels, make([]uint32, max(4096, n)))
	}
	room := b.labels[b.label][b.lused : b.lused+n : b.lused+n]
	b.lused += n
	return room
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

// Reset empties the batch for reuse. The request it returned before must
// no longer be in use: its events' room serves the next batch.
func (b *Batch) Reset() {
	// Emptied, so that the next batch's room holds none of this one's
	// strings.
	clear(b.req.Events)
	clear(b.req.Dict)
	b.req = wirepb.PushRequest{Events: b.req.Events[:0], Dict: b.req.Dict[:0]}
	clear(b.index)
	b.prev, b.prevIdx = b.prev[:0], nil
	b.block, b.used, b.label, b.lused = 0, 0, 0, 0
}

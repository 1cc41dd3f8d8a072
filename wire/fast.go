package wire

import (
	"encoding/binary"
	"math"
	"slices"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/wire/wirepb"
)

// A PushRequest, the message every event comes in, is decoded here without
// protobuf's reflection, which took 8% of a node's CPU on a backfill, and
// without an allocation an event and another for its labels; and encoded
// so, for the publisher. The fast paths read and write what the generated
// code would; anything they do not expect (an unknown field, a field of
// another wire type, malformed input) goes through proto instead, so the
// result, unknown fields and errors included, is always proto's. (A
// FlushRequest is columnar, and proto decodes its packed columns as fast as
// a hand-written decoder did.)

// UnmarshalPush decodes b into m as proto.Unmarshal does. The events share
// two allocations, one for the events and one for their labels. A request
// that holds events from an earlier UnmarshalPush is decoded into them, and
// each into its labels' room, as long as they last: a server that keeps its
// requests for the next batches (the aggregator's Ingest service) allocates
// nothing an event. A batch of 50,000 events took 5 MB of new memory, which
// the runtime zeroed, scanned and gave back to the system, a sixth of a
// node's CPU during a backfill pushed in such batches.
func UnmarshalPush(b []byte, m *wirepb.PushRequest) error {
	room := m.Events[:cap(m.Events)]
	m.Reset()
	if decodePush(b, m, room) {
		return nil
	}
	return proto.Unmarshal(b, m)
}

// decodePush decodes b into m, which is reset, reusing the events of room
// (those an earlier decodePush made, with their labels) when there are
// enough of them.
func decodePush(b []byte, m *wirepb.PushRequest, room []*wirepb.Event) bool {
	dict, events, labelBytes := 0, 0, 0
	for p := b; len(p) > 0; {
		num, typ, n := protowire.ConsumeTag(p)
		if n < 0 {
			return false
		}
		p = p[n:]
		n = protowire.ConsumeFieldValue(num, typ, p)
		if n < 0 {
			return false
		}
		switch num {
		case 1:
			dict++
		case 2:
			events++
			labelBytes += n
		}
		p = p[n:]
	}
	if dict > 0 {
		m.Dict = make([]string, 0, dict)
	}
	var slab []wirepb.Event
	var labels []uint32
	reuse := events > 0 && len(room) >= events && room[events-1] != nil
	switch {
	case reuse:
		m.Events = room[:0]
	case events > 0:
		slab = make([]wirepb.Event, events)
		m.Events = make([]*wirepb.Event, 0, events)
		// A label takes a byte or more, and an event's other fields some
		// twenty: half the events' bytes holds their labels but in a rare
		// batch, which grows the slice.
		labels = make([]uint32, 0, labelBytes/2)
	}
	for p := b; len(p) > 0; {
		num, typ, n := protowire.ConsumeTag(p)
		p = p[n:]
		var v []byte
		var x uint64
		switch typ {
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(p)
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(p)
		default:
			return false
		}
		p = p[n:]
		switch {
		case num == 1 && typ == protowire.BytesType && utf8.Valid(v):
			m.Dict = append(m.Dict, string(v))
		case num == 2 && typ == protowire.BytesType && reuse:
			// The event's own labels' room, which no other event shares.
			e := room[len(m.Events)]
			own := e.Labels[:0]
			*e = wirepb.Event{}
			if _, ok := decodeEvent(v, e, own); !ok {
				return false
			}
			m.Events = append(m.Events, e)
		case num == 2 && typ == protowire.BytesType:
			e := &slab[len(m.Events)]
			var ok bool
			if labels, ok = decodeEvent(v, e, labels); !ok {
				return false
			}
			// Capped, so that appending to one event's labels never
			// writes into the next one's.
			e.Labels = e.Labels[:len(e.Labels):len(e.Labels)]
			m.Events = append(m.Events, e)
		case num == 3 && typ == protowire.BytesType && utf8.Valid(v):
			m.Source = string(v)
		case num == 4 && typ == protowire.VarintType:
			m.BatchSeq = x
		case num == 5 && typ == protowire.VarintType:
			m.ReceivedMs = int64(x)
		default:
			return false
		}
	}
	return true
}

// decodeEvent decodes one event, appending its labels to labels and
// pointing its Labels at them; false when the event needs proto.
func decodeEvent(b []byte, e *wirepb.Event, labels []uint32) ([]uint32, bool) {
	start := len(labels)
	for len(b) > 0 {
		tag, n := varint(b)
		if n < 0 || tag>>3 > math.MaxInt32 {
			return labels, false
		}
		num, typ := protowire.Number(tag>>3), protowire.Type(tag&7)
		b = b[n:]
		var x uint64
		switch {
		case num == 3 && typ == protowire.BytesType:
			var packed []byte
			if packed, n = protowire.ConsumeBytes(b); n < 0 {
				return labels, false
			}
			for len(packed) > 0 {
				v, m := varint(packed)
				if m < 0 {
					return labels, false
				}
				labels, packed = append(labels, uint32(v)), packed[m:]
			}
		case typ == protowire.VarintType && (num == 1 || num == 2 || num == 3):
			if x, n = varint(b); n < 0 {
				return labels, false
			}
			switch num {
			case 1:
				e.Family = uint32(x)
			case 2:
				e.TimestampMs = int64(x)
			default:
				labels = append(labels, uint32(x))
			}
		case num == 4 && typ == protowire.Fixed64Type:
			if x, n = protowire.ConsumeFixed64(b); n < 0 {
				return labels, false
			}
			e.Value = math.Float64frombits(x)
		default:
			return labels, false
		}
		b = b[n:]
	}
	if len(labels) > start {
		e.Labels = labels[start:]
	}
	return labels, true
}

// varint is protowire.ConsumeVarint with the one- and two-byte cases, a
// label's and an event's tags, inlined.
func varint(b []byte) (uint64, int) {
	if len(b) > 0 && b[0] < 0x80 {
		return uint64(b[0]), 1
	}
	if len(b) > 1 && b[1] < 0x80 {
		return uint64(b[0]&0x7f) | uint64(b[1])<<7, 2
	}
	return protowire.ConsumeVarint(b)
}

// marshalPush encodes m as proto.Marshal does, byte for byte: the
// publisher's side of the path UnmarshalPush speeds up. A message with
// unknown fields goes through proto.
func marshalPush(m *wirepb.PushRequest) ([]byte, error) {
	size := 0
	for _, s := range m.Dict {
		size += 1 + protowire.SizeBytes(len(s))
	}
	for _, e := range m.Events {
		if len(e.ProtoReflect().GetUnknown()) > 0 {
			return proto.Marshal(m)
		}
		size += 1 + protowire.SizeBytes(eventSize(e))
	}
	if len(m.ProtoReflect().GetUnknown()) > 0 {
		return proto.Marshal(m)
	}
	size += 1 + protowire.SizeBytes(len(m.Source)) + 2*(1+binary.MaxVarintLen64)
	b := make([]byte, 0, size)
	for _, s := range m.Dict {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, s)
	}
	for _, e := range m.Events {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(eventSize(e)))
		b = appendVarintField(b, 1, uint64(e.Family))
		b = appendVarintField(b, 2, uint64(e.TimestampMs))
		if len(e.Labels) > 0 {
			b = protowire.AppendTag(b, 3, protowire.BytesType)
			b = protowire.AppendVarint(b, uint64(labelsSize(e.Labels)))
			for _, l := range e.Labels {
				if l < 0x80 {
					b = append(b, byte(l))
				} else {
					b = protowire.AppendVarint(b, uint64(l))
				}
			}
		}
		if v := math.Float64bits(e.Value); v != 0 {
			b = protowire.AppendTag(b, 4, protowire.Fixed64Type)
			b = protowire.AppendFixed64(b, v)
		}
	}
	if m.Source != "" {
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendString(b, m.Source)
	}
	b = appendVarintField(b, 4, m.BatchSeq)
	b = appendVarintField(b, 5, uint64(m.ReceivedMs))
	return b, nil
}

// eventSize is the encoded size of an event's fields.
func eventSize(e *wirepb.Event) int {
	n := 0
	if e.Family != 0 {
		n += 1 + protowire.SizeVarint(uint64(e.Family))
	}
	if e.TimestampMs != 0 {
		n += 1 + protowire.SizeVarint(uint64(e.TimestampMs))
	}
	if len(e.Labels) > 0 {
		n += 1 + protowire.SizeBytes(labelsSize(e.Labels))
	}
	if math.Float64bits(e.Value) != 0 {
		n += 1 + 8
	}
	return n
}

func labelsSize(labels []uint32) int {
	n := 0
	for _, l := range labels {
		n += protowire.SizeVarint(uint64(l))
	}
	return n
}

// marshalFlush encodes a flush in the columnar layout as proto.Marshal
// does, byte for byte, in one pass over each column: a packed column is
// appended after room for the longest length prefix, which is then written
// and the column moved up to it. A flush with cells as messages, or with
// unknown fields, or with a string proto refuses (not UTF-8), goes through
// proto.
func marshalFlush(m *wirepb.FlushRequest) ([]byte, error) {
	if len(m.Cells) > 0 || len(m.ProtoReflect().GetUnknown()) > 0 || !utf8.ValidString(m.Source) {
		return proto.Marshal(m)
	}
	for _, s := range m.Dict {
		if !utf8.ValidString(s) {
			return proto.Marshal(m)
		}
	}
	// Room for what a flush most often holds: small families, cuboids,
	// counts and whole sums, values under 2^14, numbers under 2^21. The
	// buffer is kept while the flush waits for its replicas, so it is not
	// sized for the worst case: append grows it past what this misses.
	size := 64 + len(m.Source) + 7*packedRoom + len(m.CellFamilies) + len(m.CellCuboids) + 2*len(m.CellValues) + 8*len(m.CellSums) + len(m.CellCounts) + 3*len(m.CellNumbers) + len(m.CellWholeSums)
	for _, s := range m.Dict {
		size += 1 + protowire.SizeBytes(len(s))
	}
	b := make([]byte, 0, size)
	if m.Source != "" {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, m.Source)
	}
	b = appendVarintField(b, 2, uint64(m.WindowStartMs))
	b = appendVarintField(b, 3, m.Sequence)
	for _, s := range m.Dict {
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendString(b, s)
	}
	b = appendVarintField(b, 6, uint64(m.Shard))
	b = appendVarintField(b, 7, uint64(m.Shards))
	b = appendPacked(b, 8, m.CellFamilies)
	b = appendPacked(b, 9, m.CellCuboids)
	b = appendPacked(b, 10, m.CellValues)
	if len(m.CellSums) > 0 {
		b = protowire.AppendTag(b, 11, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(8*len(m.CellSums)))
		for _, s := range m.CellSums {
			b = binary.LittleEndian.AppendUint64(b, math.Float64bits(s))
		}
	}
	b = appendPacked(b, 12, m.CellCounts)
	b = appendPacked(b, 13, m.CellNumbers)
	b = appendVarintField(b, 14, m.Numbering)
	b = appendPacked(b, 15, m.CellWholeSums)
	if cap(b)-len(b) > len(b)/8 {
		// The flush keeps its bytes until its replicas took it, and
		// counts their length against the aggregator's bound: not
		// much more room than that.
		b = slices.Clone(b)
	}
	return b, nil
}

// appendVarintField appends field num as a varint, unless v is 0, which
// proto leaves out.
func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// packedRoom is the room left for the length of a packed column, which
// packedLength fills: a varint up to 2^35 bytes.
const packedRoom = binary.MaxVarintLen32

// appendPacked appends field num, packed varints, unless vs is empty.
func appendPacked[T uint32 | uint64](b []byte, num protowire.Number, vs []T) []byte {
	if len(vs) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	at := len(b)
	b = append(b, make([]byte, packedRoom)...)
	for _, v := range vs {
		for v >= 0x80 {
			b = append(b, byte(v)|0x80)
			v >>= 7
		}
		b = append(b, byte(v))
	}
	return packedLength(b, at)
}

// packedLength writes, at b[at:], the length of the column that follows
// packedRoom bytes later, and moves the column up to it.
func packedLength(b []byte, at int) []byte {
	n := len(b) - at - packedRoom
	l := protowire.AppendVarint(b[at:at], uint64(n))
	copy(b[at+len(l):], b[at+packedRoom:])
	return b[:at+len(l)+n]
}

package aggregator

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/internal/dedupe"
	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The aggregator's record types in its write-ahead log. The payload layouts
// are in docs/format/wal.md. ONLY APPEND TO THIS LIST: the numbers are on
// disk.
const (
	recBatch      wal.Type = 1 // the accepted events of one Push
	recCut        wal.Type = 2 // windows taken out of the cube to be flushed
	recIntent     wal.Type = 3 // the requests built from a cut, with their destinations
	recDelivered  wal.Type = 4 // one destination took one request of an intent
	recCheckpoint wal.Type = 5 // the dedupe state, first record of every segment
	recForward    wal.Type = 6 // the parts of one batch owned by other aggregators, with their owners
	recReached    wal.Type = 7 // a delivery of a forwarded part failed after it left: its owner may hold it
	recCarried    wal.Type = 8 // a forwarded part its owner may hold, logged again for a newer segment
)

// entryKind tells the requests of an intent apart. ONLY APPEND TO THIS LIST.
const (
	entryFlush   byte = 1 // a FlushRequest to a combiner replica
	entryForward byte = 2 // a PushRequest to the aggregator that owns its events
)

// errRecord marks a record of the aggregator's log that does not decode.
var errRecord = errors.New("aggregator: bad log record")

func appendPos(b []byte, p wal.Pos) []byte {
	b = binary.AppendUvarint(b, p.Segment)
	return binary.AppendUvarint(b, uint64(p.Offset))
}

// appendBatch encodes the events of req at the indexes in accepted, with
// the batch's identity and the time it was taken.
func appendBatch(b []byte, req *wirepb.PushRequest, nowMS int64, accepted []event) []byte {
	b = encoding.AppendString(b, req.Source)
	b = binary.AppendUvarint(b, req.BatchSeq)
	b = binary.AppendVarint(b, nowMS)
	b = binary.AppendUvarint(b, uint64(len(req.Dict)))
	for _, s := range req.Dict {
		b = encoding.AppendString(b, s)
	}
	b = binary.AppendUvarint(b, uint64(len(accepted)))
	for i := range accepted {
		e := req.Events[accepted[i].index]
		b = binary.AppendUvarint(b, uint64(e.Family))
		b = binary.AppendUvarint(b, uint64(len(e.Labels)))
		for _, l := range e.Labels {
			b = binary.AppendUvarint(b, uint64(l))
		}
		b = binary.AppendVarint(b, e.TimestampMs-nowMS)
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(e.Value))
	}
	return b
}

// readPos reads what appendPos wrote.
func readPos(d *encoding.Decbuf, what string) wal.Pos {
	return wal.Pos{Segment: d.Uvarint(what), Offset: int64(d.Uvarint(what))}
}

// batchRecord is a decoded recBatch.
type batchRecord struct {
	source   string
	batchSeq uint64
	nowMS    int64
	dict     []string
	events   []*wirepb.Event
}

func decodeBatch(payload []byte) (batchRecord, error) {
	d := encoding.NewDecbuf(payload, errRecord)
	r := batchRecord{source: d.String("source"), batchSeq: d.Uvarint("batch sequence"), nowMS: d.Varint("time")}
	r.dict = make([]string, d.Count("dictionary", 1))
	for i := range r.dict {
		r.dict[i] = d.String("dictionary")
	}
	r.events = make([]*wirepb.Event, d.Count("events", 11))
	for i := range r.events {
		e := &wirepb.Event{Family: uint32(d.Uvarint("family"))}
		e.Labels = make([]uint32, d.Count("labels", 1))
		for j := range e.Labels {
			e.Labels[j] = uint32(d.Uvarint("label"))
		}
		e.TimestampMs = r.nowMS + d.Varint("timestamp")
		e.Value = math.Float64frombits(d.Uint64("value"))
		r.events[i] = e
	}
	return r, d.Done("batch")
}

// cutRecord is a recCut: the windows starting at starts left the cube. They
// were every window starting at or before upto, every window when final.
type cutRecord struct {
	upto   int64
	final  bool
	starts []int64
}

func appendCut(b []byte, c cutRecord) []byte {
	b = binary.AppendVarint(b, c.upto)
	if c.final {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.AppendUvarint(b, uint64(len(c.starts)))
	for _, s := range c.starts {
		b = binary.AppendVarint(b, s)
	}
	return b
}

func decodeCut(payload []byte) (cutRecord, error) {
	d := encoding.NewDecbuf(payload, errRecord)
	c := cutRecord{upto: d.Varint("upto"), final: d.Byte("final flag") == 1}
	c.starts = make([]int64, d.Count("window starts", 1))
	for i := range c.starts {
		c.starts[i] = d.Varint("window start")
	}
	return c, d.Done("cut")
}

// appendIntent encodes the requests built from the cut at pos, each with its
// destinations.
func appendIntent(b []byte, cut wal.Pos, entries []*entry) ([]byte, error) {
	return appendRequests(appendPos(b, cut), entries)
}

func decodeIntent(payload []byte) (cut wal.Pos, entries []*entry, err error) {
	d := encoding.NewDecbuf(payload, errRecord)
	cut = readPos(&d, "cut position")
	entries = readRequests(&d)
	return cut, entries, d.Done("intent")
}

// forwardRecord is a recForward: the parts of the batch (source, batchSeq)
// taken at nowMS that other aggregators own, one request each.
type forwardRecord struct {
	source   string
	batchSeq uint64
	nowMS    int64
	entries  []*entry
}

func appendForward(b []byte, r forwardRecord) ([]byte, error) {
	b = encoding.AppendString(b, r.source)
	b = binary.AppendUvarint(b, r.batchSeq)
	b = binary.AppendVarint(b, r.nowMS)
	return appendRequests(b, r.entries)
}

func decodeForward(payload []byte) (forwardRecord, error) {
	d := encoding.NewDecbuf(payload, errRecord)
	r := forwardRecord{source: d.String("source"), batchSeq: d.Uvarint("batch sequence"), nowMS: d.Varint("time")}
	r.entries = readRequests(&d)
	return r, d.Done("forward")
}

// appendRequests encodes the requests of an intent or forward record, each
// with its kind and destinations.
func appendRequests(b []byte, entries []*entry) ([]byte, error) {
	size := binary.MaxVarintLen64
	for _, e := range entries {
		if e.kind == entryFlush {
			size += len(e.flush.Data) + 64
		}
	}
	b = slices.Grow(b, size)
	b = binary.AppendUvarint(b, uint64(len(entries)))
	for _, e := range entries {
		b = append(b, e.kind)
		b = binary.AppendUvarint(b, uint64(len(e.dests)))
		for _, d := range e.dests {
			b = encoding.AppendString(b, d)
		}
		enc := []byte(nil)
		if e.kind == entryFlush {
			enc = e.flush.Data
		} else {
			var err error
			if enc, err = proto.Marshal(e.push); err != nil {
				return nil, fmt.Errorf("aggregator: cannot encode a request of kind %d: %w", e.kind, err)
			}
		}
		b = binary.AppendUvarint(b, uint64(len(enc)))
		b = append(b, enc...)
	}
	return b, nil
}

// requests reads what appendRequests wrote.
func readRequests(d *encoding.Decbuf) []*entry {
	entries := make([]*entry, d.Count("requests", 3))
	for i := range entries {
		e := &entry{index: i, kind: d.Byte("kind")}
		e.dests = make([]string, d.Count("destinations", 1))
		for j := range e.dests {
			e.dests[j] = d.String("destination")
		}
		enc := d.Bytes("request")
		var err error
		switch e.kind {
		case entryFlush:
			e.flush, err = wire.DecodeFlush(slices.Clone(enc))
		case entryForward:
			e.push = &wirepb.PushRequest{}
			err = wire.UnmarshalPush(enc, e.push)
		default:
			d.Fail(fmt.Sprintf("request %d of unknown kind %d", i, e.kind))
		}
		if err != nil && d.Err() == nil {
			d.Failf("request %d of kind %d: %w", i, e.kind, err)
		}
		entries[i] = e
	}
	return entries
}

// deliveredRecord is a decoded recDelivered or recReached: which request
// of which record, and the destination.
type deliveredRecord struct {
	intent wal.Pos
	index  int
	dest   string
}

func appendDelivered(b []byte, r deliveredRecord) []byte {
	b = appendPos(b, r.intent)
	b = binary.AppendUvarint(b, uint64(r.index))
	return encoding.AppendString(b, r.dest)
}

func decodeDelivered(payload []byte) (deliveredRecord, error) {
	d := encoding.NewDecbuf(payload, errRecord)
	r := deliveredRecord{intent: readPos(&d, "intent position")}
	if index := d.Uvarint("index"); index <= math.MaxInt32 {
		r.index = int(index)
	} else {
		d.Fail("index")
	}
	r.dest = d.String("destination")
	return r, d.Done("delivery")
}

// appendCheckpoint encodes the dedupe state of every source.
func appendCheckpoint(b []byte, sources map[string]*seqWindow) []byte {
	b = binary.AppendUvarint(b, uint64(len(sources)))
	for s, w := range sources {
		b = encoding.AppendString(b, s)
		b = binary.AppendUvarint(b, w.High())
		b = binary.AppendVarint(b, w.lastMS)
		for _, x := range w.Bits() {
			b = binary.LittleEndian.AppendUint64(b, x)
		}
	}
	return b
}

func decodeCheckpoint(payload []byte) (map[string]*seqWindow, error) {
	d := encoding.NewDecbuf(payload, errRecord)
	n := d.Count("sources", 3+8*dedupe.Words)
	sources := make(map[string]*seqWindow, n)
	for range n {
		s := d.String("source")
		high, lastMS := d.Uvarint("high"), d.Varint("last push")
		var bits [dedupe.Words]uint64
		for i := range bits {
			bits[i] = d.Uint64("bits")
		}
		sources[s] = &seqWindow{Seqs: dedupe.Restore(high, bits), lastMS: lastMS}
	}
	return sources, d.Done("checkpoint")
}

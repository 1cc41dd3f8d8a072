package aggregator

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/internal/dedupe"
	"github.com/dimsum/dimsum/wal"
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
)

// entryKind tells the requests of an intent apart. ONLY APPEND TO THIS LIST.
const (
	entryFlush   byte = 1 // a FlushRequest to a combiner replica
	entryForward byte = 2 // a PushRequest to the aggregator that owns its events
)

// errRecord marks a record of the aggregator's log that does not decode.
var errRecord = errors.New("aggregator: bad log record")

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendPos(b []byte, p wal.Pos) []byte {
	b = binary.AppendUvarint(b, p.Segment)
	return binary.AppendUvarint(b, uint64(p.Offset))
}

// appendBatch encodes the events of req at the indexes in accepted, with
// the batch's identity and the time it was taken.
func appendBatch(b []byte, req *wirepb.PushRequest, nowMS int64, accepted []event) []byte {
	b = appendString(b, req.Source)
	b = binary.AppendUvarint(b, req.BatchSeq)
	b = binary.AppendVarint(b, nowMS)
	b = binary.AppendUvarint(b, uint64(len(req.Dict)))
	for _, s := range req.Dict {
		b = appendString(b, s)
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

// decoder reads a payload with a sticky error: after the first failure every
// read returns zero, and err says what failed first.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: cannot read %s", errRecord, what)
	}
	d.b = nil
}

func (d *decoder) uvarint(what string) uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint(what string) int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a length that must fit in the bytes left, each item taking at
// least min bytes, so that garbage cannot make a huge allocation.
func (d *decoder) count(what string, min int) int {
	n := d.uvarint(what)
	if n > uint64(len(d.b)/min) {
		d.fail(what)
		return 0
	}
	return int(n)
}

func (d *decoder) bytes(what string) []byte {
	n := d.count(what, 1)
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) string(what string) string { return string(d.bytes(what)) }

func (d *decoder) uint64(what string) uint64 {
	if len(d.b) < 8 {
		d.fail(what)
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *decoder) byte(what string) byte {
	if len(d.b) < 1 {
		d.fail(what)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) pos(what string) wal.Pos {
	return wal.Pos{Segment: d.uvarint(what), Offset: int64(d.uvarint(what))}
}

// done reports the first error, or that bytes were left over.
func (d *decoder) done(what string) error {
	if d.err == nil && len(d.b) > 0 {
		d.err = fmt.Errorf("%w: %d bytes after the %s", errRecord, len(d.b), what)
	}
	return d.err
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
	d := decoder{b: payload}
	r := batchRecord{source: d.string("source"), batchSeq: d.uvarint("batch sequence"), nowMS: d.varint("time")}
	r.dict = make([]string, d.count("dictionary", 1))
	for i := range r.dict {
		r.dict[i] = d.string("dictionary")
	}
	r.events = make([]*wirepb.Event, d.count("events", 11))
	for i := range r.events {
		e := &wirepb.Event{Family: uint32(d.uvarint("family"))}
		e.Labels = make([]uint32, d.count("labels", 1))
		for j := range e.Labels {
			e.Labels[j] = uint32(d.uvarint("label"))
		}
		e.TimestampMs = r.nowMS + d.varint("timestamp")
		e.Value = math.Float64frombits(d.uint64("value"))
		r.events[i] = e
	}
	return r, d.done("batch")
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
	d := decoder{b: payload}
	c := cutRecord{upto: d.varint("upto"), final: d.byte("final flag") == 1}
	c.starts = make([]int64, d.count("window starts", 1))
	for i := range c.starts {
		c.starts[i] = d.varint("window start")
	}
	return c, d.done("cut")
}

// appendIntent encodes the requests built from the cut at pos, each with its
// destinations.
func appendIntent(b []byte, cut wal.Pos, entries []*entry) ([]byte, error) {
	return appendRequests(appendPos(b, cut), entries)
}

func decodeIntent(payload []byte) (cut wal.Pos, entries []*entry, err error) {
	d := decoder{b: payload}
	cut = d.pos("cut position")
	entries = d.requests()
	return cut, entries, d.done("intent")
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
	b = appendString(b, r.source)
	b = binary.AppendUvarint(b, r.batchSeq)
	b = binary.AppendVarint(b, r.nowMS)
	return appendRequests(b, r.entries)
}

func decodeForward(payload []byte) (forwardRecord, error) {
	d := decoder{b: payload}
	r := forwardRecord{source: d.string("source"), batchSeq: d.uvarint("batch sequence"), nowMS: d.varint("time")}
	r.entries = d.requests()
	return r, d.done("forward")
}

// appendRequests encodes the requests of an intent or forward record, each
// with its kind and destinations.
func appendRequests(b []byte, entries []*entry) ([]byte, error) {
	b = binary.AppendUvarint(b, uint64(len(entries)))
	for _, e := range entries {
		b = append(b, e.kind)
		b = binary.AppendUvarint(b, uint64(len(e.dests)))
		for _, d := range e.dests {
			b = appendString(b, d)
		}
		var msg proto.Message = e.flush
		if e.kind == entryForward {
			msg = e.push
		}
		enc, err := proto.Marshal(msg)
		if err != nil {
			return nil, fmt.Errorf("aggregator: cannot encode a request of kind %d: %w", e.kind, err)
		}
		b = binary.AppendUvarint(b, uint64(len(enc)))
		b = append(b, enc...)
	}
	return b, nil
}

// requests reads what appendRequests wrote.
func (d *decoder) requests() []*entry {
	entries := make([]*entry, d.count("requests", 3))
	for i := range entries {
		e := &entry{index: i, kind: d.byte("kind")}
		e.dests = make([]string, d.count("destinations", 1))
		for j := range e.dests {
			e.dests[j] = d.string("destination")
		}
		enc := d.bytes("request")
		var msg proto.Message
		switch e.kind {
		case entryFlush:
			e.flush = &wirepb.FlushRequest{}
			msg = e.flush
		case entryForward:
			e.push = &wirepb.PushRequest{}
			msg = e.push
		default:
			d.fail(fmt.Sprintf("request %d of unknown kind %d", i, e.kind))
		}
		if msg != nil && d.err == nil {
			if err := proto.Unmarshal(enc, msg); err != nil {
				d.err = fmt.Errorf("%w: request %d of kind %d: %w", errRecord, i, e.kind, err)
			}
		}
		entries[i] = e
	}
	return entries
}

// deliveredRecord is a decoded recDelivered.
type deliveredRecord struct {
	intent wal.Pos
	index  int
	dest   string
}

func appendDelivered(b []byte, r deliveredRecord) []byte {
	b = appendPos(b, r.intent)
	b = binary.AppendUvarint(b, uint64(r.index))
	return appendString(b, r.dest)
}

func decodeDelivered(payload []byte) (deliveredRecord, error) {
	d := decoder{b: payload}
	r := deliveredRecord{intent: d.pos("intent position")}
	if index := d.uvarint("index"); index <= math.MaxInt32 {
		r.index = int(index)
	} else {
		d.fail("index")
	}
	r.dest = d.string("destination")
	return r, d.done("delivery")
}

// appendCheckpoint encodes the dedupe state of every source.
func appendCheckpoint(b []byte, sources map[string]*seqWindow) []byte {
	b = binary.AppendUvarint(b, uint64(len(sources)))
	for s, w := range sources {
		b = appendString(b, s)
		b = binary.AppendUvarint(b, w.High())
		b = binary.AppendVarint(b, w.lastMS)
		for _, x := range w.Bits() {
			b = binary.LittleEndian.AppendUint64(b, x)
		}
	}
	return b
}

func decodeCheckpoint(payload []byte) (map[string]*seqWindow, error) {
	d := decoder{b: payload}
	n := d.count("sources", 3+8*dedupe.Words)
	sources := make(map[string]*seqWindow, n)
	for range n {
		s := d.string("source")
		high, lastMS := d.uvarint("high"), d.varint("last push")
		var bits [dedupe.Words]uint64
		for i := range bits {
			bits[i] = d.uint64("bits")
		}
		sources[s] = &seqWindow{Seqs: dedupe.Restore(high, bits), lastMS: lastMS}
	}
	return sources, d.done("checkpoint")
}

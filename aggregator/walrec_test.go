package aggregator

import (
	"encoding/binary"
	"errors"
	"reflect"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/internal/dedupe"
	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// TestRecordsRoundTrip encodes each record type and decodes it back.
func TestRecordsRoundTrip(t *testing.T) {
	req := &wirepb.PushRequest{Source: "pub", BatchSeq: 7, Dict: []string{"requests", "host", "h1"},
		Events: []*wirepb.Event{{Family: 0, Labels: []uint32{1, 2}, TimestampMs: 1_000_500, Value: 2.5}, {Family: 0, Labels: []uint32{1, 2}, TimestampMs: 999_000, Value: 1}}}
	b, err := decodeBatch(appendBatch(nil, req, 1_000_000, []event{{index: 1}}))
	if err != nil || b.source != "pub" || b.batchSeq != 7 || b.nowMS != 1_000_000 || !reflect.DeepEqual(b.dict, req.Dict) ||
		len(b.events) != 1 || b.events[0].TimestampMs != 999_000 || b.events[0].Value != 1 || !reflect.DeepEqual(b.events[0].Labels, []uint32{1, 2}) {
		t.Errorf("batch: %+v, %v", b, err)
	}
	cut := cutRecord{upto: -5, final: true, starts: []int64{-10_000, 20_000}}
	if c, err := decodeCut(appendCut(nil, cut)); err != nil || !reflect.DeepEqual(c, cut) {
		t.Errorf("cut: %+v, %v", c, err)
	}
	flush, err := wire.EncodeFlush(&wirepb.FlushRequest{Source: "agg/x", WindowStartMs: 10_000, Sequence: 3, Shard: 1, Shards: 2, Dict: []string{"requests"},
		CellFamilies: []uint32{0}, CellCuboids: []uint32{0}, CellSums: []float64{2}, CellCounts: []uint64{1}})
	if err != nil {
		t.Fatal(err)
	}
	// Read back, a flush has its bytes only.
	logged := *flush
	logged.Request = nil
	payload, err := appendIntent(nil, wal.Pos{Segment: 2, Offset: 30}, []*entry{{kind: entryFlush, dests: []string{"r1", "r2"}, flush: flush}})
	if err != nil {
		t.Fatal(err)
	}
	pos, entries, err := decodeIntent(payload)
	if err != nil || pos != (wal.Pos{Segment: 2, Offset: 30}) || len(entries) != 1 || !reflect.DeepEqual(entries[0].flush, &logged) ||
		entries[0].flush.Sequence != 3 || entries[0].flush.Shard != 1 || entries[0].flush.Cells != 1 || !reflect.DeepEqual(entries[0].dests, []string{"r1", "r2"}) {
		t.Errorf("intent: %v %+v, %v", pos, entries, err)
	}
	part := &wirepb.PushRequest{Source: "pub", BatchSeq: 7, Dict: []string{"requests", "host", "h2"},
		Events: []*wirepb.Event{{Family: 0, Labels: []uint32{1, 2}, TimestampMs: 999_000, Value: 3}}}
	payload, err = appendForward(nil, forwardRecord{source: "pub", batchSeq: 7, nowMS: 1_000_000,
		entries: []*entry{{kind: entryForward, dests: []string{"b"}, push: part}, {kind: entryFlush, dests: []string{"c"}, flush: flush}}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := decodeForward(payload)
	if err != nil || f.source != "pub" || f.batchSeq != 7 || f.nowMS != 1_000_000 || len(f.entries) != 2 ||
		f.entries[0].kind != entryForward || !reflect.DeepEqual(f.entries[0].dests, []string{"b"}) ||
		!proto.Equal(f.entries[0].push, part) || f.entries[1].index != 1 || !reflect.DeepEqual(f.entries[1].flush, &logged) {
		t.Errorf("forward: %+v, %v", f, err)
	}
	d := deliveredRecord{intent: wal.Pos{Segment: 1, Offset: 8}, index: 4, dest: "r2"}
	if got, err := decodeDelivered(appendDelivered(nil, d)); err != nil || got != d {
		t.Errorf("delivered: %+v, %v", got, err)
	}
	// An index beyond int would turn negative, and replay indexes with it.
	huge := binary.AppendUvarint(appendPos(nil, d.intent), 1<<63)
	if got, err := decodeDelivered(encoding.AppendString(huge, "r2")); !errors.Is(err, errRecord) {
		t.Errorf("delivery of request 2^63: %+v, %v", got, err)
	}
	w := &seqWindow{Seqs: dedupe.Restore(1500, [dedupe.Words]uint64{3: 0xf0}), lastMS: 42}
	sources, err := decodeCheckpoint(appendCheckpoint(nil, map[string]*seqWindow{"pub": w}))
	if err != nil || len(sources) != 1 || *sources["pub"] != *w {
		t.Errorf("checkpoint: %v, %v", sources, err)
	}
}

// FuzzDecodeRecords feeds arbitrary payloads to every record decoder: none
// may panic or allocate beyond the payload's size, and an error must be a
// record error.
func FuzzDecodeRecords(f *testing.F) {
	req := &wirepb.PushRequest{Source: "pub", BatchSeq: 1, Dict: []string{"requests", "host", "h1"},
		Events: []*wirepb.Event{{Family: 0, Labels: []uint32{1, 2}, TimestampMs: 5, Value: 1}}}
	f.Add(appendBatch(nil, req, 10, []event{{index: 0}}))
	f.Add(appendCut(nil, cutRecord{upto: 99, starts: []int64{90}}))
	flush, _ := wire.EncodeFlush(&wirepb.FlushRequest{Source: "a"})
	intent, _ := appendIntent(nil, wal.Pos{Segment: 1, Offset: 9}, []*entry{{kind: entryFlush, dests: []string{"c"}, flush: flush}})
	f.Add(intent)
	forward, _ := appendForward(nil, forwardRecord{source: "pub", batchSeq: 2, nowMS: 10,
		entries: []*entry{{kind: entryForward, dests: []string{"b"}, push: req}}})
	f.Add(forward)
	f.Add(appendDelivered(nil, deliveredRecord{dest: "c"}))
	f.Add(appendCheckpoint(nil, map[string]*seqWindow{"pub": {Seqs: dedupe.Restore(3, [dedupe.Words]uint64{})}}))
	f.Fuzz(func(t *testing.T, payload []byte) {
		_, err1 := decodeBatch(payload)
		_, err2 := decodeCut(payload)
		_, _, err3 := decodeIntent(payload)
		d, err4 := decodeDelivered(payload)
		if err4 == nil && d.index < 0 {
			// Replay indexes the intent's entries with it.
			t.Fatalf("delivery of request %d", d.index)
		}
		_, err5 := decodeCheckpoint(payload)
		_, err6 := decodeForward(payload)
		for _, err := range []error{err1, err2, err3, err4, err5, err6} {
			if err != nil && !errors.Is(err, errRecord) {
				t.Fatalf("unclassified error %v", err)
			}
		}
	})
}

package tsdb

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/dimsum/dimsum/schema"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the golden files in testdata/")

// goldenRows are the row encodings the golden file pins; the fuzz test
// starts from them too.
var goldenRows = []struct {
	name  string
	slots []slotValue
}{
	{"empty", nil},
	{"one slot", []slotValue{{0, 7, 3}}},
	{"sum equals count", []slotValue{{3, 4, 4}, {4, 5, 5}, {9, 0, 0}}},
	{"consecutive slots", []slotValue{{0, 1, 1}, {1, 2, 1}, {2, 3, 1}}},
	{"last slot", []slotValue{{schema.StepsPerRow - 1, 1, 1}}},
	{"sparse", []slotValue{{5, 10, 2}, {64, 0, 0}, {300, 1000000, 999}}},
	{"fraction", []slotValue{{1, 0.5, 1}}},
	{"negative zero", []slotValue{{1, math.Copysign(0, -1), 1}}},
	{"negative zero, count 0", []slotValue{{1, math.Copysign(0, -1), 0}}},
	{"negative", []slotValue{{1, -3, 1}}},
	{"largest whole sum", []slotValue{{1, 1<<53 - 1, 1}}},
	{"2^53", []slotValue{{1, 1 << 53, 1}}},
	{"huge", []slotValue{{1, 1e300, 1}}},
	{"NaN", []slotValue{{1, math.NaN(), 1}}},
	{"+Inf", []slotValue{{1, math.Inf(1), 1}}},
	{"largest count", []slotValue{{1, 1, math.MaxUint64}}},
	{"largest count, sum equal", []slotValue{{1, math.MaxUint64, math.MaxUint64}}},
	{"counts 0 and 2^64-1", []slotValue{{1, 0, 0}, {2, 0, math.MaxUint64}}},
	{"every slot, sums equal counts", rowOf(schema.StepsPerRow, func(i int) (float64, uint64) { return float64(i % 4), uint64(i % 4) })},
	{"every slot, rising counts", rowOf(schema.StepsPerRow, func(i int) (float64, uint64) { return float64(5000 + 3*i), uint64(5000 + 3*i) })},
	{"even slots, whole sums", rowOf(schema.StepsPerRow/2, func(i int) (float64, uint64) { return float64(2 * (i % 3)), uint64(i % 3) })},
	{"first 100 slots, fractions", rowOf(100, func(i int) (float64, uint64) { return float64(i) / 4, 1 })},
}

// rowOf returns n slots, every slot when n is StepsPerRow and every other
// slot when it is half of it, else the first n, with values from f.
func rowOf(n int, f func(i int) (float64, uint64)) []slotValue {
	stride := 1
	if n == schema.StepsPerRow/2 {
		stride = 2
	}
	out := make([]slotValue, n)
	for i := range out {
		sum, count := f(i)
		out[i] = slotValue{i * stride, sum, count}
	}
	return out
}

// goldenBitmaps are the presence values the golden file pins;
// the fuzz test starts from them too.
var goldenBitmaps = []struct {
	name string
	ids  []uint32
}{
	{"one cell", []uint32{7}},
	{"sparse", []uint32{0, 3, 70000, math.MaxUint32}},
	{"a run", func() []uint32 {
		var ids []uint32
		for i := range uint32(1000) {
			ids = append(ids, 100+i)
		}
		return ids
	}()},
}

// TestGolden pins every key kind and the row encoding byte for byte: a
// change here is a change of the on-disk format (docs/format/tsdb.md) and
// needs a new format version. Run with -rewrite to regenerate, then review
// the diff.
func TestGolden(t *testing.T) {
	var buf bytes.Buffer
	line := func(name string, b []byte) {
		fmt.Fprintf(&buf, "%-40s %s\n", name, hex.EncodeToString(b))
	}
	fam := schema.Default().Family("requests")
	buf.WriteString("# keys\n")
	line("format key", metaFormatKey)
	line("family key requests", appendFamilyKey(nil, "requests"))
	line("data key 10s row0 fam1 cuboid15 cell42", k(makeDataKey(10, 0, 1, 15, 42)))
	line("data key 10s row-1 fam1 cuboid15 cell42", k(makeDataKey(10, -1, 1, 15, 42)))
	line("data key 1h row492887 f65535 c65535 cellmax", k(makeDataKey(3600, 492887, 65535, 65535, math.MaxUint32)))
	line("presence key 10s row492887 fam1 cuboid15", presenceKey{10, 492887, 1, 15}.append(nil))
	line("presence key 1h row-1 fam65535 c65535", presenceKey{3600, -1, 65535, 65535}.append(nil))
	line("cell key fam1 cuboid15 cell42", appendCellKey(nil, 1, 15, 42))
	line("source key agg-1", appendSourceKey(nil, "agg-1"))
	line("staged key 7", stagedKey(7))
	line("written key 10s row492887", writtenKey(10, 492887))
	buf.WriteString("# values\n")
	line("format record", binary.AppendUvarint(nil, formatVersion))
	line("family record id1 requests", appendFamilyRecord(nil, 1, fam))
	line("cell values dc1,,h1", appendCellValues(nil, []string{"dc1", "", "h1"}))
	src := &source{lastMS: 1700000000000}
	for _, seq := range []uint64{3, 5, 64} {
		src.seqs.Mark(seq)
	}
	line("source record 3,5,64", appendSource(nil, src))
	if got, err := decodeSource(appendSource(nil, src)); err != nil || *got != *src {
		t.Fatalf("source record: decoded %+v, %v", got, err)
	}
	staged := []headEntry{
		{fi: 0, cuboid: 15, cell: 42, time: 1700000000000, sum: 3, count: 3},
		{fi: 0, cuboid: 15, cell: 7, time: 1700000000000, sum: 12, count: 1},
		{fi: 0, cuboid: 0, cell: 0, time: 1700000010000, sum: 0.5, count: 2},
	}
	b := appendStaged(nil, staged, func(uint16) uint16 { return 1 })
	line("staged batch of 3 deltas", b)
	back, err := decodeStaged(nil, b)
	if err != nil || len(back) != len(staged) {
		t.Fatalf("staged batch: decoded %+v, %v", back, err)
	}
	for i, e := range back {
		if w := staged[i]; e != (stagedEntry{fam: 1, cuboid: w.cuboid, cell: w.cell, time: w.time, sum: w.sum, count: w.count}) {
			t.Fatalf("staged entry %d: %+v, want %+v", i, e, w)
		}
	}
	line("written mark 7", binary.AppendUvarint(nil, 7))
	head := appendHeadEntry(appendHeadEntry(nil, 3, 4, 4), 359, 1e300, 1)
	line("head entries slot 3 (4,4), 359 (1e300,1)", head)
	for _, g := range goldenBitmaps {
		b := appendBitmap(nil, roaring.BitmapOf(g.ids...))
		line("bitmap "+g.name, b)
		got, err := decodeBitmap(b)
		if err != nil || !slices.Equal(got.ToArray(), g.ids) {
			t.Fatalf("bitmap %s: decoded %v, %v", g.name, got, err)
		}
	}
	var hc denseRow
	hf := &denseFine{k: 6}
	for _, e := range []struct {
		slot, sub int
		sum       float64
		count     uint64
	}{{0, 2, 5, 1}, {1, 0, 1, 1}, {1, 3, 2, 1}} {
		hc.add(e.slot, e.sum, e.count)
		hf.add(e.slot*6+e.sub, e.sum, e.count)
	}
	line("hosted row k=6: slot 0 in sub 2, slot 1 in subs 0 and 3", appendHosted(nil, &hc, hf))
	line("alias row: cuboid 15, cell 300", appendAlias(nil, aliasRef{cuboid: 15, cell: 300}))
	buf.WriteString("# rows (merged) and merge operands of a few slots\n")
	for _, r := range goldenRows {
		encodings := [][]byte{denseOf(r.slots).appendTo(nil)}
		line("row "+r.name, encodings[0])
		if len(r.slots) <= 3 {
			encodings = append(encodings, encodeRow(r.slots...))
			line("operand "+r.name, encodings[1])
		}
		for _, b := range encodings {
			got, err := decodeRow(b)
			if err != nil {
				t.Fatalf("row %s, %x: %v", r.name, b, err)
			}
			if !slotsEqual(got, r.slots) {
				t.Fatalf("row %s, %x: decoded %v, want %v", r.name, b, got, r.slots)
			}
		}
	}

	path := filepath.Join("testdata", "encoding.golden")
	if *rewrite {
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -rewrite to create it)", err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("encodings differ from %s (run with -rewrite and review the diff):\n%s", path, buf.Bytes())
	}
}

func k(d dataKey) []byte { return d[:] }

func TestDataKeyOrder(t *testing.T) {
	// Rows must sort by time across the sign change, and the fields in the
	// documented order.
	keys := []dataKey{
		makeDataKey(1, math.MinInt64, 0, 0, 0),
		makeDataKey(1, math.MinInt64, 0, 0, 1),
		makeDataKey(1, math.MinInt64, 0, 1, 0),
		makeDataKey(1, math.MinInt64, 1, 0, 0),
		makeDataKey(1, -1, 0, 0, 0),
		makeDataKey(1, 0, 0, 0, 0),
		makeDataKey(1, math.MaxInt64, 0, 0, 0),
		makeDataKey(10, math.MinInt64, 0, 0, 0),
	}
	if !slices.IsSortedFunc(keys, func(a, b dataKey) int { return bytes.Compare(a[:], b[:]) }) {
		t.Fatal("data keys do not sort in (step, row, family, cuboid, cell) order")
	}
	for _, key := range keys {
		p, err := parseDataKey(key[:])
		if err != nil {
			t.Fatal(err)
		}
		if makeDataKey(p.stepSec, p.row, p.fam, p.cuboid, p.cell) != key {
			t.Fatalf("%x does not round-trip: %+v", key, p)
		}
		// The presence key of a row is the data key's head, so both
		// sort alike and retention deletes both with the same bounds.
		pk := presenceOf(&key)
		if enc := pk.append(nil); !bytes.Equal(enc[1:], key[1:presenceKeyLen]) {
			t.Fatalf("presence key %x is not the head of data key %x", enc, key)
		}
		if got, err := parsePresenceKey(pk.append(nil)); err != nil || got != pk {
			t.Fatalf("presence key %+v does not round-trip: %+v, %v", pk, got, err)
		}
		lo := appendRowBound(nil, prefixData, p.stepSec, p.row)
		hi := appendRowBound(nil, prefixData, p.stepSec, p.row+1)
		if bytes.Compare(lo, key[:]) > 0 || (p.row < math.MaxInt64 && bytes.Compare(key[:], hi) >= 0) {
			t.Fatalf("row bounds [%x, %x) do not hold %x", lo, hi, key)
		}
	}
}

func TestCellValuesRoundTrip(t *testing.T) {
	for _, values := range [][]string{{}, {""}, {"a", "", "b"}, {string(make([]byte, 300))}} {
		got, err := decodeCellValues(string(appendCellValues(nil, values)))
		if err != nil || !slices.Equal(got, values) {
			t.Fatalf("%q: got %q, %v", values, got, err)
		}
	}
	for _, bad := range []string{"", "\x01", "\x01\x05ab", "\x01\x01ab", "\x09", "\xff"} {
		if _, err := decodeCellValues(bad); err == nil {
			t.Fatalf("%x: decoded without error", bad)
		}
	}
}

func TestDecodeRowRejects(t *testing.T) {
	var zeros []byte
	for range schema.StepsPerRow + 5 {
		zeros = append(zeros, 0)
	}
	entries := func(b ...byte) []byte { return append([]byte{rowMagic, slotsEntries}, b...) }
	columns := func(header byte, b ...byte) []byte { return append([]byte{rowMagic, header}, b...) }
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"bad magic", []byte{0x00, slotsEntries}},
		{"old magic", []byte{0xD1, 0x00, 0x01, 0x01}},
		{"magic alone", []byte{rowMagic}},
		{"unused header bits", columns(0x20|slotsList, 0, 0, 0)},
		{"entries with column bits", []byte{rowMagic, slotsEntries | countsDeltas}},

		{"entry: truncated header", entries(0x80)},
		{"entry: truncated count", entries(0x00)},
		{"entry: truncated whole sum", entries(0x01, 0x01)},
		{"entry: truncated float", entries(0x02, 0x01, 0, 0, 0)},
		{"entry: bad sum kind", entries(0x03, 0x01)},
		{"entry: slot beyond row", append(binary.AppendUvarint([]byte{rowMagic, slotsEntries}, schema.StepsPerRow<<2), 0x01)},
		{"entry: slot after last", append(encodeRow(slotValue{schema.StepsPerRow - 1, 1, 1}), 0x00, 0x01)},
		{"entry: overflowing varint", entries(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01)},

		{"list: no length", columns(slotsList)},
		{"list: too long", append(binary.AppendUvarint([]byte{rowMagic, slotsList}, schema.StepsPerRow+1), zeros...)},
		{"list: truncated", columns(slotsList, 2, 0)},
		{"list: slot beyond row", append(binary.AppendUvarint([]byte{rowMagic, slotsList, 1}, schema.StepsPerRow), 0, 0)},
		{"list: slot after last", append(binary.AppendUvarint([]byte{rowMagic, slotsList, 2}, schema.StepsPerRow-1), 0, 0, 0)},
		{"bitmap: truncated", columns(slotsBitmap, 0xff, 0xff)},
		{"counts: missing", columns(slotsList, 0)},
		{"counts: no width", columns(slotsList, 0, 0)},
		{"counts: width 65", columns(slotsList, 1, 0, 0, 65)},
		{"counts: truncated bits", columns(slotsList, 2, 0, 0, 0, 7, 0xff)},
		{"counts: deltas of no slot", columns(slotsList|countsDeltas, 0, 0, 0)},
		{"sums: missing whole", columns(slotsList|sumsFrame<<sumsShift, 1, 0, 1, 0)},
		{"sums: truncated IEEE", columns(slotsList|sumsIEEE<<sumsShift, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xf0)},
		{"all: truncated counts", columns(slotsAll, 0, 1, 0xff)},
		{"trailing bytes", append(denseOf(goldenRows[1].slots).appendTo(nil), 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := decodeRow(tc.b); err == nil {
				t.Fatalf("decoded %v without error", got)
			}
			var d denseRow
			if err := d.addRow(tc.b); err == nil {
				t.Fatal("addRow accepted it")
			}
		})
	}
}

// TestRowPrefixRejected cuts every merged golden row short at every length:
// a merged row records the size of each of its parts, so no prefix of it
// decodes.
func TestRowPrefixRejected(t *testing.T) {
	for _, r := range goldenRows {
		b := denseOf(r.slots).appendTo(nil)
		for n := range len(b) {
			if got, err := decodeRow(b[:n]); err == nil {
				t.Fatalf("row %s: prefix %x of %x decoded as %v", r.name, b[:n], b, got)
			}
		}
	}
}

// TestRowRoundTrip encodes random rows of every shape the merge operator
// meets, from one slot to all, with counts from 0 to 2^64-1 and every kind
// of sum, and requires them back bit for bit from both layouts.
func TestRowRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 8))
	for iter := range 2000 {
		slots := randomSlots(rng)
		for _, b := range [][]byte{denseOf(slots).appendTo(nil), encodeRow(slots...)} {
			got, err := decodeRow(b)
			if err != nil {
				t.Fatalf("iteration %d: %x: %v", iter, b, err)
			}
			if !slotsEqual(got, slots) {
				t.Fatalf("iteration %d: %x decoded to\n%v, want\n%v", iter, b, got, slots)
			}
		}
	}
}

// randomSlots returns the slots of a random row: a random density, counts
// of a random magnitude and spread, and sums of a random kind.
func randomSlots(rng *rand.Rand) []slotValue {
	density := rng.Float64()
	magnitude := rng.IntN(65)
	spread := rng.IntN(magnitude + 1)
	base := uint64(0)
	if magnitude > 0 {
		base = rng.Uint64() >> (64 - magnitude)
	}
	kind := rng.IntN(5)
	var out []slotValue
	for slot := range schema.StepsPerRow {
		if rng.Float64() > density {
			continue
		}
		count := base
		if spread > 0 {
			count += rng.Uint64() >> (64 - spread)
		}
		var sum float64
		switch kind {
		case 0: // every event is 1
			sum = float64(count)
		case 1: // whole numbers
			sum = float64(rng.Uint64() >> (64 - 1 - rng.IntN(53)))
		case 2: // fractions and negative numbers
			sum = float64(rng.IntN(1000)-500) / 8
		case 3: // the edges of float64
			sum = []float64{math.Copysign(0, -1), 0, 1 << 53, math.MaxFloat64, -math.MaxFloat64, math.SmallestNonzeroFloat64, math.Inf(1), math.NaN()}[rng.IntN(8)]
		default: // mostly equal to the count
			sum = float64(count)
			if rng.IntN(10) == 0 {
				sum++
			}
		}
		out = append(out, slotValue{slot, sum, count})
	}
	return out
}

// TestRowAllocs pins the row codec at zero allocations: Steps decodes every
// row it reads, the merge operator every operand and writes every row.
func TestRowAllocs(t *testing.T) {
	slots := goldenRows[len(goldenRows)-2].slots
	operand, row := encodeRow(slots...), denseOf(slots).appendTo(nil)
	buf := make([]byte, 0, 4096)
	var dense denseRow
	allocs := testing.AllocsPerRun(100, func() {
		var e rowEncoder
		e.reset(buf)
		for _, b := range [][]byte{operand, row} {
			var d rowDecoder
			for d.init(b); ; {
				slot, sum, count, ok := d.next()
				if !ok {
					break
				}
				e.add(slot, sum, count)
			}
			if d.err != nil {
				t.Fatal(d.err)
			}
		}
		dense.reset()
		if err := dense.addRow(operand); err != nil {
			t.Fatal(err)
		}
		if len(dense.appendTo(buf[:0])) != len(row) {
			t.Fatal("round trip failed")
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations, want 0", allocs)
	}
}

// FuzzDecodeRow feeds arbitrary bytes to the row decoder: it must never
// panic, and whatever it accepts must re-encode, in both layouts, to rows
// that decode to the same slots, bit for bit, through both the streaming
// and the dense path.
func FuzzDecodeRow(f *testing.F) {
	for _, r := range goldenRows {
		f.Add(encodeRow(r.slots...))
		f.Add(denseOf(r.slots).appendTo(nil))
	}
	f.Add([]byte{})
	f.Add([]byte{rowMagic, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		slots, err := decodeRow(b)
		var d denseRow
		derr := d.addRow(b)
		if (err == nil) != (derr == nil) {
			t.Fatalf("decoder says %v, dense row says %v", err, derr)
		}
		if err != nil {
			return
		}
		for i := 1; i < len(slots); i++ {
			if slots[i].slot <= slots[i-1].slot {
				t.Fatalf("slots not ascending: %v", slots)
			}
		}
		for _, again := range [][]byte{encodeRow(slots...), d.appendTo(nil)} {
			got, err := decodeRow(again)
			if err != nil {
				t.Fatalf("re-encoding %x does not decode: %v", again, err)
			}
			if !slotsEqual(got, slots) {
				t.Fatalf("round trip through %x: %v, want %v", again, got, slots)
			}
		}
	})
}

func slotsEqual(a, b []slotValue) bool {
	return slices.EqualFunc(a, b, func(x, y slotValue) bool {
		return x.slot == y.slot && x.count == y.count && math.Float64bits(x.sum) == math.Float64bits(y.sum)
	})
}

// FuzzDecodeBitmap feeds arbitrary bytes to the decoder of presence
// values: it must never panic, and whatever it accepts must
// re-encode to a value that decodes to the same set.
func FuzzDecodeBitmap(f *testing.F) {
	for _, g := range goldenBitmaps {
		f.Add(appendBitmap(nil, roaring.BitmapOf(g.ids...)))
	}
	f.Add([]byte{})
	f.Add([]byte{0x3b, 0x30, 0, 0, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeBitmap(b)
		if err != nil {
			return
		}
		if got.IsEmpty() {
			t.Fatal("decoded an empty set")
		}
		again, err := decodeBitmap(appendBitmap(nil, got.Clone()))
		if err != nil {
			t.Fatalf("re-encoding does not decode: %v", err)
		}
		if !again.Equals(got) {
			t.Fatalf("round trip: %v, want %v", again, got)
		}
	})
}

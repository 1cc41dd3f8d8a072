package tsdb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"

	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/schema"
)

// Row values: see docs/format/tsdb.md, "Row value", for the byte diagrams
// and the measurements that chose the encoding.
//
// Every row value and merge operand starts with rowMagic and a header byte.
// The header's low two bits say how the row lists its slots; the rest says
// how it packs counts and sums:
//
//	bits 0-1  slots:  0 all 360 present, 1 slot list, 2 bitmap,
//	                  3 entries (interleaved, version 2's merge operands)
//	bit  2    counts: 0 frame of reference, 1 deltas
//	bits 3-4  sums:   0 equal to the counts, 1 whole numbers by frame of
//	                  reference, 2 whole numbers by deltas, 3 IEEE-754
//	bits 5-7  zero
//
// The writer and the merge operator write the columnar layouts
// (denseRow.appendTo); version 2 wrote its operands as entries, which
// rowDecoder still reads, as it reads every layout.
const (
	// rowMagic is 0xD ("dimsum") in the high nibble and the row encoding's
	// version (2) in the low one. A value that starts with anything else is
	// corrupt.
	rowMagic byte = 0xD2

	slotsAll     = 0
	slotsList    = 1
	slotsBitmap  = 2
	slotsEntries = 3
	slotsMask    = 3

	countsDeltas = 1 << 2

	sumsShift  = 3
	sumsCounts = 0 // every sum equals its count
	sumsFrame  = 1 // whole numbers, frame of reference
	sumsDeltas = 2 // whole numbers, deltas
	sumsIEEE   = 3
	sumsMask   = 3 << sumsShift

	headerUnused = 0xE0
)

// Sum kinds of an entry, in the low two bits of its header.
const (
	entrySumCount = 0 // the sum equals the count and is not stored
	entrySumWhole = 1 // the sum follows as a uvarint
	entrySumIEEE  = 2 // the sum follows as 8 IEEE-754 bytes, little-endian
)

// presenceWords is the size of a row's presence bitmap in words, and
// bitmapBytes in bytes (360 slots fill 45 bytes exactly).
const (
	presenceWords = (schema.StepsPerRow + 63) / 64
	bitmapBytes   = (schema.StepsPerRow + 7) / 8
)

// sumIsCount reports whether sum is float64(count) bit for bit, so that the
// sum need not be stored: every event of a log-derived counter is 1.
func sumIsCount(sum float64, count uint64) bool {
	return sum == float64(count) && !math.Signbit(sum)
}

var (
	errRowMagic     = errors.New("bad magic byte")
	errRowHeader    = errors.New("bad header")
	errRowTruncated = errors.New("truncated")
	errRowSlot      = errors.New("slot out of range")
	errRowWidth     = errors.New("bit width above 64")
	errRowTrailing  = errors.New("trailing bytes")
)

// packedInts reads a column of n unsigned integers packed by appendPacked.
type packedInts struct {
	deltas bool
	base   uint64 // frame of reference: the minimum; deltas: the first value
	width  uint   // bits a packed value takes, 0 to 64
	mask   uint64 // the low width bits
	packed []byte
	i      int    // index of the next value
	prev   uint64 // deltas: the value last returned
}

// parse reads the column's header and checks that b holds its packed bits;
// it returns the rest of b.
func (p *packedInts) parse(b []byte, n int, deltas bool) ([]byte, error) {
	base, k := binary.Uvarint(b)
	if k <= 0 {
		return nil, errRowTruncated
	}
	b = b[k:]
	if len(b) == 0 {
		return nil, errRowTruncated
	}
	width := uint(b[0])
	b = b[1:]
	if width > 64 {
		return nil, errRowWidth
	}
	m := n
	if deltas {
		if n == 0 {
			return nil, errRowHeader
		}
		m = n - 1 // the first value is the base
	}
	size := (m*int(width) + 7) / 8
	if len(b) < size {
		return nil, errRowTruncated
	}
	*p = packedInts{deltas: deltas, base: base, width: width, mask: 1<<width - 1, packed: b[:size]}
	if width == 64 {
		p.mask = math.MaxUint64
	}
	return b[size:], nil
}

// next returns the next value. Arithmetic wraps, as appendPacked's does.
func (p *packedInts) next() uint64 {
	i := p.i
	p.i++
	if !p.deltas {
		return p.base + p.unpack(i)
	}
	if i == 0 {
		p.prev = p.base
	} else {
		p.prev += uint64(unzigzag(p.unpack(i - 1)))
	}
	return p.prev
}

// unpack returns the i-th packed value, which parse checked is there.
// Values are packed least significant bit first.
func (p *packedInts) unpack(i int) uint64 {
	packed, w := p.packed, p.width
	bit := uint(i) * w
	at, shift := bit/8, bit%8
	var x uint64
	if int(at)+8 <= len(packed) {
		x = binary.LittleEndian.Uint64(packed[at:])
	} else {
		for j, c := range packed[at:] {
			x |= uint64(c) << (8 * j)
		}
	}
	x >>= shift
	if shift+w > 64 {
		x |= uint64(packed[at+8]) << (64 - shift)
	}
	return x & p.mask
}

// appendPacked appends vals as a packed column, by frame of reference
// (uvarint minimum, width byte, each value minus the minimum in width bits)
// or by deltas (uvarint first value, width byte, each following value's
// zigzag difference from its predecessor in width bits), whichever is
// shorter. It reports whether it chose deltas. It overwrites vals.
func appendPacked(dst []byte, vals []uint64) ([]byte, bool) {
	if len(vals) == 0 {
		return append(dst, 0, 0), false
	}
	lo, hi := vals[0], vals[0]
	var diffs uint64 // OR of the zigzag differences: its length is their width
	for i, v := range vals {
		lo, hi = min(lo, v), max(hi, v)
		if i > 0 {
			diffs |= zigzag(int64(v - vals[i-1]))
		}
	}
	frameWidth := uint(bits.Len64(hi - lo))
	deltaWidth := uint(bits.Len64(diffs))
	n := len(vals)
	frameSize := uvarintLen(lo) + (n*int(frameWidth)+7)/8
	deltaSize := uvarintLen(vals[0]) + ((n-1)*int(deltaWidth)+7)/8
	if deltaSize < frameSize {
		for i := n - 1; i > 0; i-- {
			vals[i] = zigzag(int64(vals[i] - vals[i-1]))
		}
		dst = binary.AppendUvarint(dst, vals[0])
		dst = append(dst, byte(deltaWidth))
		return appendBits(dst, deltaWidth, vals[1:]), true
	}
	for i := range vals {
		vals[i] -= lo
	}
	dst = binary.AppendUvarint(dst, lo)
	dst = append(dst, byte(frameWidth))
	return appendBits(dst, frameWidth, vals), false
}

// appendBits appends vals in w bits each, least significant bit first.
func appendBits(dst []byte, w uint, vals []uint64) []byte {
	if w == 0 {
		return dst
	}
	var acc uint64 // bits not yet appended
	var have uint  // how many
	for _, v := range vals {
		acc |= v << have // Go shifts by 64 or more give 0
		if have+w < 64 {
			have += w
			continue
		}
		dst = binary.LittleEndian.AppendUint64(dst, acc)
		acc = v >> (64 - have)
		have = have + w - 64
	}
	for ; have > 0; have -= min(have, 8) {
		dst = append(dst, byte(acc))
		acc >>= 8
	}
	return dst
}

func zigzag(v int64) uint64 { return uint64(v<<1) ^ uint64(v>>63) }

func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }

func uvarintLen(v uint64) int { return (bits.Len64(v|1) + 6) / 7 }

// rowDecoder reads a row value slot by slot, in any layout. Its error is
// sticky, as in Prometheus' Decbuf: the loop checks it once, after next
// returns false. A columnar row is checked whole by init, so that a
// truncated one fails before any slot is read.
type rowDecoder struct {
	err    error
	header byte

	// entries layout: the unread entries and the last slot read.
	b    []byte
	slot int

	// columnar layouts: the slots not yet read, and the columns.
	present [presenceWords]uint64
	word    int
	counts  packedInts
	sums    packedInts
	floats  []byte // sumsIEEE: the unread sums
}

func (d *rowDecoder) init(b []byte) {
	*d = rowDecoder{slot: -1}
	if len(b) > 0 && b[0] == hostedMagic {
		// A hosted row reads as its coarse part.
		coarse, _, err := hostedParts(b)
		if err != nil {
			d.err = err
			return
		}
		b = coarse
	}
	if len(b) == 0 || b[0] != rowMagic {
		d.err = errRowMagic
		return
	}
	if len(b) < 2 {
		d.err = errRowTruncated
		return
	}
	d.header = b[1]
	if d.header&slotsMask == slotsEntries {
		if d.header != slotsEntries {
			d.err = errRowHeader
		}
		d.b = b[2:]
		return
	}
	d.err = d.parseColumns(b[2:])
}

// parseColumns reads a columnar row's slots and column headers and checks
// that b holds exactly the row.
func (d *rowDecoder) parseColumns(b []byte) error {
	if d.header&headerUnused != 0 {
		return errRowHeader
	}
	switch d.header & slotsMask {
	case slotsAll:
		for i := range d.present {
			d.present[i] = math.MaxUint64
		}
		d.present[presenceWords-1] >>= presenceWords*64 - schema.StepsPerRow
	case slotsList:
		n, k := binary.Uvarint(b)
		if k <= 0 {
			return errRowTruncated
		}
		b = b[k:]
		if n > schema.StepsPerRow {
			return errRowSlot
		}
		slot := -1
		for range n {
			gap, k := binary.Uvarint(b)
			if k <= 0 {
				return errRowTruncated
			}
			b = b[k:]
			if gap >= uint64(schema.StepsPerRow-1-slot) {
				return errRowSlot
			}
			slot += 1 + int(gap)
			d.present[slot/64] |= 1 << (slot % 64)
		}
	case slotsBitmap:
		if len(b) < bitmapBytes {
			return errRowTruncated
		}
		for i, c := range b[:bitmapBytes] {
			d.present[i/8] |= uint64(c) << (8 * (i % 8))
		}
		b = b[bitmapBytes:]
	}
	n := 0
	for _, w := range d.present {
		n += bits.OnesCount64(w)
	}
	var err error
	if b, err = d.counts.parse(b, n, d.header&countsDeltas != 0); err != nil {
		return err
	}
	switch (d.header & sumsMask) >> sumsShift {
	case sumsFrame, sumsDeltas:
		b, err = d.sums.parse(b, n, d.header&sumsMask == sumsDeltas<<sumsShift)
		if err != nil {
			return err
		}
	case sumsIEEE:
		if len(b) < 8*n {
			return errRowTruncated
		}
		d.floats, b = b[:8*n], b[8*n:]
	}
	if len(b) != 0 {
		return errRowTrailing
	}
	return nil
}

// next returns the next present slot; ok is false at the end or on error.
func (d *rowDecoder) next() (slot int, sum float64, count uint64, ok bool) {
	if d.err != nil {
		return 0, 0, 0, false
	}
	if d.header == slotsEntries {
		return d.nextEntry()
	}
	for d.word < presenceWords && d.present[d.word] == 0 {
		d.word++
	}
	if d.word == presenceWords {
		return 0, 0, 0, false
	}
	w := d.present[d.word]
	d.present[d.word] = w & (w - 1)
	slot = d.word*64 + bits.TrailingZeros64(w)
	count = d.counts.next()
	switch (d.header & sumsMask) >> sumsShift {
	case sumsCounts:
		sum = float64(count)
	case sumsFrame, sumsDeltas:
		sum = float64(d.sums.next())
	case sumsIEEE:
		sum = math.Float64frombits(binary.LittleEndian.Uint64(d.floats))
		d.floats = d.floats[8:]
	}
	return slot, sum, count, true
}

func (d *rowDecoder) nextEntry() (slot int, sum float64, count uint64, ok bool) {
	if len(d.b) == 0 {
		return 0, 0, 0, false
	}
	h, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errRowTruncated
		return 0, 0, 0, false
	}
	d.b = d.b[n:]
	gap := h >> 2
	if gap >= uint64(schema.StepsPerRow-1-d.slot) {
		d.err = errRowSlot
		return 0, 0, 0, false
	}
	slot = d.slot + 1 + int(gap)
	count, n = binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errRowTruncated
		return 0, 0, 0, false
	}
	d.b = d.b[n:]
	switch h & 3 {
	case entrySumCount:
		sum = float64(count)
	case entrySumWhole:
		u, n := binary.Uvarint(d.b)
		if n <= 0 {
			d.err = errRowTruncated
			return 0, 0, 0, false
		}
		d.b = d.b[n:]
		sum = float64(u)
	case entrySumIEEE:
		if len(d.b) < 8 {
			d.err = errRowTruncated
			return 0, 0, 0, false
		}
		sum = math.Float64frombits(binary.LittleEndian.Uint64(d.b))
		d.b = d.b[8:]
	default:
		d.err = errRowHeader
		return 0, 0, 0, false
	}
	d.slot = slot
	return slot, sum, count, true
}

// denseRow is the merge operator's working form of a row: every slot of the
// row in arrays, so that folding an operand is an indexed add. At 360 slots
// it is 5.8 KB, which is why the merge operator pools them.
type denseRow struct {
	present [presenceWords]uint64
	sum     [schema.StepsPerRow]float64
	count   [schema.StepsPerRow]uint64
}

// addRow folds an encoded row into r.
func (r *denseRow) addRow(b []byte) error {
	var d rowDecoder
	d.init(b)
	for {
		slot, sum, count, ok := d.next()
		if !ok {
			return d.err
		}
		r.add(slot, sum, count)
	}
}

// add adds one slot's sum and count to r.
func (r *denseRow) add(slot int, sum float64, count uint64) {
	w, bit := slot/64, uint64(1)<<(slot%64)
	if r.present[w]&bit == 0 {
		r.present[w] |= bit
		r.sum[slot] = sum
		r.count[slot] = count
		return
	}
	r.sum[slot] += sum
	r.count[slot] += count
}

// each calls fn with every present slot of r, ascending.
func (r *denseRow) each(fn func(slot int, sum float64, count uint64)) {
	for w, word := range r.present {
		for word != 0 {
			slot := w*64 + bits.TrailingZeros64(word)
			word &= word - 1
			fn(slot, r.sum[slot], r.count[slot])
		}
	}
}

// appendTo appends r in the columnar layout: its slots as whichever of
// "all", a slot list or a bitmap is shortest, then its counts, then its
// sums, omitted when each equals its count, packed like the counts when all
// are whole numbers, else in IEEE bytes.
func (r *denseRow) appendTo(dst []byte) []byte {
	var counts, sums [schema.StepsPerRow]uint64
	n := 0
	equal, whole := true, true
	listSize, prev := 0, -1
	for w, word := range r.present {
		for word != 0 {
			slot := w*64 + bits.TrailingZeros64(word)
			word &= word - 1
			sum, count := r.sum[slot], r.count[slot]
			counts[n] = count
			sums[n] = uint64(sum)
			equal = equal && sumIsCount(sum, count)
			whole = whole && encoding.Whole(sum)
			listSize += uvarintLen(uint64(slot - prev - 1))
			prev = slot
			n++
		}
	}
	listSize += uvarintLen(uint64(n))

	start := len(dst)
	dst = append(dst, rowMagic, 0)
	var header byte
	switch {
	case n == schema.StepsPerRow:
		header = slotsAll
	case listSize <= bitmapBytes:
		header = slotsList
		dst = binary.AppendUvarint(dst, uint64(n))
		prev = -1
		for w, word := range r.present {
			for word != 0 {
				slot := w*64 + bits.TrailingZeros64(word)
				word &= word - 1
				dst = binary.AppendUvarint(dst, uint64(slot-prev-1))
				prev = slot
			}
		}
	default:
		header = slotsBitmap
		for _, word := range r.present {
			dst = binary.LittleEndian.AppendUint64(dst, word)
		}
		dst = dst[:len(dst)-(presenceWords*8-bitmapBytes)]
	}
	var deltas bool
	if dst, deltas = appendPacked(dst, counts[:n]); deltas {
		header |= countsDeltas
	}
	switch {
	case equal:
		header |= sumsCounts << sumsShift
	case whole:
		if dst, deltas = appendPacked(dst, sums[:n]); deltas {
			header |= sumsDeltas << sumsShift
		} else {
			header |= sumsFrame << sumsShift
		}
	default:
		header |= sumsIEEE << sumsShift
		for w, word := range r.present {
			for word != 0 {
				slot := w*64 + bits.TrailingZeros64(word)
				word &= word - 1
				dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(r.sum[slot]))
			}
		}
	}
	dst[start+1] = header
	return dst
}

// reset empties r. Only the presence bits need clearing: addRow overwrites
// the sum and count of a slot that becomes present.
func (r *denseRow) reset() { r.present = [len(r.present)]uint64{} }

// corruptRowError reports a row value that cannot be decoded, naming its key
// so that an operator can find it with a Pebble tool.
func corruptRowError(key []byte, err error) error {
	return fmt.Errorf("%w: cannot decode row %x: %v", ErrCorrupt, key, err)
}

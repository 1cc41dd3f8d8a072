package tsdb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"

	"github.com/dimsum/dimsum/schema"
)

// rowMagic is the first byte of every row value and of every merge operand:
// 0xD ("dimsum") in the high nibble, the row encoding's version (1) in the
// low one. A value that starts with anything else is corrupt.
// See docs/format/tsdb.md, "Row value".
const rowMagic byte = 0xD1

// maxExactUint is 2^53: every integer below it is a float64 exactly, so a
// sum below it that is a whole number is stored as a uvarint (one to eight
// bytes) instead of eight IEEE bytes. Counter sums are mostly such numbers.
const maxExactUint = 1 << 53

// sumIsUvarint reports whether sum survives as a uvarint. Negative zero does
// not: it would come back as positive zero.
func sumIsUvarint(sum float64) bool {
	return sum >= 0 && sum < maxExactUint && sum == math.Trunc(sum) && !math.Signbit(sum)
}

// appendSlot appends one present slot: the slot header (the gap since the
// previous present slot, shifted left once, with the low bit set when the
// sum follows as IEEE bytes), the sum and the count.
func appendSlot(dst []byte, gap int, sum float64, count uint64) []byte {
	if sumIsUvarint(sum) {
		dst = binary.AppendUvarint(dst, uint64(gap)<<1)
		dst = binary.AppendUvarint(dst, uint64(sum))
	} else {
		dst = binary.AppendUvarint(dst, uint64(gap)<<1|1)
		dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(sum))
	}
	return binary.AppendUvarint(dst, count)
}

// rowEncoder appends a row value slot by slot, in strictly ascending slot
// order.
type rowEncoder struct {
	buf  []byte
	prev int
}

func (e *rowEncoder) reset(dst []byte) {
	e.buf = append(dst[:0], rowMagic)
	e.prev = -1
}

func (e *rowEncoder) add(slot int, sum float64, count uint64) {
	e.buf = appendSlot(e.buf, slot-e.prev-1, sum, count)
	e.prev = slot
}

// rowDecoder reads a row value slot by slot. Its error is sticky, as in
// Prometheus' Decbuf: the loop checks it once, after next returns false.
type rowDecoder struct {
	b    []byte
	slot int
	err  error
}

var (
	errRowMagic     = errors.New("bad magic byte")
	errRowTruncated = errors.New("truncated")
	errRowSlot      = errors.New("slot out of range")
)

func (d *rowDecoder) init(b []byte) {
	d.slot = -1
	d.err = nil
	if len(b) == 0 || b[0] != rowMagic {
		d.b = nil
		d.err = errRowMagic
		return
	}
	d.b = b[1:]
}

// next returns the next present slot; ok is false at the end or on error.
func (d *rowDecoder) next() (slot int, sum float64, count uint64, ok bool) {
	if d.err != nil || len(d.b) == 0 {
		return 0, 0, 0, false
	}
	h, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errRowTruncated
		return 0, 0, 0, false
	}
	d.b = d.b[n:]
	gap := h >> 1
	if gap >= uint64(schema.StepsPerRow-1-d.slot) {
		d.err = errRowSlot
		return 0, 0, 0, false
	}
	slot = d.slot + 1 + int(gap)
	if h&1 == 0 {
		u, n := binary.Uvarint(d.b)
		if n <= 0 {
			d.err = errRowTruncated
			return 0, 0, 0, false
		}
		d.b = d.b[n:]
		sum = float64(u)
	} else {
		if len(d.b) < 8 {
			d.err = errRowTruncated
			return 0, 0, 0, false
		}
		sum = math.Float64frombits(binary.LittleEndian.Uint64(d.b))
		d.b = d.b[8:]
	}
	count, n = binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errRowTruncated
		return 0, 0, 0, false
	}
	d.b = d.b[n:]
	d.slot = slot
	return slot, sum, count, true
}

// denseRow is the merge operator's working form of a row: every slot of the
// row in arrays, so that folding an operand is an indexed add. At 360 slots
// it is 5.8 KB, which is why the merge operator pools them.
type denseRow struct {
	present [(schema.StepsPerRow + 63) / 64]uint64
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
		w, bit := slot/64, uint64(1)<<(slot%64)
		if r.present[w]&bit == 0 {
			r.present[w] |= bit
			r.sum[slot] = sum
			r.count[slot] = count
		} else {
			r.sum[slot] += sum
			r.count[slot] += count
		}
	}
}

// appendTo appends the encoding of r.
func (r *denseRow) appendTo(dst []byte) []byte {
	var e rowEncoder
	e.reset(dst)
	for w, word := range r.present {
		for word != 0 {
			i := bits.TrailingZeros64(word)
			word &= word - 1
			slot := w*64 + i
			e.add(slot, r.sum[slot], r.count[slot])
		}
	}
	return e.buf
}

// reset empties r. Only the presence bits need clearing: addRow overwrites
// the sum and count of a slot that becomes present.
func (r *denseRow) reset() { r.present = [len(r.present)]uint64{} }

// corruptRowError reports a row value that cannot be decoded, naming its key
// so that an operator can find it with a Pebble tool.
func corruptRowError(key []byte, err error) error {
	return fmt.Errorf("%w: cannot decode row %x: %v", ErrCorrupt, key, err)
}

package tsdb

import (
	"encoding/binary"
	"errors"
	"math"
	"math/bits"
	"sync"

	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/schema"
)

// Hosted rows: in a store that pairs its two finest resolutions, the finest
// one's steps live inside the rows of the next, so that a series with fewer
// events than finest steps (one a minute, at 10s) stores each count once
// rather than once a resolution: where a coarse step's whole value lies in
// one fine step, the row holds only which one. docs/format/tsdb.md,
// "Hosted rows", has the byte diagram.
//
//	D3 | uvarint len | the coarse row (a D2 value of len bytes) | fine section
//	fine section := k (1 byte) | codes | masks | counts | sums kind (1 byte) | sums
//
// codes holds, for each present coarse slot in order, a code of
// bits.Len(k) bits, least significant bit first: c < k says the slot's
// whole sum and count lie in fine sub-slot c; k says its sub-slots are
// listed. masks holds, for each listed coarse slot in order, k bits: the
// sub-slots present. counts and sums are columns of the listed sub-slots,
// packed as a row's are (appendPacked); the sums kind is a row header's
// (0 equal to the counts, 1 frame of reference, 2 deltas, 3 IEEE).

// hostedMagic starts a hosted row: 0xD ("dimsum") and 3.
const hostedMagic byte = 0xD3

// maxHostedSubslots bounds k, the fine steps in a coarse one, so that a
// row's fine slots fit a fixed array: pairing needs k at most 16.
const maxHostedSubslots = 16

var errHostedK = errors.New("sub-slots out of range")

// denseFine is the fine part of a hosted row in working form: k sub-slots
// for each of the row's 360 coarse slots.
type denseFine struct {
	k       int
	present [schema.StepsPerRow * maxHostedSubslots / 64]uint64
	sum     [schema.StepsPerRow * maxHostedSubslots]float64
	count   [schema.StepsPerRow * maxHostedSubslots]uint64
	any     bool // some sub-slot is present
	// scratch holds the slices appendHosted and addFine build, kept for
	// the next row: a pooled denseFine then encodes and decodes without
	// allocating.
	scratch struct {
		codes, masks, counts, sums []uint64
		listed, subs               []int
		coarse                     []byte
	}
}

func (f *denseFine) add(i int, sum float64, count uint64) {
	w, bit := i/64, uint64(1)<<(i%64)
	f.any = true
	if f.present[w]&bit == 0 {
		f.present[w] |= bit
		f.sum[i], f.count[i] = sum, count
		return
	}
	f.sum[i] += sum
	f.count[i] += count
}

func (f *denseFine) has(i int) bool { return f.present[i/64]&(1<<(i%64)) != 0 }

func (f *denseFine) reset() {
	f.present = [len(f.present)]uint64{}
	f.any = false
}

// appendHosted appends the hosted row of coarse row c and its fine part f.
func appendHosted(dst []byte, c *denseRow, f *denseFine) []byte {
	sc := &f.scratch
	codes := sc.codes[:0]
	listed := sc.listed[:0] // coarse slots whose sub-slots are listed
	masks, counts, sums := sc.masks[:0], sc.counts[:0], sc.sums[:0]
	defer func() { sc.codes, sc.listed, sc.masks, sc.counts, sc.sums = codes, listed, masks, counts, sums }()
	dst = append(dst, hostedMagic)
	sc.coarse = c.appendTo(sc.coarse[:0])
	dst = binary.AppendUvarint(dst, uint64(len(sc.coarse)))
	dst = append(dst, sc.coarse...)
	dst = append(dst, byte(f.k))
	w := uint(bits.Len(uint(f.k)))
	c.each(func(i int, sum float64, count uint64) {
		code, ones := f.k, 0
		for j := range f.k {
			if f.has(i*f.k + j) {
				ones++
				code = j
			}
		}
		if ones != 1 || f.sum[i*f.k+code] != sum || f.count[i*f.k+code] != count || math.Signbit(f.sum[i*f.k+code]) != math.Signbit(sum) {
			code = f.k
			listed = append(listed, i)
		}
		codes = append(codes, uint64(code))
	})
	dst = appendBits(dst, w, codes)
	equal, whole := true, true
	for _, i := range listed {
		mask := uint64(0)
		for j := range f.k {
			if s := i*f.k + j; f.has(s) {
				mask |= 1 << j
				counts = append(counts, f.count[s])
				sums = append(sums, uint64(f.sum[s]))
				equal = equal && sumIsCount(f.sum[s], f.count[s])
				whole = whole && encoding.Whole(f.sum[s])
			}
		}
		masks = append(masks, mask)
	}
	dst = appendBits(dst, uint(f.k), masks)
	dst, _ = appendPackedKind(dst, counts)
	switch {
	case equal:
		dst = append(dst, sumsCounts)
	case whole:
		kindAt := len(dst)
		dst = append(dst, 0)
		var deltas bool
		if dst, deltas = appendPacked(dst, sums); deltas {
			dst[kindAt] = sumsDeltas
		} else {
			dst[kindAt] = sumsFrame
		}
	default:
		dst = append(dst, sumsIEEE)
		for _, i := range listed {
			for j := range f.k {
				if s := i*f.k + j; f.has(s) {
					dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(f.sum[s]))
				}
			}
		}
	}
	return dst
}

// hostedParts splits a hosted row into its coarse row and its fine
// section; a D2 row has no fine section.
func hostedParts(b []byte) (coarse, fine []byte, err error) {
	if len(b) == 0 || b[0] != hostedMagic {
		return b, nil, nil
	}
	n, k := binary.Uvarint(b[1:])
	if k <= 0 || n > uint64(len(b)-1-k) {
		return nil, nil, errRowTruncated
	}
	return b[1+k : 1+k+int(n)], b[1+k+int(n):], nil
}

// addFine folds the fine section of a hosted row whose coarse part
// decoded into c into f, which must be for the same k. The coarse values
// are the ones a code names.
func (f *denseFine) addFine(fine []byte, coarse []byte) error {
	if len(fine) < 1 {
		return errRowTruncated
	}
	k := int(fine[0])
	if k < 2 || k > maxHostedSubslots || f.k != 0 && k != f.k {
		return errHostedK
	}
	f.k = k
	w := uint(bits.Len(uint(k)))
	var d rowDecoder
	d.init(coarse)
	n := 0
	for _, word := range d.present {
		n += bits.OnesCount64(word)
	}
	if d.header&slotsMask == slotsEntries {
		return errRowHeader // a coarse part is always columnar
	}
	size := (n*int(w) + 7) / 8
	if len(fine)-1 < size {
		return errRowTruncated
	}
	codes := packedInts{width: w, mask: 1<<w - 1, packed: fine[1 : 1+size]}
	rest := fine[1+size:]
	listed := f.scratch.listed[:0]
	defer func() { f.scratch.listed = listed }()
	for {
		slot, sum, count, ok := d.next()
		if !ok {
			break
		}
		code := int(codes.next())
		switch {
		case code < k:
			f.add(slot*k+code, sum, count)
		case code == k:
			listed = append(listed, slot)
		default:
			return errHostedK
		}
	}
	if d.err != nil {
		return d.err
	}
	msize := (len(listed)*k + 7) / 8
	if len(rest) < msize {
		return errRowTruncated
	}
	masks := packedInts{width: uint(k), mask: 1<<k - 1, packed: rest[:msize]}
	rest = rest[msize:]
	subs := f.scratch.subs[:0]
	defer func() { f.scratch.subs = subs }()
	for _, i := range listed {
		mask := masks.next()
		for j := range k {
			if mask&(1<<j) != 0 {
				subs = append(subs, i*k+j)
			}
		}
	}
	var cs packedInts
	var err error
	if rest, err = cs.parseKind(rest, len(subs)); err != nil {
		return err
	}
	if len(rest) == 0 {
		return errRowTruncated
	}
	kind := rest[0]
	rest = rest[1:]
	var ss packedInts
	switch kind {
	case sumsCounts:
	case sumsFrame, sumsDeltas:
		if rest, err = ss.parse(rest, len(subs), kind == sumsDeltas); err != nil {
			return err
		}
	case sumsIEEE:
		if len(rest) < 8*len(subs) {
			return errRowTruncated
		}
	default:
		return errRowHeader
	}
	for _, s := range subs {
		count := cs.next()
		var sum float64
		switch kind {
		case sumsCounts:
			sum = float64(count)
		case sumsIEEE:
			sum = math.Float64frombits(binary.LittleEndian.Uint64(rest))
			rest = rest[8:]
		default:
			sum = float64(ss.next())
		}
		f.add(s, sum, count)
	}
	if len(rest) != 0 {
		return errRowTrailing
	}
	return nil
}

// appendPackedKind appends a packed column after a byte saying whether it
// holds deltas (1) or a frame of reference (0).
func appendPackedKind(dst []byte, vals []uint64) ([]byte, bool) {
	at := len(dst)
	dst = append(dst, 0)
	dst, deltas := appendPacked(dst, vals)
	if deltas {
		dst[at] = 1
	}
	return dst, deltas
}

// parseKind reads what appendPackedKind wrote, a column of n values.
func (p *packedInts) parseKind(b []byte, n int) ([]byte, error) {
	if len(b) == 0 || b[0] > 1 {
		return nil, errRowHeader
	}
	if b[0] == 1 && n == 0 {
		return nil, errRowHeader
	}
	return p.parse(b[1:], n, b[0] == 1)
}

// addHosted folds any row value, hosted or not, into c and, for a hosted
// one, its fine part into *f, which it takes from finePool when nil.
func addHosted(c *denseRow, f **denseFine, b []byte) error {
	coarse, fine, err := hostedParts(b)
	if err != nil {
		return err
	}
	if err := c.addRow(coarse); err != nil {
		return err
	}
	if fine == nil {
		return nil
	}
	if *f == nil {
		*f = finePool.Get().(*denseFine)
	}
	return (*f).addFine(fine, coarse)
}

var finePool = sync.Pool{New: func() any { return new(denseFine) }}

// releaseFine resets f and gives it back to finePool.
func releaseFine(f *denseFine) {
	if f != nil {
		f.reset()
		f.k = 0
		finePool.Put(f)
	}
}

// appendFineSteps appends the fine steps of a hosted row, of the row
// numbered row of resolution host, whose start lies in [mint, maxt],
// ascending. f is scratch, empty, and left empty.
func (f *denseFine) appendFineSteps(fine, host resolution, row int64, b []byte, mint, maxt int64, dst []Step) ([]Step, error) {
	coarse, section, err := hostedParts(b)
	if err != nil {
		return dst, err
	}
	if section == nil {
		// A row of the host alone, written while the fine steps were past
		// their retention: nothing to read, but it must decode.
		var d rowDecoder
		for d.init(coarse); ; {
			if _, _, _, ok := d.next(); !ok {
				return dst, d.err
			}
		}
	}
	defer func() { f.reset(); f.k = 0 }()
	if err := f.addFine(section, coarse); err != nil {
		return dst, err
	}
	base := row * host.rowSpanMs
	for w, word := range f.present[:(schema.StepsPerRow*f.k+63)/64] {
		for word != 0 {
			s := w*64 + bits.TrailingZeros64(word)
			word &= word - 1
			t := base + int64(s/f.k)*host.stepMs + int64(s%f.k)*fine.stepMs
			if t > maxt {
				return dst, nil
			}
			if t >= mint {
				dst = append(dst, Step{T: t, Sum: f.sum[s], Count: f.count[s]})
			}
		}
	}
	return dst, nil
}

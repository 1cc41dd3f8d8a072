package tsdb

import (
	"encoding/binary"
	"math"

	"github.com/dimsum/dimsum/internal/dedupe"
	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/schema"
)

// The records of the head's log: a staged batch (prefix 0x08) holds the
// deltas of one Apply until the rows they fall in are written; a source
// record (0x07) holds the batch sequences applied from one source; a
// written mark (0x09) says up to which staged batch a row of the finest
// resolution is written. docs/format/tsdb.md, "The head", has the byte
// diagrams.

// stagedVersion is the first byte of every staged batch.
const stagedVersion = 1

// headEntry is one delta on its way into the head: a cell of a cuboid of a
// family (by its index in the schema), at a time, with its sum and count.
type headEntry struct {
	fi     uint16
	cuboid schema.CuboidID
	cell   uint32
	time   int64
	sum    float64
	count  uint64
}

// sumKind returns how an entry stores its sum: not at all when it equals
// the count, as a uvarint when it is a whole number, else as IEEE bytes.
func sumKind(sum float64, count uint64) uint64 {
	switch {
	case sumIsCount(sum, count):
		return entrySumCount
	case encoding.Whole(sum):
		return entrySumWhole
	}
	return entrySumIEEE
}

func appendSum(dst []byte, kind uint64, sum float64) []byte {
	switch kind {
	case entrySumWhole:
		return binary.AppendUvarint(dst, uint64(sum))
	case entrySumIEEE:
		return binary.LittleEndian.AppendUint64(dst, math.Float64bits(sum))
	}
	return dst
}

func readSum(d *encoding.Decbuf, kind uint64, count uint64) float64 {
	switch kind {
	case entrySumCount:
		return float64(count)
	case entrySumWhole:
		return float64(d.Uvarint("sum"))
	case entrySumIEEE:
		return math.Float64frombits(d.Uint64("sum"))
	}
	d.Fail("sum kind")
	return 0
}

// appendStaged encodes entries, grouped by family and cuboid (a change of
// either starts a run), as a staged batch. famID maps a family index to the
// family's stored ID.
func appendStaged(dst []byte, entries []headEntry, famID func(fi uint16) uint16) []byte {
	dst = append(dst, stagedVersion)
	runs := 0
	for i := range entries {
		if i == 0 || entries[i].fi != entries[i-1].fi || entries[i].cuboid != entries[i-1].cuboid {
			runs++
		}
	}
	dst = binary.AppendUvarint(dst, uint64(runs))
	prev := int64(0)
	for i := 0; i < len(entries); {
		j := i + 1
		for j < len(entries) && entries[j].fi == entries[i].fi && entries[j].cuboid == entries[i].cuboid {
			j++
		}
		dst = binary.AppendUvarint(dst, uint64(famID(entries[i].fi)))
		dst = binary.AppendUvarint(dst, uint64(entries[i].cuboid))
		dst = binary.AppendUvarint(dst, uint64(j-i))
		for _, e := range entries[i:j] {
			kind := sumKind(e.sum, e.count)
			dst = binary.AppendUvarint(dst, uint64(e.cell)<<2|kind)
			dst = binary.AppendVarint(dst, e.time-prev)
			prev = e.time
			dst = binary.AppendUvarint(dst, e.count)
			dst = appendSum(dst, kind, e.sum)
		}
		i = j
	}
	return dst
}

// stagedEntry is a decoded entry of a staged batch, its family by stored
// ID.
type stagedEntry struct {
	fam    uint16
	cuboid schema.CuboidID
	cell   uint32
	time   int64
	sum    float64
	count  uint64
}

// decodeStaged appends the entries of a staged batch to dst. A batch that
// does not decode is an error wrapping ErrCorrupt.
func decodeStaged(dst []stagedEntry, v []byte) ([]stagedEntry, error) {
	d := encoding.NewDecbuf(v, ErrCorrupt)
	if d.Byte("version") != stagedVersion {
		d.Fail("version")
	}
	runs := d.Count("runs", 3)
	prev := int64(0)
	for range runs {
		fam, cuboid := d.Uvarint("family"), d.Uvarint("cuboid")
		if fam > math.MaxUint16 || cuboid > math.MaxUint16 {
			d.Fail("family and cuboid")
		}
		n := d.Count("entries", 3)
		for range n {
			h := d.Uvarint("cell")
			if h>>2 > math.MaxUint32 {
				d.Fail("cell")
			}
			prev += d.Varint("time")
			count := d.Uvarint("count")
			sum := readSum(&d, h&3, count)
			if d.Err() != nil {
				return dst, d.Err()
			}
			dst = append(dst, stagedEntry{fam: uint16(fam), cuboid: schema.CuboidID(cuboid), cell: uint32(h >> 2), time: prev, sum: sum, count: count})
		}
	}
	return dst, d.Done("staged batch")
}

// source is what the store remembers of one source of batches: the
// sequences it applied, and when it last applied one (unix ms, by the
// store's clock), so that a source gone quiet for
// Options.IdempotencyHorizon is forgotten.
type source struct {
	seqs   dedupe.Seqs
	lastMS int64
}

// appendSource encodes a source record's value.
func appendSource(dst []byte, s *source) []byte {
	dst = binary.AppendVarint(dst, s.lastMS)
	dst = binary.AppendUvarint(dst, s.seqs.High())
	for _, w := range s.seqs.Bits() {
		dst = binary.LittleEndian.AppendUint64(dst, w)
	}
	return dst
}

// decodeSource decodes a source record's value.
func decodeSource(v []byte) (*source, error) {
	d := encoding.NewDecbuf(v, ErrCorrupt)
	lastMS, high := d.Varint("last applied"), d.Uvarint("highest sequence")
	var bits [dedupe.Words]uint64
	for i := range bits {
		bits[i] = d.Uint64("sequence bits")
	}
	return &source{seqs: dedupe.Restore(high, bits), lastMS: lastMS}, d.Done("source record")
}

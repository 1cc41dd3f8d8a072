package tsdb

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/dimsum/dimsum/schema"
)

// Key prefixes: the first byte of every key names its kind. ONLY APPEND TO
// THIS LIST: the values are part of the on-disk format (docs/format/tsdb.md).
// Metadata sorts first so that Open's dictionary scans touch only the head of
// the key space; data, the bulk, comes last.
const (
	prefixMeta   byte = 0x00 // 0x00 | name → value
	prefixFamily byte = 0x01 // 0x01 | family name → family ID | kind | dimensions
	prefixCell   byte = 0x02 // 0x02 | family ID | cuboid | cell ID → cell values
	// 0x03 and 0x04 held version 2's idempotency keys, one pair a batch;
	// Open folds them into source records (0x07) when it upgrades a store.
	prefixIdemTime byte = 0x03 // 0x03 | keyTime | idempotency key → empty
	prefixIdemKey  byte = 0x04 // 0x04 | idempotency key → keyTime
	// 0x05 is unused: early builds of version 2 stored postings there,
	// which Open now builds from the cell dictionary; never reuse it.
	prefixPresence byte = 0x06 // 0x06 | step | row | family ID | cuboid → cell IDs
	prefixSource   byte = 0x07 // 0x07 | source → the batch sequences applied from it
	prefixStaged   byte = 0x08 // 0x08 | sequence → a batch held in the head
	prefixWritten  byte = 0x09 // 0x09 | step | row → the highest staged sequence written in it
	prefixData     byte = 0x10 // 0x10 | step | row | family ID | cuboid | cell ID → row value
)

// formatVersion is the version of the layout described in
// docs/format/tsdb.md. Open writes it into an empty store, upgrades a store
// of version 2 or 3 and refuses any other value, so that a binary never
// misreads a layout it does not know. Version 1 ordered data keys
// cell-major and had no postings or presence; version 2 wrote every batch
// into the rows at once and kept an idempotency key pair a batch; version 3
// had no alias rows.
const formatVersion = 4

// metaFormatKey is the key of the format-version record.
var metaFormatKey = []byte{prefixMeta, 'f', 'o', 'r', 'm', 'a', 't'}

// metaPairKey is the key of the pairing record: the finest resolution's
// step and that of the resolution whose rows hold its steps.
var metaPairKey = []byte{prefixMeta, 'p', 'a', 'i', 'r'}

func appendPair(dst []byte, fine, host uint32) []byte {
	dst = binary.AppendUvarint(dst, uint64(fine))
	return binary.AppendUvarint(dst, uint64(host))
}

func decodePair(v []byte) (fine, host uint32, ok bool) {
	f, n := binary.Uvarint(v)
	if n <= 0 || f > math.MaxUint32 {
		return 0, 0, false
	}
	h, m := binary.Uvarint(v[n:])
	if m <= 0 || n+m != len(v) || h > math.MaxUint32 {
		return 0, 0, false
	}
	return uint32(f), uint32(h), true
}

// Fixed widths of the key fields.
const (
	dataKeyLen     = 1 + 4 + 8 + 2 + 2 + 4
	cellKeyLen     = 1 + 2 + 2 + 4
	presenceKeyLen = 1 + 4 + 8 + 2 + 2
)

// dataKey is a data key held by value, so that Apply can sort thousands of
// them without an allocation each.
type dataKey [dataKeyLen]byte

// flipSign maps an int64 to a uint64 whose big-endian bytes sort in the
// int64's order: negative rows and key times sort before positive ones.
func flipSign(v int64) uint64 { return uint64(v) ^ (1 << 63) }

func unflipSign(u uint64) int64 { return int64(u ^ (1 << 63)) }

// makeDataKey builds the key of one row of one cell at one resolution. The
// order is time-partitioned: (resolution, row, family, cuboid, cell), chosen
// by BenchmarkKeyLayout (docs/format/tsdb.md, "Data rows"). stepSec is the
// resolution's step in seconds rather than its index in the schema, so that
// adding or removing a resolution never makes old rows read as another
// resolution's.
func makeDataKey(stepSec uint32, row int64, fam uint16, cuboid schema.CuboidID, cell uint32) dataKey {
	var k dataKey
	k[0] = prefixData
	binary.BigEndian.PutUint32(k[1:5], stepSec)
	binary.BigEndian.PutUint64(k[5:13], flipSign(row))
	binary.BigEndian.PutUint16(k[13:15], fam)
	binary.BigEndian.PutUint16(k[15:17], uint16(cuboid))
	binary.BigEndian.PutUint32(k[17:21], cell)
	return k
}

// parsedDataKey is a data key split into its fields: the row's, which its
// presence key shares, and the cell.
type parsedDataKey struct {
	presenceKey
	cell uint32
}

// malformedKey is the error of a stored key that does not parse as what
// its range holds, naming it.
func malformedKey(what string, k []byte) error {
	return fmt.Errorf("%w: %s %x is malformed", ErrCorrupt, what, k)
}

// parseDataKey splits a data key; a malformed one is corruption.
func parseDataKey(k []byte) (parsedDataKey, error) {
	if len(k) != dataKeyLen || k[0] != prefixData {
		return parsedDataKey{}, malformedKey("data key", k)
	}
	return parsedDataKey{presenceKey: rowFields(k), cell: binary.BigEndian.Uint32(k[17:21])}, nil
}

// appendRowBound appends the first key of a row of one resolution under
// prefix (prefixData or prefixPresence): every key of that row and later
// rows sorts at or after it, every key of earlier rows before it.
func appendRowBound(dst []byte, prefix byte, stepSec uint32, row int64) []byte {
	dst = append(dst, prefix)
	dst = binary.BigEndian.AppendUint32(dst, stepSec)
	return binary.BigEndian.AppendUint64(dst, flipSign(row))
}

// presenceKey names the presence bitmap of one (resolution, row, family,
// cuboid): the cells that have data in that row.
type presenceKey struct {
	stepSec uint32
	row     int64
	fam     uint16
	cuboid  schema.CuboidID
}

func (p presenceKey) append(dst []byte) []byte {
	dst = appendRowBound(dst, prefixPresence, p.stepSec, p.row)
	dst = binary.BigEndian.AppendUint16(dst, p.fam)
	return binary.BigEndian.AppendUint16(dst, uint16(p.cuboid))
}

// parsePresenceKey splits a presence key; a malformed one is corruption.
func parsePresenceKey(k []byte) (presenceKey, error) {
	if len(k) != presenceKeyLen || k[0] != prefixPresence {
		return presenceKey{}, malformedKey("presence key", k)
	}
	return rowFields(k), nil
}

// presenceOf returns the presence key of the row a data key belongs to.
func presenceOf(k *dataKey) presenceKey { return rowFields(k[:]) }

// rowFields reads the fields a data key and a presence key share, from
// bytes 1 to 17 of either.
func rowFields(k []byte) presenceKey {
	return presenceKey{
		stepSec: binary.BigEndian.Uint32(k[1:5]),
		row:     unflipSign(binary.BigEndian.Uint64(k[5:13])),
		fam:     binary.BigEndian.Uint16(k[13:15]),
		cuboid:  schema.CuboidID(binary.BigEndian.Uint16(k[15:17])),
	}
}

// appendFamilyKey appends the family-dictionary key of a family name.
func appendFamilyKey(dst []byte, name string) []byte {
	dst = append(dst, prefixFamily)
	return append(dst, name...)
}

// appendCellKey appends the cell-dictionary key of one cell. Cell IDs are
// dense per (family, cuboid), so Open reads each dictionary in ID order.
func appendCellKey(dst []byte, fam uint16, cuboid schema.CuboidID, cell uint32) []byte {
	dst = append(dst, prefixCell)
	dst = binary.BigEndian.AppendUint16(dst, fam)
	dst = binary.BigEndian.AppendUint16(dst, uint16(cuboid))
	return binary.BigEndian.AppendUint32(dst, cell)
}

// parseCellKey splits a cell-dictionary key; a malformed one is
// corruption.
func parseCellKey(k []byte) (fam uint16, cuboid schema.CuboidID, cell uint32, err error) {
	if len(k) != cellKeyLen || k[0] != prefixCell {
		return 0, 0, 0, malformedKey("cell dictionary key", k)
	}
	return binary.BigEndian.Uint16(k[1:3]), schema.CuboidID(binary.BigEndian.Uint16(k[3:5])), binary.BigEndian.Uint32(k[5:9]), nil
}

// appendSourceKey appends the key of a source's record.
func appendSourceKey(dst []byte, source string) []byte {
	dst = append(dst, prefixSource)
	return append(dst, source...)
}

// stagedKeyLen is the length of a staged batch's key.
const stagedKeyLen = 1 + 8

// stagedKey is the key of the staged batch of sequence seq. Sequences are
// big-endian, so the staged batches sort in the order they were applied.
func stagedKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte{prefixStaged}, seq)
}

// parseStagedKey reads the sequence of a staged batch's key.
func parseStagedKey(k []byte) (uint64, error) {
	if len(k) != stagedKeyLen || k[0] != prefixStaged {
		return 0, malformedKey("staged batch key", k)
	}
	return binary.BigEndian.Uint64(k[1:]), nil
}

// writtenKey is the key of the written mark of one row of the finest
// resolution: the data key's first 13 bytes under its own prefix.
func writtenKey(stepSec uint32, row int64) []byte {
	return appendRowBound(nil, prefixWritten, stepSec, row)
}

// parseWrittenKey reads a written mark's key.
func parseWrittenKey(k []byte) (stepSec uint32, row int64, err error) {
	if len(k) != 1+4+8 || k[0] != prefixWritten {
		return 0, 0, malformedKey("written mark key", k)
	}
	return binary.BigEndian.Uint32(k[1:5]), unflipSign(binary.BigEndian.Uint64(k[5:13])), nil
}

// appendCellValues appends the encoding of a cell's label values: a uvarint
// count, then each value as a uvarint length and its bytes. The same bytes
// are the cell dictionary's value on disk and its map key in memory.
func appendCellValues(dst []byte, values []string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(values)))
	for _, v := range values {
		dst = binary.AppendUvarint(dst, uint64(len(v)))
		dst = append(dst, v...)
	}
	return dst
}

// decodeCellValues splits an encoding made by appendCellValues. The values
// are substrings of s, so a cell's values share one allocation.
func decodeCellValues(s string) ([]string, error) {
	n, s, err := stringUvarint(s)
	if err != nil {
		return nil, err
	}
	if n > schema.MaxLevels {
		return nil, fmt.Errorf("%d values, at most %d", n, schema.MaxLevels)
	}
	values := make([]string, n)
	for i := range values {
		var l uint64
		l, s, err = stringUvarint(s)
		if err != nil {
			return nil, err
		}
		if l > uint64(len(s)) {
			return nil, errors.New("value overruns the record")
		}
		values[i], s = s[:l], s[l:]
	}
	if len(s) != 0 {
		return nil, fmt.Errorf("%d trailing bytes", len(s))
	}
	return values, nil
}

// stringUvarint reads a uvarint from the head of s.
func stringUvarint(s string) (uint64, string, error) {
	var v uint64
	for i := 0; i < len(s) && i < binary.MaxVarintLen64; i++ {
		b := s[i]
		if i == binary.MaxVarintLen64-1 && b > 1 {
			return 0, s, errors.New("uvarint overflows 64 bits")
		}
		v |= uint64(b&0x7f) << (7 * i)
		if b < 0x80 {
			return v, s[i+1:], nil
		}
	}
	return 0, s, errors.New("truncated uvarint")
}

// appendBitmap appends a set of cell IDs in the portable Roaring format
// (github.com/RoaringBitmap/RoaringFormatSpec), run-optimized. It is the
// value of presence keys.
func appendBitmap(dst []byte, b *roaring.Bitmap) []byte {
	b.RunOptimize()
	w := bytes.NewBuffer(dst)
	// Writing to a bytes.Buffer cannot fail.
	_, _ = b.WriteTo(w)
	return w.Bytes()
}

// decodeBitmap decodes a value made by appendBitmap into a bitmap that owns
// its memory. It refuses trailing bytes, an empty set (never stored: an
// empty presence bitmap is deleted) and any structure
// Roaring's own validation rejects; a panic of the Roaring decoder on
// hostile bytes is reported as an error too.
func decodeBitmap(v []byte) (b *roaring.Bitmap, err error) {
	defer func() {
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("roaring decoder: %v", r)
		}
	}()
	b = roaring.New()
	n, err := b.ReadFrom(bytes.NewReader(v))
	switch {
	case err != nil:
		return nil, err
	case n != int64(len(v)):
		return nil, fmt.Errorf("%d trailing bytes", int64(len(v))-n)
	}
	if err := b.Validate(); err != nil {
		return nil, err
	}
	if b.IsEmpty() {
		return nil, errors.New("empty set")
	}
	return b, nil
}

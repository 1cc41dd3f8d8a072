// Package encoding holds the decoder of dimsum's binary records: the
// aggregator's log records and the store's staged batches, and which sums
// are written as integers there, in rows and in flushes (Whole). Values are
// appended with encoding/binary's Append functions and AppendString; a
// Decbuf reads them back with a sticky error, as Prometheus' tsdb/encoding
// does, so that a decoder checks once, at the end, whether the record was
// whole.
//
//	b := binary.AppendUvarint(nil, 7)
//	b = encoding.AppendString(b, "agg-1")
//	d := encoding.NewDecbuf(b, errBadRecord)
//	n, name := d.Uvarint("count"), d.String("name")
//	if err := d.Done("record"); err != nil { ... }
package encoding

import (
	"encoding/binary"
	"fmt"
	"math"
)

// maxExactUint is 2^53: every integer below it is a float64 exactly.
const maxExactUint = 1 << 53

// Whole reports whether f survives as an unsigned integer, so that it may
// go as a uvarint instead of eight IEEE bytes: a whole number from 0 to
// below 2^53, but negative zero, which would come back as positive zero.
// Counter sums are mostly such numbers.
func Whole(f float64) bool {
	return f >= 0 && f < maxExactUint && f == math.Trunc(f) && !math.Signbit(f)
}

// AppendString appends s as a uvarint length and its bytes.
func AppendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// Decbuf reads a record. The first failure sticks: later reads return zero
// values, and Done reports it.
type Decbuf struct {
	b     []byte
	err   error
	class error // what every error wraps
}

// NewDecbuf reads b; its errors wrap class.
func NewDecbuf(b []byte, class error) Decbuf { return Decbuf{b: b, class: class} }

// Fail records that what could not be read, unless an earlier read failed.
func (d *Decbuf) Fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: cannot read %s", d.class, what)
	}
	d.b = nil
}

// Failf records a failure described by format and args, unless an earlier
// read failed.
func (d *Decbuf) Failf(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{d.class}, args...)...)
	}
	d.b = nil
}

// Err is the first failure, or nil.
func (d *Decbuf) Err() error { return d.err }

// Len is the number of bytes not yet read.
func (d *Decbuf) Len() int { return len(d.b) }

// Uvarint reads an unsigned varint.
func (d *Decbuf) Uvarint(what string) uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.Fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// Varint reads a signed varint.
func (d *Decbuf) Varint(what string) int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.Fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// Count reads a length that must fit in the bytes left, each item taking
// at least min bytes, so that garbage cannot make a huge allocation.
func (d *Decbuf) Count(what string, min int) int {
	n := d.Uvarint(what)
	if n > uint64(len(d.b)/min) {
		d.Fail(what)
		return 0
	}
	return int(n)
}

// Bytes reads what AppendString wrote, as a slice of the record.
func (d *Decbuf) Bytes(what string) []byte {
	n := d.Count(what, 1)
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

// String reads what AppendString wrote.
func (d *Decbuf) String(what string) string { return string(d.Bytes(what)) }

// Uint64 reads 8 bytes, little-endian.
func (d *Decbuf) Uint64(what string) uint64 {
	if len(d.b) < 8 {
		d.Fail(what)
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

// Byte reads one byte.
func (d *Decbuf) Byte(what string) byte {
	if len(d.b) < 1 {
		d.Fail(what)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

// Done reports the first failure, or that bytes were left after the
// record named what.
func (d *Decbuf) Done(what string) error {
	if d.err == nil && len(d.b) > 0 {
		d.err = fmt.Errorf("%w: %d bytes after the %s", d.class, len(d.b), what)
	}
	return d.err
}

package wal

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
)

// Type tells the records of one log apart; its meaning belongs to the
// writer. Type 0 is reserved: a zeroed stretch of a file never reads as a
// record.
type Type uint8

// recordHeader is the size of a record's framing: a 4-byte payload length,
// a 4-byte CRC-32C and the type byte.
const recordHeader = 9

// MaxRecord bounds a record's payload. A length beyond it in a file can only
// be garbage.
const MaxRecord = 1 << 30

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var (
	// errShort means the bytes end inside a record.
	errShort = errors.New("record runs past the end of the file")
	// errChecksum means a record's CRC does not match its bytes.
	errChecksum = errors.New("checksum mismatch")
	// errType means a record has the reserved type 0.
	errType = errors.New("record of type 0")
	// errLength means a record's length is beyond MaxRecord.
	errLength = errors.New("record length beyond the limit")
)

// AppendRecord appends a framed record to dst: the payload length and the
// CRC-32C of the type byte and payload, both little-endian uint32, then the
// type byte and the payload.
func AppendRecord(dst []byte, typ Type, payload []byte) []byte {
	start := len(dst)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(payload)))
	dst = append(dst, 0, 0, 0, 0, byte(typ)) // the CRC, set below
	dst = append(dst, payload...)
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(dst[start+8:], castagnoli))
	return dst
}

// DecodeRecord reads the record at the start of b. It returns the record's
// type, its payload (a sub-slice of b) and its framed size, or an error when
// b ends inside the record or the record is corrupt; n is still the framed
// size when only the checksum or the type is wrong.
func DecodeRecord(b []byte) (typ Type, payload []byte, n int, err error) {
	if len(b) < recordHeader {
		return 0, nil, 0, errShort
	}
	length := binary.LittleEndian.Uint32(b)
	if length > MaxRecord {
		return 0, nil, 0, errLength
	}
	n = recordHeader + int(length)
	if len(b) < n {
		return 0, nil, 0, errShort
	}
	typ = Type(b[8])
	payload = b[recordHeader:n]
	if crc32.Checksum(b[8:n], castagnoli) != binary.LittleEndian.Uint32(b[4:]) {
		return 0, nil, n, errChecksum
	}
	if typ == 0 {
		return 0, nil, n, errType
	}
	return typ, payload, n, nil
}

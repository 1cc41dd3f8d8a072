package tsdb

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/schema"
)

// testSchemaYAML is small enough to enumerate: requests has 3x2 = 6 cuboids,
// errors 2. Its resolutions have short retentions, so that tests can place
// deltas beyond the finer ones.
const testSchemaYAML = `
resolutions: ["1s:10h", "10s:2d", "1m:30d"]
families:
  - name: requests
    dimensions: [dc/host, txn]
  - name: errors
    dimensions: [code]
`

// testNow is the clock of every test DB.
var testNow = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

func testSchema(t testing.TB) *schema.Schema {
	t.Helper()
	s, err := schema.Parse([]byte(testSchemaYAML))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func openTest(t testing.TB, dir string, s *schema.Schema) *DB {
	t.Helper()
	return openTestAt(t, dir, s, func() time.Time { return testNow })
}

// openTestAt opens a test DB with the given clock and no periodic retention
// pass: tests run passes with RunRetention.
func openTestAt(t testing.TB, dir string, s *schema.Schema, now func() time.Time) *DB {
	t.Helper()
	db, err := Open(Options{Dir: dir, Schema: s, NoSync: true, RetentionInterval: -1, now: now})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// cuboidOf returns the ID of the cuboid of family f that keeps exactly the
// given labels.
func cuboidOf(t testing.TB, s *schema.Schema, family string, labels ...string) schema.CuboidID {
	t.Helper()
	for _, c := range s.Family(family).Cuboids() {
		if slices.Equal(c.Labels, labels) {
			return c.ID
		}
	}
	t.Fatalf("family %s has no cuboid %v", family, labels)
	return 0
}

// closeTest closes db and fails the test on error.
func closeTest(t testing.TB, db *DB) {
	t.Helper()
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// slotValue is one decoded slot of a row.
type slotValue struct {
	slot  int
	sum   float64
	count uint64
}

// rowEncoder appends a row value in the entries layout, slot by slot, in
// strictly ascending slot order, as version 2 wrote its merge operands: the
// tests pin that the decoder and the merge operator still read them.
type rowEncoder struct {
	buf  []byte
	prev int
}

func (e *rowEncoder) reset(dst []byte) {
	e.buf = append(dst[:0], rowMagic, slotsEntries)
	e.prev = -1
}

// add appends one entry: a header (the gap since the previous present
// slot, shifted left twice, and the sum's kind), the count and the sum.
func (e *rowEncoder) add(slot int, sum float64, count uint64) {
	gap := uint64(slot-e.prev-1) << 2
	e.prev = slot
	switch {
	case sumIsCount(sum, count):
		e.buf = binary.AppendUvarint(e.buf, gap|entrySumCount)
		e.buf = binary.AppendUvarint(e.buf, count)
	case encoding.Whole(sum):
		e.buf = binary.AppendUvarint(e.buf, gap|entrySumWhole)
		e.buf = binary.AppendUvarint(e.buf, count)
		e.buf = binary.AppendUvarint(e.buf, uint64(sum))
	default:
		e.buf = binary.AppendUvarint(e.buf, gap|entrySumIEEE)
		e.buf = binary.AppendUvarint(e.buf, count)
		e.buf = binary.LittleEndian.AppendUint64(e.buf, math.Float64bits(sum))
	}
}

func encodeRow(slots ...slotValue) []byte {
	var e rowEncoder
	e.reset(nil)
	for _, s := range slots {
		e.add(s.slot, s.sum, s.count)
	}
	return e.buf
}

func decodeRow(b []byte) ([]slotValue, error) {
	var d rowDecoder
	var out []slotValue
	d.init(b)
	for {
		slot, sum, count, ok := d.next()
		if !ok {
			return out, d.err
		}
		out = append(out, slotValue{slot, sum, count})
	}
}

// isCorruptNaming reports whether err is a corruption error that names key
// in hex.
func isCorruptNaming(err error, key []byte) bool {
	return errors.Is(err, ErrCorrupt) && strings.Contains(err.Error(), hex.EncodeToString(key))
}

// denseOf returns the dense row holding slots.
func denseOf(slots []slotValue) *denseRow {
	var d denseRow
	for _, s := range slots {
		d.present[s.slot/64] |= 1 << (s.slot % 64)
		d.sum[s.slot] = s.sum
		d.count[s.slot] = s.count
	}
	return &d
}

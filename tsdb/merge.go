package tsdb

import (
	"io"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// mergerName names the row merge operator. Pebble records it in the OPTIONS
// file and refuses to open a store with a different one, so it must never
// change; a new row encoding gets a new magic byte, not a new name.
const mergerName = "dimsum.row.v1"

// rowMerger is the Pebble merge operator of data rows. Apply writes every
// cell-step as a merge operand (a row in the entries layout holding only the
// new slots), so ingest never reads a row; Pebble folds operands at read
// time and in compactions, and the operator writes what it folded in the
// columnar layout, which is what stays on disk. It reads every layout. Folding is slot-wise addition of sums and counts, which is
// associative and commutative, so operands may be merged in any grouping, with
// or without the oldest one (includesBase), and give the same row. Float sums
// of whole numbers below 2^53 are exact in any order; other sums may differ
// in the last bit between groupings, as float addition does.
// See docs/format/tsdb.md, "Merge operator".
var rowMerger = &pebble.Merger{
	Name: mergerName,
	Merge: func(key, value []byte) (pebble.ValueMerger, error) {
		m := mergerPool.Get().(*valueMerger)
		m.key = append(m.key[:0], key...)
		if folded(value) {
			// Decoded only if another operand comes: a compaction that
			// moves a row already folded keeps its bytes.
			m.buf, m.held = append(m.buf[:0], value...), true
			return m, nil
		}
		if err := addHosted(&m.row, &m.fine, value); err != nil {
			err = corruptRowError(m.key, err)
			m.release()
			return nil, err
		}
		return m, nil
	},
}

// folded reports whether a row value is in a layout Finish writes, which a
// lone operand may keep as it is: a hosted row, or a columnar one (not
// version 2's entries).
func folded(value []byte) bool {
	switch {
	case len(value) > 0 && value[0] == hostedMagic:
		return true
	case len(value) > 1 && value[0] == rowMagic:
		return value[1]&slotsMask != slotsEntries
	}
	return false
}

// mergerPool recycles value mergers with their dense rows and output
// buffers: compactions merge every row they rewrite, and a fresh 5.8 KB
// array for each would dominate their garbage.
var mergerPool = sync.Pool{New: func() any { return new(valueMerger) }}

// valueMerger implements pebble.ValueMerger over a dense row. It is its own
// io.Closer: Finish returns a buffer it owns, and Close hands both back to
// the pool once Pebble is done with the value.
type valueMerger struct {
	key  []byte // the row's key, for error messages
	row  denseRow
	fine *denseFine // a hosted row's fine part, once an operand has one
	buf  []byte
	// held says that buf holds the first operand, not yet decoded.
	held bool
}

func (m *valueMerger) MergeNewer(value []byte) error { return m.merge(value) }

func (m *valueMerger) MergeOlder(value []byte) error { return m.merge(value) }

func (m *valueMerger) merge(value []byte) error {
	if m.held {
		m.held = false
		if err := addHosted(&m.row, &m.fine, m.buf); err != nil {
			return corruptRowError(m.key, err)
		}
	}
	if err := addHosted(&m.row, &m.fine, value); err != nil {
		return corruptRowError(m.key, err)
	}
	return nil
}

// Finish encodes the folded row. The result does not depend on includesBase:
// a row has no tombstone semantics, a partial fold is itself a valid operand.
func (m *valueMerger) Finish(includesBase bool) ([]byte, io.Closer, error) {
	switch {
	case m.held:
		// One operand, in a layout Finish writes: kept as it is.
	case m.fine != nil && m.fine.any:
		m.buf = appendHosted(m.buf[:0], &m.row, m.fine)
	default:
		m.buf = m.row.appendTo(m.buf[:0])
	}
	return m.buf, m, nil
}

// Close returns m to the pool.
func (m *valueMerger) Close() error {
	m.release()
	return nil
}

func (m *valueMerger) release() {
	m.held = false
	m.row.reset()
	releaseFine(m.fine)
	m.fine = nil
	mergerPool.Put(m)
}

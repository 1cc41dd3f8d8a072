package tsdb

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
)

// Delta is one cell-step of a partial cube.
type Delta struct {
	Family string
	Cuboid schema.CuboidID
	Values []string // one per label of the cuboid, in schema.Cuboid.Labels order
	Time   int64    // unix milliseconds, any instant within the finest step
	Sum    float64  // sum of the deltas
	Count  uint64   // number of events
}

// entry is one delta at one resolution, on its way into a row operand.
type entry struct {
	key   dataKey
	slot  uint16
	seq   uint32 // position in the batch, which orders the additions
	sum   float64
	count uint64
}

// Apply merges deltas into every resolution of the schema in one atomic
// Pebble batch (synced unless NoSync), as merge operands: no
// read-modify-write of rows. Deltas whose time is older than a resolution's
// retention (measured from now) are skipped at that resolution.
//
// If idempotencyKey is non-empty and a batch with that key was applied
// before, Apply writes nothing and returns applied=false; otherwise the key is
// recorded in the same batch, so a crash can never separate a batch from its
// key. A key is recognised whatever keyTime comes with it; keyTime (unix ms)
// is the time the key belongs to, and orders the key records so that old keys
// can be forgotten by time.
//
// Unknown family, unknown cuboid, a wrong number of values, a sum that is NaN or infinite, or a negative counter sum is an error
// wrapping ErrBadInput, and nothing is written.
func (db *DB) Apply(idempotencyKey []byte, keyTime int64, deltas []Delta) (applied bool, err error) {
	start := time.Now()
	db.apply.Lock()
	defer db.apply.Unlock()
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return false, ErrClosed
	}
	defer func() {
		if err != nil {
			db.metrics.applyErrors.Inc()
		}
	}()

	// Validate everything first: a batch is applied whole or not at all.
	for i := range deltas {
		if err := db.check(&deltas[i]); err != nil {
			return false, fmt.Errorf("%w: delta %d: %v", ErrBadInput, i, err)
		}
	}

	a := &db.apply
	if len(idempotencyKey) > 0 {
		a.keyBuf = appendIdemKey(a.keyBuf[:0], idempotencyKey)
		_, closer, err := db.pdb.Get(a.keyBuf)
		switch {
		case err == nil:
			closer.Close()
			db.metrics.duplicates.Inc()
			return false, nil
		case !errors.Is(err, pebble.ErrNotFound):
			return false, fmt.Errorf("tsdb: cannot look up idempotency key %x: %w", idempotencyKey, err)
		}
	}

	b := db.pdb.NewBatch()
	defer b.Close()
	defer db.rollbackCells()

	now := db.opts.now().UnixMilli()
	var expired int
	entries := a.entries[:0]
	for i := range deltas {
		d := &deltas[i]
		fs := db.families[d.Family]
		// The cell gets its ID at the first resolution that keeps the
		// delta, so a delta expired everywhere creates no cell.
		var cell uint32
		haveCell := false
		for _, r := range db.res {
			if d.Time < now-r.retentionMs {
				expired++
				continue
			}
			if !haveCell {
				var err error
				if cell, err = db.cellID(b, fs.cuboid(d.Cuboid), d.Values); err != nil {
					return false, err
				}
				haveCell = true
			}
			stepStart := r.StepStart(d.Time)
			row := r.Row(stepStart)
			entries = append(entries, entry{
				key:   makeDataKey(r.stepSec, fs.id, d.Cuboid, cell, row),
				slot:  uint16((stepStart - row*r.rowSpanMs) / r.stepMs),
				seq:   uint32(len(entries)),
				sum:   d.Sum,
				count: d.Count,
			})
		}
	}
	a.entries = entries

	// Fold the batch's cell-steps into one operand per row: a coarse row
	// receives many fine steps of one batch, and fewer operands mean less
	// for reads and compactions to fold. Ties are broken by position so
	// that sums are added in delta order, which keeps Apply deterministic
	// (an unstable sort with a total order is faster than a stable one).
	slices.SortFunc(entries, func(x, y entry) int {
		if c := bytes.Compare(x.key[:], y.key[:]); c != 0 {
			return c
		}
		if x.slot != y.slot {
			return int(x.slot) - int(y.slot)
		}
		return int(x.seq) - int(y.seq)
	})
	var enc rowEncoder
	operands := 0
	for i := 0; i < len(entries); {
		key := &entries[i].key
		enc.reset(a.rowBuf)
		for i < len(entries) && entries[i].key == *key {
			slot, sum, count := entries[i].slot, entries[i].sum, entries[i].count
			for i++; i < len(entries) && entries[i].key == *key && entries[i].slot == slot; i++ {
				sum += entries[i].sum
				count += entries[i].count
			}
			enc.add(int(slot), sum, count)
		}
		a.rowBuf = enc.buf
		if err := b.Merge(key[:], enc.buf, nil); err != nil {
			return false, fmt.Errorf("tsdb: cannot add row to batch: %w", err)
		}
		operands++
	}

	if len(idempotencyKey) > 0 {
		a.keyBuf = appendIdemTimeKey(a.keyBuf[:0], keyTime, idempotencyKey)
		if err := b.Set(a.keyBuf, nil, nil); err != nil {
			return false, fmt.Errorf("tsdb: cannot add idempotency key to batch: %w", err)
		}
		a.keyBuf = appendIdemKey(a.keyBuf[:0], idempotencyKey)
		var t [8]byte
		binary.BigEndian.PutUint64(t[:], flipSign(keyTime))
		if err := b.Set(a.keyBuf, t[:], nil); err != nil {
			return false, fmt.Errorf("tsdb: cannot add idempotency key to batch: %w", err)
		}
	}

	sync := pebble.Sync
	if db.opts.NoSync {
		sync = pebble.NoSync
	}
	if err := b.Commit(sync); err != nil {
		return false, fmt.Errorf("tsdb: cannot commit batch: %w", err)
	}
	created := db.publishCells()

	db.metrics.applies.Inc()
	db.metrics.deltas.Add(float64(len(entries)))
	db.metrics.expired.Add(float64(expired))
	db.metrics.operands.Add(float64(operands))
	db.metrics.cellsCreated.Add(float64(created))
	db.metrics.cells.Add(float64(created))
	db.metrics.applyDurations.Observe(time.Since(start).Seconds())
	return true, nil
}

// check validates one delta against the schema.
func (db *DB) check(d *Delta) error {
	fs := db.families[d.Family]
	if fs == nil {
		return fmt.Errorf("unknown family %q", d.Family)
	}
	dict := fs.cuboid(d.Cuboid)
	if dict == nil {
		return fmt.Errorf("family %q has no cuboid %d", d.Family, d.Cuboid)
	}
	if len(d.Values) != len(dict.labels) {
		return fmt.Errorf("family %q cuboid %d: %d values for labels %q", d.Family, d.Cuboid, len(d.Values), dict.labels)
	}
	// A NaN or infinity would poison every later sum of its step for good.
	if math.IsNaN(d.Sum) || math.IsInf(d.Sum, 0) {
		return fmt.Errorf("family %q: sum %v is not finite", d.Family, d.Sum)
	}
	if fs.fam.Kind == schema.KindCounter && d.Sum < 0 {
		return fmt.Errorf("counter family %q: sum %v is negative", d.Family, d.Sum)
	}
	return nil
}

// cellID returns the ID of a cell, assigning the next one and adding its
// dictionary entry to b when the cell is new. New cells stay invisible to
// readers until publishCells.
func (db *DB) cellID(b *pebble.Batch, d *cellDict, values []string) (uint32, error) {
	a := &db.apply
	a.cellBuf = appendCellValues(a.cellBuf[:0], values)
	if id, ok := d.ids[string(a.cellBuf)]; ok {
		return id, nil
	}
	if len(d.keys) >= math.MaxUint32 {
		return 0, fmt.Errorf("tsdb: family ID %d cuboid %d: no cell ID left", d.fam, d.cuboid)
	}
	id := uint32(len(d.keys))
	key := string(a.cellBuf)
	split, err := decodeCellValues(key)
	if err != nil {
		return 0, fmt.Errorf("tsdb: cannot split cell values: %w", err) // cannot happen: we just encoded them
	}
	a.keyBuf = appendCellKey(a.keyBuf[:0], d.fam, d.cuboid, id)
	if err := b.Set(a.keyBuf, a.cellBuf, nil); err != nil {
		return 0, fmt.Errorf("tsdb: cannot add cell to batch: %w", err)
	}
	if len(d.keys) == d.visible {
		a.touched = append(a.touched, d)
	}
	d.ids[key] = id
	d.mu.Lock()
	d.keys = append(d.keys, key)
	d.values = append(d.values, split)
	d.mu.Unlock()
	return id, nil
}

// publishCells makes the cells of the committed batch visible to readers and
// returns how many there were.
func (db *DB) publishCells() int {
	n := 0
	for _, d := range db.apply.touched {
		d.mu.Lock()
		n += len(d.keys) - d.visible
		d.visible = len(d.keys)
		d.mu.Unlock()
	}
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
	return n
}

// rollbackCells forgets the cells assigned by an Apply whose batch was not
// committed, so that their IDs are assigned again, to whatever cell comes
// next. After publishCells it has nothing to do.
func (db *DB) rollbackCells() {
	for _, d := range db.apply.touched {
		for _, k := range d.keys[d.visible:] {
			delete(d.ids, k)
		}
		d.mu.Lock()
		clear(d.keys[d.visible:])
		clear(d.values[d.visible:])
		d.keys = d.keys[:d.visible]
		d.values = d.values[:d.visible]
		d.mu.Unlock()
	}
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
}

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

// cell returns the cell ID of e's key.
func (e *entry) cell() uint32 { return binary.BigEndian.Uint32(e.key[dataKeyLen-4:]) }

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
	defer db.rollback()

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
				dict := fs.cuboid(d.Cuboid)
				a.cellBuf = appendCellValues(a.cellBuf[:0], d.Values)
				if cell, err = dict.assign(b, a.cellBuf, &a.keyBuf); err != nil {
					return false, err
				}
				if dict.dirty() && !slices.Contains(a.touched, dict) {
					a.touched = append(a.touched, dict)
				}
				haveCell = true
			}
			stepStart := r.StepStart(d.Time)
			row := r.Row(stepStart)
			entries = append(entries, entry{
				key:   makeDataKey(r.stepSec, row, fs.id, d.Cuboid, cell),
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

	if err := db.stagePresence(b, entries); err != nil {
		return false, err
	}
	for _, d := range a.touched {
		d.stage()
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

	if err := b.Commit(db.syncMode()); err != nil {
		return false, fmt.Errorf("tsdb: cannot commit batch: %w", err)
	}
	created, _ := db.publish()

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

// publish makes the changes of the committed batch visible to readers and
// returns how many cells it added and removed.
func (db *DB) publish() (added, removed int) {
	for _, d := range db.apply.touched {
		a, r := d.publish()
		added += a
		removed += r
	}
	db.presence.publish()
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
	return added, removed
}

// rollback forgets the changes of a batch that was not committed. After
// publish it has nothing to do.
func (db *DB) rollback() {
	for _, d := range db.apply.touched {
		d.rollback()
	}
	clear(db.presence.staged)
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
}

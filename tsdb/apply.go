package tsdb

import (
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/dimsum/dimsum/internal/dedupe"
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

// BatchID identifies a batch for Apply: the source that sends it and its
// number among that source's batches. A source numbers its batches in the
// order it sends them to this store, and retries a batch under the same
// number; the store remembers the last dedupe.Window numbers of each
// source, so a retry is applied once. The zero BatchID has no identity:
// the batch is always applied.
type BatchID struct {
	Source string
	Seq    uint64
}

// Apply adds deltas to the store. It logs them in one atomic Pebble batch
// (synced unless NoSync), a staged batch of the head, and then adds them to
// the head's open rows of the finest resolution, where reads see them at
// once. It writes no row: the writer writes each row once its span has
// closed, into every resolution, and rolls the coarser ones up from it
// then (docs/format/tsdb.md, "The head"). Deltas older than the longest
// retention (measured from now) are skipped; the others are written, when
// their row is, at every resolution that still retains that row.
//
// If id has a source and a batch with the same id was applied before,
// Apply writes nothing and returns applied=false; otherwise the id is
// recorded in the same Pebble batch as the deltas, so a crash can never
// separate them.
//
// Apply waits while the head holds more than Options.HeadMaxBytes, until
// the writer has written enough of it: memory is bounded by configuration,
// and a caller that sends faster than the store can write is slowed down
// to its pace. If the writer cannot write (a failing disk), Apply returns
// the writer's error instead of waiting.
//
// Unknown family, unknown cuboid, a wrong number of values, a time within
// two row spans of the largest int64, a sum that is NaN or infinite, or a
// negative counter sum is an error wrapping ErrBadInput, and nothing is
// written.
func (db *DB) Apply(id BatchID, deltas []Delta) (applied bool, err error) {
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
	var src source
	if id.Source != "" {
		if s := db.sources[id.Source]; s != nil {
			src = *s
		}
		switch src.seqs.Mark(id.Seq) {
		case dedupe.Repeat:
			db.metrics.duplicates.Inc()
			return false, nil
		case dedupe.Forgotten:
			db.metrics.beyondDedupe.Inc()
			db.log.Warn("batch far behind the newest of its source: applying it, though it may be a retry", "source", id.Source, "seq", id.Seq, "newest", src.seqs.High())
		}
	}
	if err := db.waitForRoom(); err != nil {
		return false, err
	}

	b := db.pdb.NewBatch()
	defer b.Close()
	defer db.rollback()

	now := db.opts.now()
	oldest := now.UnixMilli() - db.maxRetentionMs
	expired := 0
	entries := a.entries[:0]
	for i := range deltas {
		d := &deltas[i]
		if d.Time < oldest {
			expired++
			continue
		}
		fs := db.families[d.Family]
		dict := fs.cuboid(d.Cuboid)
		a.cellBuf = appendCellValues(a.cellBuf[:0], d.Values)
		cell, err := dict.assign(b, a.cellBuf, &a.keyBuf)
		if err != nil {
			return false, err
		}
		if dict.dirty() && !slices.Contains(a.touched, dict) {
			a.touched = append(a.touched, dict)
		}
		entries = append(entries, headEntry{fi: uint16(fs.idx), cuboid: d.Cuboid, cell: cell, time: d.Time, sum: d.Sum, count: d.Count})
	}
	a.entries = entries
	a.grouped = db.groupByCuboid(a.grouped[:0], entries)
	for _, d := range a.touched {
		d.stage()
	}

	h := db.head
	h.mu.Lock()
	seq := h.nextSeq
	h.nextSeq++
	h.inflight = seq + 1
	h.mu.Unlock()
	a.rowBuf = appendStaged(a.rowBuf[:0], a.grouped, func(fi uint16) uint16 { return db.fams[fi].id })
	if err := b.Set(stagedKey(seq), a.rowBuf, nil); err != nil {
		return false, db.abandon(fmt.Errorf("tsdb: cannot add the staged batch to the Pebble batch: %w", err))
	}
	if id.Source != "" {
		src.lastMS = now.UnixMilli()
		a.keyBuf = appendSourceKey(a.keyBuf[:0], id.Source)
		if err := b.Set(a.keyBuf, appendSource(nil, &src), nil); err != nil {
			return false, db.abandon(fmt.Errorf("tsdb: cannot add the source record to the Pebble batch: %w", err))
		}
	}
	if err := b.Commit(db.syncMode()); err != nil {
		return false, db.abandon(fmt.Errorf("tsdb: cannot commit batch: %w", err))
	}
	// The data first, then the new cells: a reader finds a cell only once
	// it has data.
	h.mu.Lock()
	h.add(db, seq, a.grouped, now)
	h.inflight = 0
	heldBytes := h.bytes
	h.mu.Unlock()
	created, _ := db.publish()
	if id.Source != "" {
		db.sources[id.Source] = &src
	}
	db.wakeWriter()

	db.metrics.applies.Inc()
	db.metrics.deltas.Add(float64(len(entries)))
	db.metrics.expired.Add(float64(expired))
	db.metrics.cellsCreated.Add(float64(created))
	db.metrics.cells.Add(float64(created))
	db.metrics.headBytes.Set(float64(heldBytes))
	db.metrics.stagedBytes.Add(float64(len(a.rowBuf)))
	db.writer.staged.Add(int64(len(a.rowBuf)))
	db.writer.lastApply.Store(now.UnixMilli())
	db.metrics.applyDurations.Observe(time.Since(start).Seconds())
	return true, nil
}

// abandon forgets the staged sequence of an Apply that did not commit, and
// returns err.
func (db *DB) abandon(err error) error {
	db.head.mu.Lock()
	db.head.inflight = 0
	db.head.mu.Unlock()
	return err
}

// groupByCuboid appends entries to dst grouped by family and cuboid, in
// schema order, keeping their order within each: a counting sort, so that
// a staged batch lists each cuboid once and its cells in delta order.
func (db *DB) groupByCuboid(dst, entries []headEntry) []headEntry {
	counts := db.apply.counts
	clear(counts)
	for i := range entries {
		counts[db.cuboidBase[entries[i].fi]+int(entries[i].cuboid)]++
	}
	pos := 0
	for i, n := range counts {
		counts[i] = pos
		pos += n
	}
	dst = slices.Grow(dst, len(entries))[:len(entries)]
	for _, e := range entries {
		k := db.cuboidBase[e.fi] + int(e.cuboid)
		dst[counts[k]] = e
		counts[k]++
	}
	return dst
}

// waitForRoom waits while the head holds more than Options.HeadMaxBytes,
// waking the writer. It returns the writer's error if it failed since, and
// ErrClosed if the store begins to close.
func (db *DB) waitForRoom() error {
	h := db.head
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.bytes <= db.opts.HeadMaxBytes {
		return nil
	}
	start := time.Now()
	db.metrics.applyWaits.Inc()
	defer func() { db.metrics.applyWaitSeconds.Add(time.Since(start).Seconds()) }()
	h.writeErr = nil
	for h.bytes > db.opts.HeadMaxBytes {
		switch {
		case h.stopping:
			return ErrClosed
		case h.writeErr != nil:
			return fmt.Errorf("tsdb: the head is full and cannot be written: %w", h.writeErr)
		}
		db.wakeWriter()
		h.cond.Wait()
	}
	return nil
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
	if d.Time > db.latestMs {
		return fmt.Errorf("family %q: time %d is past the latest a row can hold, %d", d.Family, d.Time, db.latestMs)
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

// publish makes the dictionary changes of the committed batch visible to
// readers and returns how many cells it added and removed.
func (db *DB) publish() (added, removed int) {
	for _, d := range db.apply.touched {
		a, r := d.publish()
		added += a
		removed += r
	}
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
	return added, removed
}

// rollback forgets the dictionary changes of a batch that was not
// committed. After publish it has nothing to do.
func (db *DB) rollback() {
	for _, d := range db.apply.touched {
		d.rollback()
	}
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
}

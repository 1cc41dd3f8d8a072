package tsdb

import (
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
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

// DictDelta is a Delta whose strings are indexes into the dictionary of
// its batch (ApplyDict): the form a combiner's flush arrives in, so that
// the store resolves each distinct string of a batch once rather than once
// a cell.
type DictDelta struct {
	Family uint32 // the index of the family's name
	Cuboid schema.CuboidID
	Values []uint32 // the indexes of the values, one per label of the cuboid, in schema.Cuboid.Labels order
	Time   int64    // unix milliseconds, any instant within the finest step
	Sum    float64  // sum of the deltas
	Count  uint64   // number of events
	// Number is the cell's number in the batch's numbering
	// (BatchID.Numbering) plus one, or 0. The store remembers where a
	// numbered cell is, and finds it by its number the next time, checking
	// that its values hash alike.
	Number uint32
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
	// Numbering, when not 0, names the numbering of the batch's cells
	// (DictDelta.Number) among the source's: a number names the same cell
	// in every batch of one source and numbering.
	Numbering uint64
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
	// The deltas' strings as a dictionary: a family's name once a run of
	// deltas, and a value once a run of deltas that hold it in the same
	// place (a batch of a cuboid's cells in order repeats their leading
	// values). ApplyDict looks each string of the dictionary up in the
	// store's interned values once.
	a := &db.apply
	n := len(deltas)
	for i := range deltas {
		n += len(deltas[i].Values)
	}
	if uint64(n) > math.MaxUint32 {
		return false, fmt.Errorf("%w: %d strings in one batch, at most %d", ErrBadInput, n, uint32(math.MaxUint32))
	}
	dict := slices.Grow(a.strs[:0], n)
	idx := slices.Grow(a.idx[:0], n)
	dds := slices.Grow(a.dds[:0], len(deltas))
	defer func() {
		clear(dict) // keep none of the caller's strings
		a.strs, a.idx, a.dds = dict[:0], idx[:0], dds[:0]
	}()
	var (
		fam  uint32
		prev []string // the previous delta's values, their indexes prevIdx
	)
	prevIdx := idx
	for i := range deltas {
		d := &deltas[i]
		if i == 0 || d.Family != deltas[i-1].Family {
			fam = uint32(len(dict))
			dict = append(dict, d.Family)
		}
		first := len(idx)
		for j, v := range d.Values {
			if j < len(prev) && v == prev[j] {
				idx = append(idx, prevIdx[j])
				continue
			}
			idx = append(idx, uint32(len(dict)))
			dict = append(dict, v)
		}
		prev, prevIdx = d.Values, idx[first:]
		dds = append(dds, DictDelta{Family: fam, Cuboid: d.Cuboid, Values: idx[first:len(idx):len(idx)], Time: d.Time, Sum: d.Sum, Count: d.Count})
	}
	return db.applyDict(start, id, dict, dds, true)
}

// ApplyDict is Apply of deltas whose family names and values are indexes
// into dict. An index outside dict is an error wrapping ErrBadInput too.
func (db *DB) ApplyDict(id BatchID, dict []string, deltas []DictDelta) (applied bool, err error) {
	start := time.Now()
	db.apply.Lock()
	defer db.apply.Unlock()
	return db.applyDict(start, id, dict, deltas, true)
}

// ApplyDictUnsynced is ApplyDict, but returns before its Pebble batch is
// on disk: the batch is durable once a later Sync returns, once the writer
// has written a row the batch feeds (it syncs first), or once the store
// closed. Until then a crash may lose it, its source record included, so
// that a retry applies it again. It is for a caller in the same process
// that keeps what it applied, in a log of its own, until Sync returns: an
// aggregator flushing to its node's combiner, which then shares one fsync
// among many flushes instead of waiting for one a flush.
func (db *DB) ApplyDictUnsynced(id BatchID, dict []string, deltas []DictDelta) (applied bool, err error) {
	start := time.Now()
	db.apply.Lock()
	defer db.apply.Unlock()
	return db.applyDict(start, id, dict, deltas, false)
}

// Sync makes every batch applied before it durable: those of
// ApplyDictUnsynced (the others are already).
func (db *DB) Sync() error {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return ErrClosed
	}
	return db.syncLog()
}

// syncLog syncs Pebble's log if a batch went in unsynced since the last
// sync. It writes a record of no data, synced: the log is written in
// order, so its sync covers every batch committed before it.
func (db *DB) syncLog() error {
	db.syncMu.Lock()
	defer db.syncMu.Unlock()
	if !db.unsynced.Swap(false) {
		return nil
	}
	if err := db.pdb.LogData(nil, pebble.Sync); err != nil {
		db.unsynced.Store(true)
		return fmt.Errorf("tsdb: cannot sync the log: %w", err)
	}
	return nil
}

// applyDict is ApplyDict under DB.apply, from start on; unless sync, it
// does not wait for its batch to be on disk.
func (db *DB) applyDict(start time.Time, id BatchID, dict []string, deltas []DictDelta, sync bool) (applied bool, err error) {
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

	a := &db.apply
	a.run = familyRun{}
	a.nums = slices.Grow(a.nums[:0], len(dict))[:len(dict)]
	clear(a.nums)
	defer func() {
		clear(a.cellValues)
		a.cellValues = a.cellValues[:0]
	}()

	// Validate everything first: a batch is applied whole or not at all.
	for i := range deltas {
		if err := db.check(dict, &deltas[i]); err != nil {
			return false, fmt.Errorf("%w: delta %d: %v", ErrBadInput, i, err)
		}
	}

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
	numbers := a.numbered.of(id)
	for i := range deltas {
		d := &deltas[i]
		if d.Time < oldest {
			expired++
			continue
		}
		fs := db.family(dict, d.Family)
		cd := fs.cuboids[d.Cuboid]
		cell, err := db.cellID(b, cd, dict, d, numbers)
		if err != nil {
			return false, err
		}
		if cd.dirty() && !slices.Contains(a.touched, cd) {
			a.touched = append(a.touched, cd)
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
	mode := db.syncMode()
	if !sync {
		mode = pebble.NoSync
	}
	if err := b.Commit(mode); err != nil {
		return false, db.abandon(fmt.Errorf("tsdb: cannot commit batch: %w", err))
	}
	if !sync {
		db.unsynced.Store(true)
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

// familyRun is the family of the last delta Apply looked up: deltas come
// in runs of one family, so a batch looks a family's name up once a run.
type familyRun struct {
	set bool
	idx uint32 // the index of its name in the batch's dictionary
	fs  *familyState
}

// family returns the family named dict[i], nil if the schema has none.
func (db *DB) family(dict []string, i uint32) *familyState {
	r := &db.apply.run
	if !r.set || r.idx != i {
		*r = familyRun{set: true, idx: i, fs: db.families[dict[i]]}
	}
	return r.fs
}

// check validates one delta against the schema and its batch's dictionary.
func (db *DB) check(dict []string, d *DictDelta) error {
	if int(d.Family) >= len(dict) {
		return fmt.Errorf("family index %d outside the dictionary of %d strings", d.Family, len(dict))
	}
	fs := db.family(dict, d.Family)
	if fs == nil {
		return fmt.Errorf("unknown family %q", dict[d.Family])
	}
	name := fs.fam.Name
	cd := fs.cuboid(d.Cuboid)
	if cd == nil {
		return fmt.Errorf("family %q has no cuboid %d", name, d.Cuboid)
	}
	if len(d.Values) != len(cd.labels) {
		return fmt.Errorf("family %q cuboid %d: %d values for labels %q", name, d.Cuboid, len(d.Values), cd.labels)
	}
	for _, v := range d.Values {
		if int(v) >= len(dict) {
			return fmt.Errorf("family %q cuboid %d: value index %d outside the dictionary of %d strings", name, d.Cuboid, v, len(dict))
		}
	}
	if d.Time > db.latestMs {
		return fmt.Errorf("family %q: time %d is past the latest a row can hold, %d", name, d.Time, db.latestMs)
	}
	// A NaN or infinity would poison every later sum of its step for good.
	if math.IsNaN(d.Sum) || math.IsInf(d.Sum, 0) {
		return fmt.Errorf("family %q: sum %v is not finite", name, d.Sum)
	}
	if fs.fam.Kind == schema.KindCounter && d.Sum < 0 {
		return fmt.Errorf("counter family %q: sum %v is negative", name, d.Sum)
	}
	return nil
}

// cellID returns the ID of a checked delta's cell in cd, the delta's
// cuboid, assigning one and adding its dictionary entry to b when the cell
// is new. Each string of the batch's dictionary is looked up in the
// store's interned values once (DB.apply.nums); a cell is then a lookup of
// its value numbers.
// A numbered delta's cell is looked for first among the cells of its source's
// numbering (numbered.go); one found in the cuboid's index is remembered.
func (db *DB) cellID(b *pebble.Batch, cd *cellDict, dict []string, d *DictDelta, numbers *numbering) (uint32, error) {
	a := &db.apply
	var key cellKey
	for i, v := range d.Values {
		n := a.nums[v]
		if n == 0 {
			num, ok := db.values.lookup(dict[v])
			if !ok {
				return db.newCell(b, cd, dict, d) // no cell holds the value
			}
			n = num + 1
			a.nums[v] = n
		}
		key[i] = n - 1
	}
	var check uint64
	if numbers != nil && d.Number != 0 {
		check = a.numbered.check(cd, &key)
		if id, ok := numbers.get(d.Number-1, check); ok {
			return id, nil
		}
	}
	if id, ok := cd.ids.get(&key); ok {
		if numbers != nil && d.Number != 0 {
			a.numbered.put(numbers, d.Number-1, check, id)
		}
		return id, nil
	}
	return db.newCell(b, cd, dict, d)
}

// newCell adds d's cell to cd.
func (db *DB) newCell(b *pebble.Batch, cd *cellDict, dict []string, d *DictDelta) (uint32, error) {
	a := &db.apply
	a.cellValues = a.cellValues[:0]
	for _, v := range d.Values {
		a.cellValues = append(a.cellValues, dict[v])
	}
	id, key, err := cd.add(b, a.cellValues, &a.keyBuf, &a.cellBuf)
	if err != nil {
		return 0, err
	}
	for i, v := range d.Values {
		a.nums[v] = key[i] + 1
	}
	return id, nil
}

// publish makes the dictionary changes of the committed batch visible to
// readers and returns how many cells it added and removed.
func (db *DB) publish() (added, removed int) {
	for _, d := range db.apply.touched {
		a, r := d.publish()
		added += a
		removed += r
	}
	if removed > 0 {
		// Their IDs are free, to name other cells.
		db.apply.numbered.forget()
	}
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
	return added, removed
}

// rollback forgets the dictionary changes of a batch that was not
// committed. After publish it has nothing to do.
func (db *DB) rollback() {
	for _, d := range db.apply.touched {
		if len(d.added) > 0 {
			// A cell the batch added may be remembered by its number,
			// under an ID now free.
			db.apply.numbered.forget()
		}
		d.rollback()
	}
	clear(db.apply.touched)
	db.apply.touched = db.apply.touched[:0]
}

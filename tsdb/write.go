package tsdb

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cockroachdb/pebble/v2"

	"github.com/dimsum/dimsum/schema"
)

// The writer writes the head's groups into Pebble (docs/format/tsdb.md,
// "The head"): a group is due once its row of the finest resolution ended
// more than Options.HeadHold before the newest delta applied (or the wall
// clock when it was applied, if earlier), or before the wall clock when no
// delta came for HeadHold; and, while the head holds more than three
// quarters of Options.HeadMaxBytes, the oldest group is due whatever its
// row. Writing a group is a set of sstables ingested at once (table.go): a
// merge operand for each of its cells at every resolution that still
// retains its row, the coarser ones rolled up from the finest, the presence
// bitmaps that gain cells and the written mark of its row; then, in a
// Pebble batch, the deletion of the staged batches no group needs any more.

// writerInterval is how often the writer looks for due groups when no Apply
// wakes it: groups fall due by the wall clock too.
const writerInterval = time.Second

// writeReason says why a group was written, for the metrics.
type writeReason int

const (
	writeClosed writeReason = iota // its row's span ended
	writeMemory                    // the head held too much
	writeFlush                     // Flush or Close
	writeRetry                     // an earlier write of it failed
)

var writeReasons = []string{"closed", "memory", "flush", "retry"}

func (db *DB) startWriter() {
	w := &db.writer
	w.wake = make(chan struct{}, 1)
	w.stop = make(chan struct{})
	w.done = make(chan struct{})
	go func() {
		defer close(w.done)
		t := time.NewTicker(writerInterval)
		defer t.Stop()
		failing := false
		for {
			select {
			case <-w.stop:
				return
			case <-w.wake:
			case <-t.C:
			}
			err := db.writeDue(false)
			if err == nil {
				db.compactStaged()
			}
			switch {
			case err != nil && !failing:
				db.log.Error("cannot write the head's rows; they stay in memory and in the staged batches, and Apply waits once the head is full", "err", err)
			case err == nil && failing:
				db.log.Info("writing the head's rows again")
			}
			failing = err != nil
		}
	}()
}

// Staged batches may reach Pebble's files before the writer deletes them (a
// live stream's hour outlasts a memtable), and what
// a range deletion covers leaves the files only when a compaction rewrites
// them, which an idle store never starts: a store stopped after the sparse
// backfill of docs/benchmarks.md still held 10 MB of staged batches it had
// deleted. So once the store has been idle for stagedCompactIdle after
// stagedCompactBytes of staged batches, the writer compacts their key
// range.
const (
	stagedCompactIdle  = 3 * time.Second
	stagedCompactBytes = 4 << 20
)

// compactStaged compacts the key range of the deleted staged batches when
// it is due (above).
func (db *DB) compactStaged() {
	w := &db.writer
	if w.staged.Load() < stagedCompactBytes || db.opts.now().UnixMilli()-w.lastApply.Load() < stagedCompactIdle.Milliseconds() {
		return
	}
	h := db.head
	h.mu.Lock()
	low := h.stagedLow
	h.mu.Unlock()
	if low == 0 {
		return
	}
	w.staged.Store(0)
	if err := db.pdb.Compact(context.Background(), stagedKey(0), stagedKey(low), false); err != nil {
		db.log.Warn("cannot compact the deleted staged batches; they stay on disk until Pebble compacts them", "err", err)
	}
}

func (db *DB) stopWriter() {
	close(db.writer.stop)
	<-db.writer.done
}

// wakeWriter asks the writer to look for due groups now.
func (db *DB) wakeWriter() {
	select {
	case db.writer.wake <- struct{}{}:
	default:
	}
}

// Flush writes every group of the head now, whether its row is closed or
// not: the rows get what the head held as merge operands, and the staged
// batches are deleted. Close does it; tests call it to look at what is on
// disk.
func (db *DB) Flush() error {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return ErrClosed
	}
	return db.writeDue(true)
}

// writeDue writes the due groups, oldest first, every group when all is set.
func (db *DB) writeDue(all bool) error {
	db.write.Lock()
	defer db.write.Unlock()
	for {
		g, why := db.takeDue(all)
		if g == nil {
			return nil
		}
		if err := db.writeGroup(g, why); err != nil {
			db.metrics.writeErrors.Inc()
			h := db.head
			h.mu.Lock()
			h.writeErr = err
			h.cond.Broadcast()
			h.mu.Unlock()
			return err
		}
	}
}

// takeDue moves the next group to write from the open ones to the closing
// ones and returns it, or nil when none is due. A group whose write failed
// is retried first.
func (db *DB) takeDue(all bool) (*group, writeReason) {
	h := db.head
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.closing) > 0 {
		return h.closing[0], writeRetry
	}
	r := db.res[0]
	hold := db.opts.HeadHold.Milliseconds()
	now := db.opts.now()
	var due, oldest *group
	for _, g := range h.open {
		end := (g.row + 1) * r.rowSpanMs
		closed := end+hold <= h.clock || end+hold <= now.UnixMilli() && now.Sub(g.last) >= db.opts.HeadHold
		if (all || closed) && (due == nil || g.row < due.row) {
			due = g
		}
		if oldest == nil || g.row < oldest.row {
			oldest = g
		}
	}
	why := writeClosed
	switch {
	case all:
		why = writeFlush
	case due == nil && oldest != nil && h.bytes > db.opts.HeadMaxBytes/4*3:
		due, why = oldest, writeMemory
	}
	if due == nil {
		return nil, 0
	}
	delete(h.open, due.row)
	h.closing = append(h.closing, due)
	return due, why
}

// writeGroup writes one closing group. On failure the group stays closing,
// for the next attempt, and nothing of it is in Pebble.
func (db *DB) writeGroup(g *group, why writeReason) error {
	start := time.Now()
	b := &db.writer.table
	b.reset()
	defer clear(db.presence.staged)
	defer clear(db.aliases.staged)
	operands, err := db.encodeGroup(b, g)
	if err != nil {
		return err
	}

	h := db.head
	h.mu.Lock()
	low, deleted := h.lowest(g), h.stagedLow
	// The mark says which staged batches not to replay into this row: it
	// is needed while one of them may still be stored. The staged batches
	// below deleted went in a deletion that the sync before this group's
	// tables makes durable.
	marks := map[int64]uint64{}
	for row, seq := range h.written {
		if seq >= deleted {
			marks[row] = seq
		}
	}
	if g.maxSeq >= deleted {
		marks[g.row] = max(marks[g.row], g.maxSeq)
	}
	step := db.res[0].stepSec
	for row := range h.written {
		if _, keep := marks[row]; !keep {
			b.Delete(writtenKey(step, row))
		}
	}
	if seq, ok := marks[g.row]; ok {
		b.Set(writtenKey(step, g.row), binary.AppendUvarint(nil, seq))
	}
	g.committing = true
	h.mu.Unlock()

	// The rows, presence and marks go in at once: a crash before the
	// tables are ingested leaves the staged batches, and replay rebuilds
	// the group. The rows may hold the deltas of batches applied
	// unsynced: those batches go to disk first, with their cells'
	// dictionary entries and their source records, so that a crash cannot
	// leave rows naming unknown cells, or a source that would send their
	// deltas again.
	if !b.empty() {
		err = db.syncLog()
		if err == nil {
			err = db.ingest(b)
		}
	}
	// The staged batches no remaining group needs go after the rows, in
	// a batch of their own: in the memtable, where most of them still
	// are, so that Pebble's flush drops them rather than write them out
	// (and no ingested table spans the memtable's keys, which would make
	// Pebble flush it first). It need not be synced: a crash that loses
	// it leaves batches that replay skips by their marks, which stay
	// until the next group's sync.
	// The group is written whether or not the deletion fails: the next
	// group deletes them.
	var delErr error
	if err == nil && low > deleted {
		if delErr = db.pdb.DeleteRange(stagedKey(deleted), stagedKey(low), pebble.NoSync); delErr == nil {
			db.unsynced.Store(true)
		} else {
			db.log.Warn("cannot delete the written staged batches; the next group's write tries again", "err", delErr)
		}
	}

	h.mu.Lock()
	g.committing = false
	if err == nil {
		for i, c := range h.closing {
			if c == g {
				h.closing = append(h.closing[:i], h.closing[i+1:]...)
				break
			}
		}
		h.bytes -= g.bytes
		h.written = marks
		if delErr == nil {
			h.stagedLow = max(h.stagedLow, low)
		}
		h.writeErr = nil
	}
	held := h.bytes
	h.cond.Broadcast()
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("tsdb: cannot commit the rows of row %d: %w", g.row, err)
	}
	db.presence.publish()
	db.aliases.publish()
	m := db.metrics
	m.groupsWritten.WithLabelValues(writeReasons[why]).Inc()
	m.operands.Add(float64(operands))
	m.headBytes.Set(float64(held))
	m.writeDurations.Observe(time.Since(start).Seconds())
	return nil
}

// retainedRows sets rows[i] to the row of resolution i that the finest row
// fineRow falls in, and keep[i] to whether resolution i still retains that
// row at now (its end is after now minus the retention); it reports whether
// any does. A group is written at the resolutions it keeps, and its cells
// stay live until it is written (keepHeld) exactly when it keeps one.
func (db *DB) retainedRows(fineRow, now int64, rows []int64, keep []bool) bool {
	base := fineRow * db.res[0].rowSpanMs
	kept := false
	for i, r := range db.res {
		rows[i] = r.Row(base)
		keep[i] = (rows[i]+1)*r.rowSpanMs > now-r.retentionMs
		kept = kept || keep[i]
	}
	return kept
}

// encodeGroup adds to b the rows of a group at every resolution and the
// presence they add, and returns how many row operands it added. A cell
// the group first brings into a row is written as an alias of its child
// when their deltas are the same; a cell already an alias in a row is
// written nothing when its deltas are again its child's, and its whole row
// otherwise (alias.go).
func (db *DB) encodeGroup(b *groupTable, g *group) (int, error) {
	w := &db.writer
	fine := db.res[0]
	base := g.row * fine.rowSpanMs
	rows := make([]int64, len(db.res))
	keep := make([]bool, len(db.res))
	if !db.retainedRows(g.row, db.opts.now().UnixMilli(), rows, keep) {
		// The head held this row past every retention: nothing of it is
		// written, and its cells may have no data anywhere; the next
		// retention pass looks.
		db.orphan(g)
		return 0, nil
	}
	operands := 0
	present := make([]*roaring.Bitmap, len(db.res))
	before := make([]*roaring.Bitmap, len(db.res))
	for fi, cuboids := range g.fams {
		fs := db.fams[fi]
		candidates := db.aliasCandidates(fi, g)
		for cuboid, cs := range cuboids {
			if cs == nil || cs.n == 0 {
				continue
			}
			for i, r := range db.res {
				present[i] = roaring.New()
				if keep[i] {
					var err error
					if before[i], err = db.presenceList(presenceKey{stepSec: r.stepSec, row: rows[i], fam: fs.id, cuboid: schema.CuboidID(cuboid)}); err != nil {
						return 0, err
					}
				}
			}
			for cell, entries := range cs.cells {
				if len(entries) == 0 {
					continue
				}
				w.fine.addEntries(entries)
				for i, r := range db.res {
					if !keep[i] {
						continue
					}
					present[i].Add(uint32(cell))
					if r.host != nil {
						continue // its steps go into its host's row
					}
					key := makeDataKey(r.stepSec, rows[i], fs.id, schema.CuboidID(cuboid), uint32(cell))
					pk := presenceOf(&key)
					var alias aliasRef
					isAlias := false
					if before[i].Contains(uint32(cell)) {
						m, err := db.rowAliases(pk)
						if err != nil {
							return 0, err
						}
						alias, isAlias = m[uint32(cell)]
						if isAlias && g.entries(fi, alias) != nil && bytes.Equal(entries, g.entries(fi, alias)) {
							continue // the child's row holds it
						}
					} else if ref, ok := db.newAlias(pk, candidates[cuboid][uint32(cell)]); ok {
						b.Set(key[:], appendAlias(w.buf[:0], ref))
						if err := db.stageAlias(pk, uint32(cell), ref, true); err != nil {
							return 0, err
						}
						db.metrics.aliasRows.Inc()
						continue
					}
					row := &w.coarse
					if i == 0 {
						row = &w.fine
					} else {
						coarseBase := rows[i] * r.rowSpanMs
						w.fine.each(func(slot int, sum float64, count uint64) {
							t := r.StepStart(base + int64(slot)*fine.stepMs)
							row.add(int((t-coarseBase)/r.stepMs), sum, count)
						})
					}
					if i == 1 && fine.host != nil && keep[0] {
						w.buf = appendHosted(w.buf[:0], row, db.hostFine(w, base, rows[1]))
					} else {
						w.buf = row.appendTo(w.buf[:0])
					}
					if i > 0 {
						row.reset()
					}
					if isAlias {
						// The cell gains deltas its child lacks: its row
						// becomes its child's plus this group's.
						if err := db.materialize(b, key, alias, w.buf); err != nil {
							return 0, err
						}
						if err := db.stageAlias(pk, uint32(cell), alias, false); err != nil {
							return 0, err
						}
						continue
					}
					b.Merge(key[:], w.buf)
					operands++
				}
				w.fine.reset()
			}
			for i, r := range db.res {
				if !keep[i] {
					continue
				}
				pk := presenceKey{stepSec: r.stepSec, row: rows[i], fam: fs.id, cuboid: schema.CuboidID(cuboid)}
				if err := db.stagePresence(b, pk, present[i]); err != nil {
					return 0, err
				}
			}
		}
		if err := db.unalias(b, fi, g, rows, keep); err != nil {
			return 0, err
		}
	}
	return operands, nil
}

// unalias writes the whole row of each alias whose child gains deltas in g
// while its own cell gains none. A combiner's flushes never do that (each
// delta comes rolled up into every coarser cuboid), but Apply takes any
// deltas, and each cell must read as what it was given.
func (db *DB) unalias(b *groupTable, fi int, g *group, rows []int64, keep []bool) error {
	fs := db.fams[fi]
	for q := range fs.children {
		for i, r := range db.res {
			if !keep[i] || r.host != nil {
				continue
			}
			pk := presenceKey{stepSec: r.stepSec, row: rows[i], fam: fs.id, cuboid: schema.CuboidID(q)}
			held, err := db.presenceList(pk)
			if err != nil {
				return err
			}
			if held.IsEmpty() {
				continue
			}
			m, err := db.rowAliases(pk)
			if err != nil {
				return err
			}
			for cell, ref := range m {
				if g.entries(fi, aliasRef{cuboid: pk.cuboid, cell: cell}) != nil || g.entries(fi, ref) == nil {
					continue
				}
				if err := db.materialize(b, makeDataKey(r.stepSec, rows[i], fs.id, pk.cuboid, cell), ref, nil); err != nil {
					return err
				}
				if err := db.stageAlias(pk, cell, ref, false); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// newAlias picks, among a cell's candidates, a child the row pk of its
// cuboid can alias: one that has no data in the row yet, so that the row
// the alias reads holds the group's deltas and nothing else. A child that
// had data while its parent had none cannot come from the same flushes.
// Children have larger cuboid IDs, whose presence this group has not
// staged yet: presenceList returns the rows as committed.
func (db *DB) newAlias(pk presenceKey, candidates childRefs) (aliasRef, bool) {
	for _, ref := range candidates.refs[:candidates.n] {
		child := pk
		child.cuboid = ref.cuboid
		held, err := db.presenceList(child)
		if err == nil && !held.Contains(ref.cell) {
			return ref, true
		}
	}
	return aliasRef{}, false
}

// materialize writes, in place of the alias row under key, the row it
// stands for plus op, the cell's operand from the group being written (if
// any).
func (db *DB) materialize(b *groupTable, key dataKey, alias aliasRef, op []byte) error {
	child := makeDataKey(0, 0, 0, alias.cuboid, alias.cell)
	copy(child[:15], key[:15])
	stored, err := db.storedRow(child[:])
	if err == nil && stored == nil {
		err = corruptRowError(key[:], errAliasMissing)
	}
	if err != nil {
		return err
	}
	if op != nil {
		if stored, err = foldRows(key[:], stored, op); err != nil {
			return err
		}
	}
	b.Set(key[:], stored)
	db.metrics.aliasesMaterialized.Inc()
	return nil
}

// orphan adds the cells of g to those the next retention pass looks at.
func (db *DB) orphan(g *group) {
	for fi, cuboids := range g.fams {
		for cuboid, cs := range cuboids {
			if cs == nil {
				continue
			}
			d := db.fams[fi].cuboids[cuboid]
			o := db.orphans[d]
			if o == nil {
				o = roaring.New()
				db.orphans[d] = o
			}
			for id, b := range cs.cells {
				if len(b) > 0 {
					o.Add(uint32(id))
				}
			}
		}
	}
}

// hostFine lays the writer's fine row, which starts at base, out as the
// fine part of row hostRow of the finest resolution's host.
func (db *DB) hostFine(w *writerState, base, hostRow int64) *denseFine {
	fine, host := db.res[0], db.res[1]
	f := &w.hostFine
	f.reset()
	f.k = int(host.stepMs / fine.stepMs)
	hostBase := hostRow * host.rowSpanMs
	w.fine.each(func(slot int, sum float64, count uint64) {
		off := base + int64(slot)*fine.stepMs - hostBase
		f.add(int(off/host.stepMs)*f.k+int(off%host.stepMs/fine.stepMs), sum, count)
	})
	return f
}

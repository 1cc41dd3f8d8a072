package tsdb

import (
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/dimsum/dimsum/schema"
)

// The writer writes the head's groups into Pebble (docs/format/tsdb.md,
// "The head"): a group is due once its row of the finest resolution ended
// more than Options.HeadHold before the newest delta applied (or the wall
// clock when it was applied, if earlier), or before the wall clock when no
// delta came for HeadHold; and, while the head holds more than three
// quarters of Options.HeadMaxBytes, the oldest group is due whatever its
// row. The groups of a host row that ended before the wall clock are written
// together (takeDue). Writing groups is one ingested sstable (table.go): a
// merge operand for each of their cells at every resolution that still
// retains their rows, the coarser ones rolled up from the finest, the
// presence bitmaps that gain cells, the written marks of their rows, and the
// deletion of the staged batches no group needs any more.

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

// Staged batches reach Pebble's files before the writer deletes them (a
// memtable of 2 MB fills in a fraction of a second on a backfill), and what
// a range deletion covers leaves the files only when a compaction rewrites
// them, which an idle store never starts: after the sparse backfill of
// docs/benchmarks.md, 5.6 MB of a 55 MB store were staged batches already
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
		gs, why := db.takeDue(all)
		if gs == nil {
			return nil
		}
		if err := db.writeGroups(gs, why); err != nil {
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

// takeDue moves the next groups to write from the open ones to the closing
// ones and returns them, or nil when none is due. Groups whose write failed
// are retried first.
//
// A store that pairs its finest resolution with a host keeps the finest
// steps in the host's rows, each of which spans several rows of the finest
// (six hours of 1m against one of 10s). Writing each finest row on its own
// gives each host row one merge operand per finest row, which compactions
// then fold: on the sparse backfill of docs/benchmarks.md they took a sixth
// of the node's CPU. So a closed group of a host row that ended before the
// wall clock (a backfill, or late data) waits for the rest of that host row,
// and they are written together, one operand a cell for the host row. The
// host row being filled now is written finest row by finest row as each
// closes: its rest may be hours away.
func (db *DB) takeDue(all bool) ([]*group, writeReason) {
	h := db.head
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.closing) > 0 {
		return slices.Clone(h.closing), writeRetry
	}
	r := db.res[0]
	host := r.keys() // r itself when unpaired
	hold := db.opts.HeadHold.Milliseconds()
	now := db.opts.now()
	nowMs := now.UnixMilli()
	closed := func(g *group, end int64) bool {
		return end+hold <= h.clock || end+hold <= nowMs && now.Sub(g.last) >= db.opts.HeadHold
	}
	// hostPast reports whether g's host row ended before the wall clock.
	hostPast := func(g *group) bool { return (host.Row(g.row*r.rowSpanMs)+1)*host.rowSpanMs <= nowMs }
	var due, oldest *group
	for _, g := range h.open {
		ok := closed(g, (g.row+1)*r.rowSpanMs)
		if ok && hostPast(g) {
			ok = closed(g, (host.Row(g.row*r.rowSpanMs)+1)*host.rowSpanMs)
		}
		if (all || ok) && (due == nil || g.row < due.row) {
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
	gs := []*group{due}
	if why == writeFlush || why == writeClosed && hostPast(due) {
		// Every group is due, or the host row closed, and with it all
		// its groups.
		first := host.Row(due.row*r.rowSpanMs) * host.rowSpanMs / r.rowSpanMs
		for row := first; row < first+host.rowSpanMs/r.rowSpanMs; row++ {
			if g := h.open[row]; g != nil && g != due {
				gs = append(gs, g)
			}
		}
		slices.SortFunc(gs, func(a, b *group) int { return cmp.Compare(a.row, b.row) })
	}
	for _, g := range gs {
		delete(h.open, g.row)
	}
	h.closing = append(h.closing, gs...)
	return gs, why
}

// writeGroups writes closing groups, of one host row, in one table. On
// failure they stay closing, for the next attempt, and nothing of them is
// in Pebble.
func (db *DB) writeGroups(gs []*group, why writeReason) error {
	start := time.Now()
	b := &db.writer.table
	b.reset()
	defer clear(db.presence.staged)
	operands, err := db.encodeGroups(b, gs)
	if err != nil {
		return err
	}

	h := db.head
	h.mu.Lock()
	low := h.lowest(gs)
	if low > h.stagedLow {
		b.DeleteRange(stagedKey(h.stagedLow), stagedKey(low))
	}
	// A mark says which staged batches not to replay into its row: it is
	// needed only while one of them is still stored.
	marks := map[int64]uint64{}
	for row, seq := range h.written {
		if seq >= low {
			marks[row] = seq
		}
	}
	for _, g := range gs {
		if g.maxSeq >= low {
			marks[g.row] = max(marks[g.row], g.maxSeq)
		}
	}
	step := db.res[0].stepSec
	for row := range h.written {
		if _, keep := marks[row]; !keep {
			b.Delete(writtenKey(step, row))
		}
	}
	for _, g := range gs {
		if seq, ok := marks[g.row]; ok {
			b.Set(writtenKey(step, g.row), binary.AppendUvarint(nil, seq))
		}
		g.committing = true
	}
	h.mu.Unlock()

	// The rows, presence, marks and staged deletions go in at once: a
	// crash before the table is ingested leaves the staged batches, and
	// replay rebuilds the groups.
	if !b.empty() {
		err = db.ingest(b)
	}

	h.mu.Lock()
	for _, g := range gs {
		g.committing = false
	}
	if err == nil {
		h.closing = slices.DeleteFunc(h.closing, func(c *group) bool { return slices.Contains(gs, c) })
		for _, g := range gs {
			h.bytes -= g.bytes
		}
		h.written = marks
		h.stagedLow = max(h.stagedLow, low)
		h.writeErr = nil
	}
	held := h.bytes
	h.cond.Broadcast()
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("tsdb: cannot commit the rows of rows %d to %d: %w", gs[0].row, gs[len(gs)-1].row, err)
	}
	db.presence.publish()
	m := db.metrics
	m.groupsWritten.WithLabelValues(writeReasons[why]).Add(float64(len(gs)))
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

// encodeGroups adds to b the rows of groups of one host row (one row of
// the finest resolution when unpaired), ascending, at every resolution, and
// the presence they add, and returns how many row operands it added. Each
// cell has one operand a row of each resolution above the finest, the sum
// of what every group holds of it.
func (db *DB) encodeGroups(b *groupTable, all []*group) (int, error) {
	w := &db.writer
	fine := db.res[0]
	hosted := fine.host != nil
	now := db.opts.now().UnixMilli()
	// rows[i] and keep[i] are the groups' rows of resolution i and whether
	// it retains them: the same row for every group above the finest.
	var gs []*group
	var rows [][]int64
	var keep [][]bool
	for _, g := range all {
		r, k := make([]int64, len(db.res)), make([]bool, len(db.res))
		if !db.retainedRows(g.row, now, r, k) {
			// The head held this row past every retention: nothing of
			// it is written, and its cells may have no data anywhere;
			// the next retention pass looks.
			db.orphan(g)
			continue
		}
		gs, rows, keep = append(gs, g), append(rows, r), append(keep, k)
	}
	if len(gs) == 0 {
		return 0, nil
	}
	if len(w.rows) != len(db.res) {
		w.rows = make([]denseRow, len(db.res))
	}
	operands := 0
	present := make([]*roaring.Bitmap, len(db.res)) // above the finest
	presentFine := make([]*roaring.Bitmap, len(gs)) // the finest, by group
	for fi := range db.fams {
		fs := db.fams[fi]
		for cuboid := range fs.cuboids {
			sets := make([]*cellSet, len(gs))
			n := 0
			for j, g := range gs {
				if g.fams[fi] != nil && g.fams[fi][cuboid] != nil && g.fams[fi][cuboid].n > 0 {
					sets[j] = g.fams[fi][cuboid]
					n = max(n, len(sets[j].cells))
				}
			}
			if n == 0 {
				continue
			}
			for i := range present {
				present[i] = roaring.New()
			}
			for j := range presentFine {
				presentFine[j] = roaring.New()
			}
			for cell := range n {
				hasFine, any := false, false
				for j, cs := range sets {
					if cs == nil || cell >= len(cs.cells) || len(cs.cells[cell]) == 0 {
						continue
					}
					any = true
					w.fine.addEntries(cs.cells[cell])
					base := gs[j].row * fine.rowSpanMs
					if keep[j][0] {
						presentFine[j].Add(uint32(cell))
						if hosted {
							hasFine = true
							db.hostFine(w, base, rows[j][1])
						} else {
							w.buf = w.fine.appendTo(w.buf[:0])
							key := makeDataKey(fine.stepSec, rows[j][0], fs.id, schema.CuboidID(cuboid), uint32(cell))
							b.Merge(key[:], w.buf)
							operands++
						}
					}
					for i := 1; i < len(db.res); i++ {
						if !keep[j][i] {
							continue
						}
						r, row := db.res[i], &w.rows[i]
						coarseBase := rows[j][i] * r.rowSpanMs
						w.fine.each(func(slot int, sum float64, count uint64) {
							t := r.StepStart(base + int64(slot)*fine.stepMs)
							row.add(int((t-coarseBase)/r.stepMs), sum, count)
						})
					}
					w.fine.reset()
				}
				if !any {
					continue
				}
				for i := 1; i < len(db.res); i++ {
					row := &w.rows[i]
					if row.empty() {
						continue
					}
					present[i].Add(uint32(cell))
					if i == 1 && hasFine {
						w.buf = appendHosted(w.buf[:0], row, &w.hostFine)
					} else {
						w.buf = row.appendTo(w.buf[:0])
					}
					key := makeDataKey(db.res[i].stepSec, rows[0][i], fs.id, schema.CuboidID(cuboid), uint32(cell))
					b.Merge(key[:], w.buf)
					row.reset()
					operands++
				}
				w.hostFine.reset()
			}
			for j := range gs {
				if !keep[j][0] {
					continue
				}
				pk := presenceKey{stepSec: fine.stepSec, row: rows[j][0], fam: fs.id, cuboid: schema.CuboidID(cuboid)}
				if err := db.stagePresence(b, pk, presentFine[j]); err != nil {
					return 0, err
				}
			}
			for i := 1; i < len(db.res); i++ {
				if present[i].IsEmpty() {
					continue
				}
				pk := presenceKey{stepSec: db.res[i].stepSec, row: rows[0][i], fam: fs.id, cuboid: schema.CuboidID(cuboid)}
				if err := db.stagePresence(b, pk, present[i]); err != nil {
					return 0, err
				}
			}
		}
	}
	return operands, nil
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

// hostFine adds the writer's fine row, which starts at base, to its fine
// part of row hostRow of the finest resolution's host.
func (db *DB) hostFine(w *writerState, base, hostRow int64) {
	fine, host := db.res[0], db.res[1]
	f := &w.hostFine
	f.k = int(host.stepMs / fine.stepMs)
	hostBase := hostRow * host.rowSpanMs
	w.fine.each(func(slot int, sum float64, count uint64) {
		off := base + int64(slot)*fine.stepMs - hostBase
		f.add(int(off/host.stepMs)*f.k+int(off%host.stepMs/fine.stepMs), sum, count)
	})
}

package tsdb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
)

// RetentionStats is what one retention pass removed.
type RetentionStats struct {
	// Rows is the number of (resolution, row, family, cuboid) presence
	// bitmaps deleted, each with every data row it covered.
	Rows int
	// Cells is the number of cells forgotten because no resolution holds
	// data of theirs any more.
	Cells int
	// Sources is the number of sources of batches forgotten.
	Sources int
}

// RunRetention runs one retention pass now; Open also runs one every
// Options.RetentionInterval. A pass
//
//   - deletes, at each resolution, the rows that end at or before now minus
//     the resolution's retention, with one Pebble range deletion for the
//     data and one for the presence bitmaps: its cost does not depend on
//     how much data the rows held;
//   - forgets the cells whose data is now gone at every resolution, found
//     from the presence bitmaps alone: their dictionary entries and postings
//     are deleted, and their IDs are reused by new cells. A pass looks at
//     the cells of the rows it deletes and of the groups the writer wrote
//     nothing of; the first after Open looks at every cell, since the
//     latter were known only to the process that stopped;
//   - deletes every row of a resolution that is no longer in the schema,
//     the same way: removing a resolution from the schema drops its data at
//     the next pass;
//   - forgets the sources that applied nothing for
//     Options.IdempotencyHorizon.
//
// A cell with data in the head is live, whatever presence says. Apply and
// the writer wait while a pass runs; reads do not. Reads never return
// steps older than retention, pass or no pass.
func (db *DB) RunRetention() (st RetentionStats, err error) {
	start := time.Now()
	// The locks in the order Apply and Flush take them: apply, state,
	// write.
	db.apply.Lock()
	defer db.apply.Unlock()
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return st, ErrClosed
	}
	db.write.Lock()
	defer db.write.Unlock()
	defer func() {
		if err != nil {
			db.metrics.retentionErrors.Inc()
			return
		}
		d := time.Since(start)
		db.metrics.retentionPasses.Inc()
		db.metrics.retentionDurations.Observe(d.Seconds())
		db.metrics.rowsDeleted.Add(float64(st.Rows))
		db.metrics.cellsForgotten.Add(float64(st.Cells))
		db.metrics.sourcesForgotten.Add(float64(st.Sources))
		db.metrics.cells.Sub(float64(st.Cells))
		db.log.Info("retention pass", "rows", st.Rows, "cells_forgotten", st.Cells, "sources_forgotten", st.Sources, "duration", d)
	}()

	now := db.opts.now().UnixMilli()
	b := db.pdb.NewBatch()
	defer b.Close()
	defer db.rollback()

	// Rows before cut[i] are gone at resolution i; the cells present in
	// them may have no data left.
	cut := make([]int64, len(db.res))
	candidates := map[*cellDict]*roaring.Bitmap{}
	for i, r := range db.res {
		cut[i] = r.Row(now - r.retentionMs)
		n, err := db.expireRows(b, r, cut[i], candidates)
		if err != nil {
			return st, err
		}
		st.Rows += n
	}
	removed, err := db.removedSteps()
	if err != nil {
		return st, err
	}
	for _, step := range removed {
		n, err := db.expireRows(b, resolution{stepSec: step}, math.MaxInt64, candidates)
		if err != nil {
			return st, err
		}
		db.log.Warn("deleting the rows of a resolution that is no longer in the schema", "step", time.Duration(step)*time.Second, "rows", n)
		st.Rows += n
	}
	for d, o := range db.orphans {
		if c := candidates[d]; c != nil {
			c.Or(o)
		} else {
			candidates[d] = o
		}
	}
	if !db.swept {
		// The orphans of the groups written before the last Open are
		// unknown: every cell is a candidate, once.
		for _, fs := range db.fams {
			for _, d := range fs.cuboids {
				if c := candidates[d]; c != nil {
					c.Or(d.live)
				} else {
					candidates[d] = d.live.Clone()
				}
			}
		}
	}
	if err := db.keepLive(cut, candidates); err != nil {
		return st, err
	}
	db.keepHeld(now, candidates)
	for d, dead := range candidates {
		dead.And(d.live) // presence names only committed cells; this makes sure
		if dead.IsEmpty() {
			continue
		}
		if err := d.remove(b, dead.ToArray(), &db.apply.keyBuf); err != nil {
			return st, err
		}
		d.stage()
		db.apply.touched = append(db.apply.touched, d)
	}
	quiet, err := db.pruneSources(b, now-db.opts.IdempotencyHorizon.Milliseconds())
	if err != nil {
		return st, err
	}

	if err := b.Commit(db.syncMode()); err != nil {
		return st, fmt.Errorf("tsdb: cannot commit retention: %w", err)
	}
	_, st.Cells = db.publish()
	clear(db.orphans)
	db.swept = true
	for _, name := range quiet {
		delete(db.sources, name)
	}
	st.Sources = len(quiet)
	// The cache may hold bitmaps of deleted rows.
	clear(db.presence.cache)
	clear(db.aliases.cache)
	return st, nil
}

// expireRows adds to b the deletion of the rows of r before row cut, data
// and presence, and adds the cells present in them to candidates. It
// returns the number of presence bitmaps deleted.
func (db *DB) expireRows(b *pebble.Batch, r resolution, cut int64, candidates map[*cellDict]*roaring.Bitmap) (int, error) {
	lo := appendRowBound(nil, prefixPresence, r.stepSec, math.MinInt64)
	hi := appendRowBound(nil, prefixPresence, r.stepSec, cut)
	n := 0
	err := db.eachPresence(lo, hi, false, func(pk presenceKey, l func() (*roaring.Bitmap, error)) (bool, error) {
		n++
		d := db.dictByID(pk.fam, pk.cuboid)
		if d == nil {
			return true, nil // a family no longer in the schema: its rows go, its cells stay
		}
		list, err := l()
		if err != nil {
			return false, err
		}
		if c := candidates[d]; c != nil {
			c.Or(list)
		} else {
			candidates[d] = list
		}
		return true, nil
	})
	if err != nil {
		return 0, err
	}
	dataLo := appendRowBound(nil, prefixData, r.stepSec, math.MinInt64)
	dataHi := appendRowBound(nil, prefixData, r.stepSec, cut)
	if n == 0 {
		// Data is written with its presence, so there is nothing to
		// delete, unless presence was lost; one seek makes sure.
		iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: dataLo, UpperBound: dataHi})
		if err != nil {
			return 0, fmt.Errorf("tsdb: cannot look for expired rows: %w", err)
		}
		any := iter.First()
		if err := errors.Join(iter.Error(), iter.Close()); err != nil {
			return 0, fmt.Errorf("tsdb: cannot look for expired rows: %w", err)
		}
		if !any {
			return 0, nil
		}
	}
	if err := errors.Join(b.DeleteRange(dataLo, dataHi, nil), b.DeleteRange(lo, hi, nil)); err != nil {
		return 0, fmt.Errorf("tsdb: cannot add range deletion to batch: %w", err)
	}
	return n, nil
}

// removedSteps returns the steps, in seconds, that the store holds data or
// presence rows of but the schema no longer lists. It costs one seek per
// distinct step stored.
func (db *DB) removedSteps() ([]uint32, error) {
	var out []uint32
	for _, prefix := range []byte{prefixPresence, prefixData} {
		iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: []byte{prefix}, UpperBound: []byte{prefix + 1}})
		if err != nil {
			return nil, fmt.Errorf("tsdb: cannot look for removed resolutions: %w", err)
		}
		for valid := iter.First(); valid; {
			k := iter.Key()
			if len(k) < 5 {
				return nil, errors.Join(malformedKey("key", k), iter.Close())
			}
			step := binary.BigEndian.Uint32(k[1:5])
			if !slices.ContainsFunc(db.res, func(r resolution) bool { return r.stepSec == step }) && !slices.Contains(out, step) {
				out = append(out, step)
			}
			if step == math.MaxUint32 {
				break
			}
			valid = iter.SeekGE(appendRowBound(nil, prefix, step+1, math.MinInt64))
		}
		if err := errors.Join(iter.Error(), iter.Close()); err != nil {
			return nil, fmt.Errorf("tsdb: cannot look for removed resolutions: %w", err)
		}
	}
	return out, nil
}

// keepLive removes from candidates every cell that still has data in a
// row at or after cut, at any resolution. It reads presence bitmaps newest
// first, coarsest resolution first, where the live cells are, and stops as
// soon as no candidate is left: cells that do have data left are cleared
// after a bitmap or two; only cells that are really gone cost a look at
// every remaining row of their cuboid.
func (db *DB) keepLive(cut []int64, candidates map[*cellDict]*roaring.Bitmap) error {
	left := 0
	for _, c := range candidates {
		if !c.IsEmpty() {
			left++
		}
	}
	for i := len(db.res) - 1; i >= 0 && left > 0; i-- {
		r := db.res[i]
		lo := appendRowBound(nil, prefixPresence, r.stepSec, cut[i])
		hi := append(appendRowBound(nil, prefixPresence, r.stepSec, math.MaxInt64), 0xff, 0xff, 0xff, 0xff, 0xff)
		err := db.eachPresence(lo, hi, true, func(pk presenceKey, l func() (*roaring.Bitmap, error)) (bool, error) {
			c := candidates[db.dictByID(pk.fam, pk.cuboid)]
			if c == nil || c.IsEmpty() {
				return true, nil
			}
			list, err := l()
			if err != nil {
				return false, err
			}
			c.AndNot(list)
			if c.IsEmpty() {
				left--
			}
			return left > 0, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// eachPresence calls fn for each presence key in [lo, hi), ascending or
// descending, until fn returns false. fn decodes the bitmap by calling
// list, which reports corruption naming the key.
func (db *DB) eachPresence(lo, hi []byte, reverse bool, fn func(pk presenceKey, list func() (*roaring.Bitmap, error)) (bool, error)) error {
	iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return fmt.Errorf("tsdb: cannot read presence: %w", err)
	}
	valid, step := iter.First, iter.Next
	if reverse {
		valid, step = iter.Last, iter.Prev
	}
	for ok := valid(); ok; ok = step() {
		key := iter.Key()
		pk, err := parsePresenceKey(key)
		if err != nil {
			return errors.Join(err, iter.Close())
		}
		more, err := fn(pk, func() (*roaring.Bitmap, error) { return db.decodePresence(key, iter.Value()) })
		if err != nil {
			return errors.Join(err, iter.Close())
		}
		if !more {
			break
		}
	}
	if err := errors.Join(iter.Error(), iter.Close()); err != nil {
		return fmt.Errorf("tsdb: cannot read presence: %w", err)
	}
	return nil
}

// keepHeld removes from candidates every cell with data in the head that
// some resolution still retains, open or closing (a closing group whose
// commit failed is retried).
func (db *DB) keepHeld(now int64, candidates map[*cellDict]*roaring.Bitmap) {
	h := db.head
	h.mu.Lock()
	defer h.mu.Unlock()
	rows := make([]int64, len(db.res))
	keep := make([]bool, len(db.res))
	h.groups(func(g *group) {
		if !db.retainedRows(g.row, now, rows, keep) {
			return // the writer will write none of it
		}
		for d, c := range candidates {
			fs := db.byID[d.fam]
			if fs == nil || g.fams[fs.idx] == nil || g.fams[fs.idx][d.cuboid] == nil {
				continue
			}
			for id, b := range g.fams[fs.idx][d.cuboid].cells {
				if len(b) > 0 {
					c.Remove(uint32(id))
				}
			}
		}
	})
}

// pruneSources adds to b the deletion of the records of the sources that
// applied nothing since cutoff, and returns their names.
func (db *DB) pruneSources(b *pebble.Batch, cutoff int64) ([]string, error) {
	var quiet []string
	for name, s := range db.sources {
		if s.lastMS >= cutoff {
			continue
		}
		if err := b.Delete(appendSourceKey(nil, name), nil); err != nil {
			return nil, fmt.Errorf("tsdb: cannot add a source record's removal to batch: %w", err)
		}
		quiet = append(quiet, name)
	}
	return quiet, nil
}

// dictByID returns the index of a cuboid of a family of the schema, or nil.
func (db *DB) dictByID(fam uint16, cuboid schema.CuboidID) *cellDict {
	fs := db.byID[fam]
	if fs == nil {
		return nil
	}
	return fs.cuboid(cuboid)
}

// startRetention starts the periodic pass unless it is disabled.
func (db *DB) startRetention() {
	interval := db.opts.RetentionInterval
	if interval < 0 {
		return
	}
	db.retention.stop = make(chan struct{})
	db.retention.done = make(chan struct{})
	go func() {
		defer close(db.retention.done)
		for {
			// Jitter keeps the nodes of a cluster from compacting in step.
			wait := interval + rand.N(interval/10+1)
			select {
			case <-db.retention.stop:
				return
			case <-time.After(wait):
			}
			if _, err := db.RunRetention(); err != nil && !errors.Is(err, ErrClosed) {
				db.log.Error("retention pass failed", "err", err)
			}
		}
	}()
}

func (db *DB) stopRetention() {
	if db.retention.stop == nil {
		return
	}
	close(db.retention.stop)
	<-db.retention.done
}

// syncMode is the write option of batches.
func (db *DB) syncMode() *pebble.WriteOptions {
	if db.opts.NoSync {
		return pebble.NoSync
	}
	return pebble.Sync
}

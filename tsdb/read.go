package tsdb

import (
	"errors"
	"fmt"
	"slices"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/prometheus/model/labels"
)

// Cell is one cell of a cuboid.
type Cell struct {
	ID     uint32
	Values []string // in schema.Cuboid.Labels order
}

// Cells returns the cells of a cuboid whose labels satisfy every matcher,
// sorted by Values. A matcher on a label the cuboid does not have is
// evaluated against the empty string, as Prometheus does for a series that
// lacks the label. Matchers on "__name__" are ignored: the caller maps
// metric names to families. Matchers are evaluated on the cuboid's
// postings: "=" is one lookup, "!=" its complement, and a regular
// expression is matched against the label's distinct values (only its set
// of literal alternatives, or only the values with its literal prefix, when
// it has them), never against every cell.
func (db *DB) Cells(family string, cuboid schema.CuboidID, ms []*labels.Matcher) ([]Cell, error) {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return nil, ErrClosed
	}
	d, err := db.dict(family, cuboid)
	if err != nil {
		return nil, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	set := d.match(ms)
	if set.IsEmpty() {
		return nil, nil
	}
	ids := set.ToArray()
	all := d.cells
	slices.SortFunc(ids, func(x, y uint32) int { return slices.Compare(all[x], all[y]) })

	// Hand out copies so that a caller that edits a cell cannot change the
	// dictionary; one backing array keeps it to two allocations.
	out := make([]Cell, len(ids))
	values := make([]string, len(ids)*len(d.labels))
	for i, id := range ids {
		v := values[i*len(d.labels) : (i+1)*len(d.labels) : (i+1)*len(d.labels)]
		copy(v, all[id])
		out[i] = Cell{ID: id, Values: v}
	}
	return out, nil
}

// LabelNames returns the names of the labels of a cuboid that some cell
// holds with a non-empty value (a cell whose value is "" lacks the label, as
// in Prometheus), ascending, at most limit of them (0: no limit). Only the
// cells that satisfy every matcher count, and only those with data in
// [mint, maxt] unless the range is [math.MinInt64, math.MaxInt64]. The
// range is answered at row granularity: a cell counts when a row overlapping
// the range holds data of it, at the finest resolution that still keeps
// mint.
func (db *DB) LabelNames(family string, cuboid schema.CuboidID, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error) {
	var out []string
	err := db.selectCells(family, cuboid, mint, maxt, ms, func(d *cellDict, sel *roaring.Bitmap) {
		names := slices.Clone(d.labels)
		slices.Sort(names)
		for _, name := range names {
			if len(d.labelValues(slices.Index(d.labels, name), sel, 1)) > 0 {
				out = append(out, name)
				if len(out) == limit {
					break
				}
			}
		}
	})
	return out, err
}

// LabelValues returns the non-empty values of one label of a cuboid,
// ascending, at most limit of them (0: no limit), over the cells that
// LabelNames would count with the same arguments. A label the cuboid lacks
// has no values.
func (db *DB) LabelValues(family string, cuboid schema.CuboidID, name string, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error) {
	var out []string
	err := db.selectCells(family, cuboid, mint, maxt, ms, func(d *cellDict, sel *roaring.Bitmap) {
		if slot := slices.Index(d.labels, name); slot >= 0 {
			out = d.labelValues(slot, sel, limit)
		}
	})
	return out, err
}

// selectCells calls fn, under the cuboid's read lock, with the cells that
// satisfy ms and have data in [mint, maxt]; nil stands for every cell.
func (db *DB) selectCells(family string, cuboid schema.CuboidID, mint, maxt int64, ms []*labels.Matcher, fn func(d *cellDict, sel *roaring.Bitmap)) error {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return ErrClosed
	}
	if mint > maxt {
		return nil
	}
	d, err := db.dict(family, cuboid)
	if err != nil {
		return err
	}
	var inRange *roaring.Bitmap
	if !fullRange(mint, maxt) {
		r := db.rangeResolution(db.opts.now().UnixMilli(), mint)
		if inRange, err = db.cellsWithData(r, d.fam, cuboid, mint, maxt); err != nil {
			return err
		}
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	sel := d.match(ms)
	switch {
	case inRange != nil:
		sel = roaring.And(sel, inRange)
	case sel == d.live:
		sel = nil
	}
	fn(d, sel)
	return nil
}

// Step is the aggregate of one cell over one step of a resolution.
type Step struct {
	T     int64 // unix ms of the step's start
	Sum   float64
	Count uint64
}

// Steps appends to dst the stored steps of one cell at resolution index res
// (0 = finest, as in Schema.Resolutions) whose start T lies in [mint, maxt],
// ascending by T, and returns it. Steps never written are absent, and so are
// steps that ended before the resolution's retention.
func (db *DB) Steps(res int, family string, cuboid schema.CuboidID, cell uint32, mint, maxt int64, dst []Step) ([]Step, error) {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return dst, ErrClosed
	}
	r, d, err := db.resDict(res, family, cuboid)
	if err != nil {
		return dst, err
	}
	cells := [1]uint32{cell}
	err = db.scan(r, d, cells[:], mint, maxt, func(_ int, t int64, sum float64, count uint64) {
		dst = append(dst, Step{T: t, Sum: sum, Count: count})
	})
	return dst, err
}

// Scan reads, in one pass over the rows of [mint, maxt], the steps of a set
// of cells of one cuboid at resolution index res, and calls fn once per cell
// that has a step whose start lies in [mint, maxt], in ascending cell ID
// order, with its steps ascending by T. cells lists cell IDs (in any order;
// IDs that name no cell read nothing); nil reads every cell of the cuboid.
// fn may keep steps; it runs after the read, so it may call the DB. An error
// from fn stops the calls and is returned.
//
// Data keys are ordered by time first (docs/format/tsdb.md, "Data rows"), so
// a short range over many cells reads contiguous keys, and a long range over
// a few cells costs one seek per row per cell.
func (db *DB) Scan(res int, family string, cuboid schema.CuboidID, cells []uint32, mint, maxt int64, fn func(cell uint32, steps []Step) error) error {
	ids, steps, err := db.scanCells(res, family, cuboid, cells, mint, maxt)
	if err != nil {
		return err
	}
	for i, s := range steps {
		if len(s) == 0 {
			continue
		}
		if err := fn(ids[i], s); err != nil {
			return err
		}
	}
	return nil
}

// scanCells reads the steps of Scan under the read lock.
func (db *DB) scanCells(res int, family string, cuboid schema.CuboidID, cells []uint32, mint, maxt int64) ([]uint32, [][]Step, error) {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return nil, nil, ErrClosed
	}
	r, d, err := db.resDict(res, family, cuboid)
	if err != nil {
		return nil, nil, err
	}
	var ids []uint32
	if cells == nil {
		d.mu.RLock()
		ids = d.live.ToArray()
		d.mu.RUnlock()
	} else {
		ids = slices.Clone(cells)
		slices.Sort(ids)
		ids = slices.Compact(ids)
	}
	steps := make([][]Step, len(ids))
	err = db.scan(r, d, ids, mint, maxt, func(i int, t int64, sum float64, count uint64) {
		steps[i] = append(steps[i], Step{T: t, Sum: sum, Count: count})
	})
	return ids, steps, err
}

// scan visits the stored steps of the given cells (ascending, distinct) of
// one cuboid at resolution r whose start lies in [mint, maxt], clamped to
// the retention, row by row and within a row by cell: add gets the cell's
// index in cells. Rows that hold no data of any cuboid are skipped by the
// seeks, so the loop is bounded by the rows stored, not by the range asked.
func (db *DB) scan(r resolution, d *cellDict, cells []uint32, mint, maxt int64, add func(i int, t int64, sum float64, count uint64)) error {
	// A step that ended at or before now minus the retention is expired,
	// whether or not the retention pass has deleted its row yet.
	mint = max(mint, db.opts.now().UnixMilli()-r.retentionMs-r.stepMs+1)
	if mint > maxt || len(cells) == 0 {
		return nil
	}
	first, last := r.Row(mint), r.Row(maxt)
	lo := makeDataKey(r.stepSec, first, d.fam, d.cuboid, cells[0])
	hi := makeDataKey(r.stepSec, last, d.fam, d.cuboid, cells[len(cells)-1])
	// Keys are fixed-width, so hi followed by a zero byte is the first key
	// after hi: no overflow at the largest row or cell.
	var upper [dataKeyLen + 1]byte
	copy(upper[:], hi[:])
	iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: lo[:], UpperBound: upper[:]})
	if err != nil {
		return fmt.Errorf("tsdb: cannot read steps: %w", err)
	}
	err = scanRows(iter, r, d, cells, first, last, mint, maxt, add)
	err = errors.Join(err, iter.Close())
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			db.metrics.corruptions.Inc()
		}
		return fmt.Errorf("tsdb: cannot read steps: %w", err)
	}
	return nil
}

// scanRows is scan's loop: for each stored row from first to last, seek to
// the first wanted cell, then step through the cuboid's keys of that row,
// seeking over runs of cells not wanted.
func scanRows(iter *pebble.Iterator, r resolution, d *cellDict, cells []uint32, first, last, mint, maxt int64, add func(i int, t int64, sum float64, count uint64)) error {
	var dec rowDecoder
	for row := first; row <= last; {
		seek := makeDataKey(r.stepSec, row, d.fam, d.cuboid, cells[0])
		valid := iter.SeekGE(seek[:])
		next := row + 1
		for i := 0; valid; {
			k, err := parseDataKey(iter.Key())
			if err != nil {
				return fmt.Errorf("%w: data key %x: %v", ErrCorrupt, iter.Key(), err)
			}
			if k.row != row || k.fam != d.fam || k.cuboid != d.cuboid {
				// Past this row's keys of the cuboid. Rows between
				// here and the key found hold nothing: skip them.
				next = max(next, k.row)
				break
			}
			for i < len(cells) && cells[i] < k.cell {
				i++
			}
			if i == len(cells) {
				break
			}
			if cells[i] != k.cell {
				seek = makeDataKey(r.stepSec, row, d.fam, d.cuboid, cells[i])
				valid = iter.SeekGE(seek[:])
				continue
			}
			v, err := iter.ValueAndErr()
			if err != nil {
				return err
			}
			base := row * r.rowSpanMs
			dec.init(v)
			for {
				slot, sum, count, ok := dec.next()
				if !ok {
					break
				}
				t := base + int64(slot)*r.stepMs
				if t < mint {
					continue
				}
				if t > maxt {
					break
				}
				add(i, t, sum, count)
			}
			if dec.err != nil {
				return corruptRowError(iter.Key(), dec.err)
			}
			i++
			valid = iter.Next()
		}
		if err := iter.Error(); err != nil {
			return err
		}
		if !valid && next == row+1 {
			// Nothing stored after this row within the bounds.
			break
		}
		row = next
	}
	return nil
}

// resDict returns a resolution and the index of a cuboid.
func (db *DB) resDict(res int, family string, cuboid schema.CuboidID) (resolution, *cellDict, error) {
	if res < 0 || res >= len(db.res) {
		return resolution{}, nil, fmt.Errorf("%w: resolution %d of %d", ErrBadInput, res, len(db.res))
	}
	d, err := db.dict(family, cuboid)
	return db.res[res], d, err
}

// dict returns the cell dictionary of a cuboid.
func (db *DB) dict(family string, cuboid schema.CuboidID) (*cellDict, error) {
	fs := db.families[family]
	if fs == nil {
		return nil, fmt.Errorf("%w: unknown family %q", ErrBadInput, family)
	}
	d := fs.cuboid(cuboid)
	if d == nil {
		return nil, fmt.Errorf("%w: family %q has no cuboid %d", ErrBadInput, family, cuboid)
	}
	return d, nil
}

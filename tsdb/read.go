package tsdb

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

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
		// The head first: a group written in between is then in the
		// presence read after.
		r := db.rangeResolution(db.opts.now().UnixMilli(), mint)
		held := db.heldCells(d, r, mint, maxt)
		if inRange, err = db.cellsWithData(r, d.fam, cuboid, mint, maxt); err != nil {
			return err
		}
		inRange.Or(held)
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
	mint = db.retained(r, mint)
	if mint > maxt {
		return dst, nil
	}
	cells := [1]uint32{cell}
	view, iter, err := db.snapshot(r, d, cells[:], mint, maxt, cellRowBounds(r, d, cells[:], mint, maxt))
	if err != nil {
		return dst, db.readError(err)
	}
	dst, err = db.seekRows(iter, r, d, cells[:], mint, maxt, &view, dst, nil)
	if err != nil {
		return dst, db.readError(err)
	}
	return dst, nil
}

// Scan reads, in one pass over the rows of [mint, maxt], the steps of a set
// of cells of one cuboid at resolution index res, and calls fn once per cell
// that has a step whose start lies in [mint, maxt], in ascending cell ID
// order, with its steps ascending by T. cells lists cell IDs (in any order;
// IDs that name no cell read nothing); nil reads every cell with data. fn
// runs while the read holds the store open: it must not call the DB, and
// steps is reused after it returns. An error from fn stops the scan and is
// returned.
//
// Data keys are ordered by time first (docs/format/tsdb.md, "Data rows"):
// each row of the range stores the cuboid's cells contiguously. Scan keeps
// one cursor per stored row and merges them by cell, so a short range over
// many cells reads contiguous keys with no seek, a long range over a few
// cells costs one seek per row per cell, and neither buffers more than one
// cell's steps. The head's rows (not yet written) add to the stored ones,
// rolled up to the resolution read.
func (db *DB) Scan(res int, family string, cuboid schema.CuboidID, cells []uint32, mint, maxt int64, fn func(cell uint32, steps []Step) error) error {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return ErrClosed
	}
	r, d, err := db.resDict(res, family, cuboid)
	if err != nil {
		return err
	}
	if cells != nil {
		cells = slices.Clone(cells)
		slices.Sort(cells)
		cells = slices.Compact(cells)
		if len(cells) == 0 {
			return nil
		}
	}
	return db.scan(r, d, cells, mint, maxt, fn)
}

// scan is Scan after its checks, under the read lock.
func (db *DB) scan(r resolution, d *cellDict, cells []uint32, mint, maxt int64, fn func(cell uint32, steps []Step) error) error {
	mint = db.retained(r, mint)
	if mint > maxt {
		return nil
	}
	var err error
	if cells != nil && len(cells) <= seekCells {
		view, iter, serr := db.snapshot(r, d, cells, mint, maxt, cellRowBounds(r, d, cells, mint, maxt))
		if serr != nil {
			return db.readError(serr)
		}
		_, err = db.seekRows(iter, r, d, cells, mint, maxt, &view, nil, fn)
	} else {
		kr := r.keys()
		view, probe, serr := db.snapshot(r, d, cells, mint, maxt, dataBounds(
			makeDataKey(kr.stepSec, kr.Row(mint), d.fam, d.cuboid, 0),
			makeDataKey(kr.stepSec, kr.Row(maxt), d.fam, d.cuboid, math.MaxUint32)))
		if serr != nil {
			return db.readError(serr)
		}
		cs, oerr := db.openCursors(probe, kr, d, mint, maxt)
		if oerr == nil {
			oerr = cs.merge(db.res[0], r, cells, mint, maxt, &view, fn)
		}
		err = errors.Join(oerr, cs.close())
	}
	return db.readError(err)
}

// snapshot returns the head's view of d's cuboid over the steps of r in
// [mint, maxt], of the listed cells (all when nil), and an iterator with
// bounds, taken together under the head's lock once no group of the range
// is being committed: every delta is then in exactly one of the two.
func (db *DB) snapshot(r resolution, d *cellDict, cells []uint32, mint, maxt int64, bounds *pebble.IterOptions) (headView, *pebble.Iterator, error) {
	fine := db.res[0]
	first, last := fine.Row(mint), fine.Row(maxt)
	if maxt <= math.MaxInt64-r.stepMs {
		last = fine.Row(maxt + r.stepMs - 1) // the fine steps of the last step of r
	}
	h := db.head
	h.mu.Lock()
	defer h.mu.Unlock()
	h.waitLocked(first, last)
	iter, err := db.pdb.NewIter(bounds)
	if err != nil {
		return headView{}, nil, err
	}
	return h.viewLocked(db.byID[d.fam].idx, d.cuboid, first, last, cells), iter, nil
}

// cellRowBounds are the bounds of the data keys of sorted cells in the rows
// of r over [mint, maxt].
func cellRowBounds(r resolution, d *cellDict, cells []uint32, mint, maxt int64) *pebble.IterOptions {
	r = r.keys()
	return dataBounds(
		makeDataKey(r.stepSec, r.Row(mint), d.fam, d.cuboid, cells[0]),
		makeDataKey(r.stepSec, r.Row(maxt), d.fam, d.cuboid, cells[len(cells)-1]))
}

// readError wraps a read's error, counting corruption.
func (db *DB) readError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ErrCorrupt) {
		db.metrics.corruptions.Inc()
	}
	return fmt.Errorf("tsdb: cannot read steps: %w", err)
}

// seekCells is the most cells Scan reads cell by cell, with one iterator
// seeking from row to row of each, rather than with a cursor per row: a
// cursor costs an iterator, worth it only when it serves many cells.
const seekCells = 32

// seekRows reads cells one after the other with iter: for each, one seek
// per stored row of the range, skipping rows without data by the seeks
// themselves, plus what the head holds of it. It appends each cell's steps
// to buf and passes them to fn, then reuses that part of buf; with fn nil
// it keeps every step in buf, which it returns. It closes iter.
func (db *DB) seekRows(iter *pebble.Iterator, r resolution, d *cellDict, cells []uint32, mint, maxt int64, view *headView, buf []Step, fn func(cell uint32, steps []Step) error) ([]Step, error) {
	kr := r.keys()
	first, last := kr.Row(mint), kr.Row(maxt)
	var dec stepDecoder
	defer dec.release()
	var hs headSteps
	defer hs.release()
	ar := aliasReader{from: iter}
	defer ar.close()
	for _, cell := range cells {
		n := len(buf)
		for row := first; row <= last; {
			seek := makeDataKey(kr.stepSec, row, d.fam, d.cuboid, cell)
			if !iter.SeekGE(seek[:]) {
				break
			}
			k, err := parseDataKey(iter.Key())
			if err != nil {
				return buf, errors.Join(err, iter.Close())
			}
			if k.row != row || k.fam != d.fam || k.cuboid != d.cuboid || k.cell != cell {
				// Rows between here and the key found hold nothing.
				row = max(row+1, k.row)
				continue
			}
			v, err := iter.ValueAndErr()
			if err != nil {
				return buf, errors.Join(err, iter.Close())
			}
			key, v, err := ar.resolve(iter.Key(), v)
			if err != nil {
				return buf, errors.Join(err, iter.Close())
			}
			if buf, err = dec.decode(r, row, v, mint, maxt, buf); err != nil {
				return buf, errors.Join(corruptRowError(key, err), iter.Close())
			}
			row++
		}
		if err := iter.Error(); err != nil {
			return buf, errors.Join(err, iter.Close())
		}
		buf = hs.add(db.res[0], r, view, cell, mint, maxt, buf, n)
		if fn != nil && len(buf) > n {
			if err := fn(cell, buf[n:]); err != nil {
				return buf, errors.Join(err, iter.Close())
			}
			buf = buf[:n]
		}
	}
	return buf, iter.Close()
}

// headSteps is a read's scratch space for adding the head's steps of a cell
// to its stored ones.
type headSteps struct {
	rows   *[2]denseRow
	steps  []Step
	merged []Step
}

var headRowPool = sync.Pool{New: func() any { return new([2]denseRow) }}

// add adds the head's steps of cell to buf[from:], the cell's stored steps
// (ascending), and returns buf.
func (hs *headSteps) add(fine, r resolution, view *headView, cell uint32, mint, maxt int64, buf []Step, from int) []Step {
	if len(view.groups) == 0 {
		return buf
	}
	if hs.rows == nil {
		hs.rows = headRowPool.Get().(*[2]denseRow)
	}
	hs.steps = view.steps(fine, r, cell, mint, maxt, &hs.rows[0], &hs.rows[1], hs.steps[:0])
	if len(hs.steps) == 0 {
		return buf
	}
	hs.merged = mergeSteps(hs.merged[:0], buf[from:], hs.steps)
	return append(buf[:from], hs.merged...)
}

func (hs *headSteps) release() {
	if hs.rows != nil {
		headRowPool.Put(hs.rows)
	}
}

// dataBounds returns the iterator bounds of the data keys from lo to hi,
// both included. Keys are fixed-width, so hi followed by a zero byte is the
// first key after hi: no overflow at the largest row or cell.
func dataBounds(lo, hi dataKey) *pebble.IterOptions {
	upper := make([]byte, dataKeyLen+1)
	copy(upper, hi[:])
	return &pebble.IterOptions{LowerBound: lo[:], UpperBound: upper}
}

// stepDecoder decodes the steps of rows of one resolution: its own, or, for
// a hosted finest resolution, the fine part of its host's rows.
type stepDecoder struct {
	row  rowDecoder
	fine *denseFine
}

// decode appends the steps of r in the row value v of the row numbered row
// (of r's host when r is hosted) whose start lies in [mint, maxt].
func (d *stepDecoder) decode(r resolution, row int64, v []byte, mint, maxt int64, steps []Step) ([]Step, error) {
	if r.host == nil {
		return decodeSteps(&d.row, r, row, v, mint, maxt, steps)
	}
	if d.fine == nil {
		d.fine = finePool.Get().(*denseFine)
	}
	return d.fine.appendFineSteps(r, *r.host, row, v, mint, maxt, steps)
}

func (d *stepDecoder) release() {
	releaseFine(d.fine)
	d.fine = nil
}

// decodeSteps appends the steps of a row value whose start lies in
// [mint, maxt].
func decodeSteps(dec *rowDecoder, r resolution, row int64, v []byte, mint, maxt int64, steps []Step) ([]Step, error) {
	base := row * r.rowSpanMs
	for dec.init(v); ; {
		slot, sum, count, ok := dec.next()
		if !ok {
			break
		}
		t := base + int64(slot)*r.stepMs
		if t > maxt {
			break
		}
		if t >= mint {
			steps = append(steps, Step{T: t, Sum: sum, Count: count})
		}
	}
	return steps, dec.err
}

// cursor iterates the keys of one cuboid in one row.
type cursor struct {
	iter  *pebble.Iterator
	row   int64
	valid bool
	cell  uint32 // the cell of the current key, when valid
	err   error
}

type cursors struct {
	fam    uint16
	cuboid schema.CuboidID
	stepS  uint32
	list   []*cursor
	alias  aliasReader // follows alias rows, cloned from the first cursor
}

// openCursors opens a cursor on each row of [mint, maxt] that holds data
// of the cuboid, found by seeking from row to row with probe, which it
// closes; each cursor is a clone of it, with the same view of the store.
func (db *DB) openCursors(probe *pebble.Iterator, r resolution, d *cellDict, mint, maxt int64) (*cursors, error) {
	cs := &cursors{fam: d.fam, cuboid: d.cuboid, stepS: r.stepSec}
	first, last := r.Row(mint), r.Row(maxt)
	for row := first; row <= last; {
		seek := makeDataKey(r.stepSec, row, d.fam, d.cuboid, 0)
		if !probe.SeekGE(seek[:]) {
			break
		}
		k, err := parseDataKey(probe.Key())
		if err != nil {
			return cs, errors.Join(err, probe.Close())
		}
		if k.row != row || k.fam != d.fam || k.cuboid != d.cuboid {
			row = max(row+1, k.row)
			continue
		}
		iter, err := probe.Clone(pebble.CloneOptions{IterOptions: dataBounds(
			makeDataKey(r.stepSec, row, d.fam, d.cuboid, 0),
			makeDataKey(r.stepSec, row, d.fam, d.cuboid, math.MaxUint32))})
		if err != nil {
			return cs, errors.Join(err, probe.Close())
		}
		c := &cursor{iter: iter, row: row}
		if cs.alias.from == nil {
			cs.alias.from = iter
		}
		c.set(iter.First())
		cs.list = append(cs.list, c)
		if c.err != nil {
			return cs, errors.Join(c.err, probe.Close())
		}
		row++
	}
	return cs, errors.Join(probe.Error(), probe.Close())
}

// set records the cursor's position after a move.
func (c *cursor) set(valid bool) {
	c.valid = valid
	if !valid {
		c.err = c.iter.Error()
		return
	}
	k, err := parseDataKey(c.iter.Key())
	if err != nil {
		c.valid, c.err = false, err
		return
	}
	c.cell = k.cell
}

// merge walks the cursors by cell: the listed cells, or every cell a
// cursor or the head's view holds when cells is nil. The head's steps add
// to the stored ones.
func (cs *cursors) merge(fine, r resolution, cells []uint32, mint, maxt int64, view *headView, fn func(cell uint32, steps []Step) error) error {
	var steps []Step
	var dec stepDecoder
	defer dec.release()
	var hs headSteps
	defer hs.release()
	var held []uint32 // cells the head holds, when walking every cell
	if cells == nil {
		held = view.cellIDs()
	}
	for i := 0; ; i++ {
		var cell uint32
		if cells != nil {
			if i == len(cells) {
				return nil
			}
			cell = cells[i]
		} else {
			found := len(held) > 0
			if found {
				cell = held[0]
			}
			for _, c := range cs.list {
				if c.valid && (!found || c.cell < cell) {
					cell, found = c.cell, true
				}
			}
			if !found {
				return nil
			}
			if len(held) > 0 && held[0] == cell {
				held = held[1:]
			}
		}
		steps = steps[:0]
		for _, c := range cs.list {
			if c.valid && c.cell < cell {
				// One Next reaches an adjacent cell; anything further
				// is a seek.
				c.set(c.iter.Next())
				if c.valid && c.cell < cell {
					k := makeDataKey(cs.stepS, c.row, cs.fam, cs.cuboid, cell)
					c.set(c.iter.SeekGE(k[:]))
				}
			}
			if c.err != nil {
				return c.err
			}
			if !c.valid || c.cell != cell {
				continue
			}
			v, err := c.iter.ValueAndErr()
			if err != nil {
				return err
			}
			key, v, err := cs.alias.resolve(c.iter.Key(), v)
			if err != nil {
				return err
			}
			if steps, err = dec.decode(r, c.row, v, mint, maxt, steps); err != nil {
				return corruptRowError(key, err)
			}
			c.set(c.iter.Next())
			if c.err != nil {
				return c.err
			}
		}
		steps = hs.add(fine, r, view, cell, mint, maxt, steps, 0)
		if len(steps) > 0 {
			if err := fn(cell, steps); err != nil {
				return err
			}
		}
	}
}

func (cs *cursors) close() error {
	err := cs.alias.close()
	for _, c := range cs.list {
		err = errors.Join(err, c.iter.Close())
	}
	return err
}

// retained raises mint to the first step start still within r's
// retention: a step that ended at or before now minus the retention is
// expired, whether or not the retention pass has deleted its row yet.
func (db *DB) retained(r resolution, mint int64) int64 {
	return max(mint, db.opts.now().UnixMilli()-r.retentionMs-r.stepMs+1)
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

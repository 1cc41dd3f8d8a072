package tsdb

import (
	"errors"
	"fmt"
	"math"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
)

// Presence bitmaps (prefix 0x06) record, per (resolution, row, family,
// cuboid), the cells that have data in that row. The writer writes them in
// the batch that writes the rows; the retention pass deletes them with their
// rows, and learns from them, without reading data, which cells have no data
// left; the label API learns from them which cells have data in a time
// range.

// presence is the writer's cache of presence bitmaps, so that a row whose
// cells already have data (a row written again for late deltas, a coarse
// row the next group adds to) costs no read. It holds at most limit
// bitmaps, which bounds its memory whatever the time range stored. The
// writer and the retention pass own it, under DB.write.
type presence struct {
	limit  int
	cache  map[presenceKey]*roaring.Bitmap
	staged map[presenceKey]*roaring.Bitmap // written by the batch in flight
	val    []byte
	key    []byte
}

// stagePresence adds to b the presence of cells in the row pk: when the
// bitmap lacks some of them, it is rewritten whole with them.
func (db *DB) stagePresence(b *groupTable, pk presenceKey, cells *roaring.Bitmap) error {
	p := &db.presence
	cur, err := db.presenceList(pk)
	if err != nil {
		return err
	}
	if roaring.AndNot(cells, cur).IsEmpty() {
		return nil
	}
	next := roaring.Or(cur, cells)
	p.key = pk.append(p.key[:0])
	p.val = appendBitmap(p.val[:0], next)
	b.Set(p.key, p.val)
	p.staged[pk] = next
	return nil
}

// presenceList returns the committed presence bitmap of pk, from the cache
// or from Pebble. The caller must not modify it.
func (db *DB) presenceList(pk presenceKey) (*roaring.Bitmap, error) {
	p := &db.presence
	if l := p.staged[pk]; l != nil {
		return l, nil
	}
	if l := p.cache[pk]; l != nil {
		return l, nil
	}
	p.key = pk.append(p.key[:0])
	v, closer, err := db.pdb.Get(p.key)
	var l *roaring.Bitmap
	switch {
	case errors.Is(err, pebble.ErrNotFound):
		l = roaring.New()
	case err != nil:
		return nil, fmt.Errorf("tsdb: cannot read presence %x: %w", p.key, err)
	default:
		l, err = db.decodePresence(p.key, v)
		closer.Close()
		if err != nil {
			return nil, err
		}
	}
	p.remember(pk, l)
	return l, nil
}

// decodePresence decodes the presence bitmap v stored under key; one that
// does not decode is corruption, counted and naming the key.
func (db *DB) decodePresence(key, v []byte) (*roaring.Bitmap, error) {
	l, err := decodeBitmap(v)
	if err != nil {
		db.metrics.corruptions.Inc()
		return nil, fmt.Errorf("%w: presence %x: %v", ErrCorrupt, key, err)
	}
	return l, nil
}

func (p *presence) remember(pk presenceKey, l *roaring.Bitmap) {
	if len(p.cache) >= p.limit {
		// Rows are written in time order, give or take late deltas: what
		// the cache held is mostly rows no group will touch again.
		clear(p.cache)
	}
	p.cache[pk] = l
}

// publish moves the committed batch's bitmaps into the cache.
func (p *presence) publish() {
	for pk, l := range p.staged {
		p.remember(pk, l)
	}
	clear(p.staged)
}

// cellsWithData returns the cells of one cuboid that have data in a row of
// resolution r overlapping [mint, maxt]: the union of the presence bitmaps
// of those rows. mint is at most maxt.
func (db *DB) cellsWithData(r resolution, fam uint16, cuboid schema.CuboidID, mint, maxt int64) (*roaring.Bitmap, error) {
	lo := appendRowBound(nil, prefixPresence, r.stepSec, r.Row(mint))
	hi := appendRowBound(nil, prefixPresence, r.stepSec, r.Row(maxt))
	hi = append(hi, 0xff, 0xff, 0xff, 0xff, 0xff) // after every key of the last row
	var lists []*roaring.Bitmap
	err := db.eachPresence(lo, hi, false, func(pk presenceKey, list func() (*roaring.Bitmap, error)) (bool, error) {
		if pk.fam != fam || pk.cuboid != cuboid {
			return true, nil
		}
		l, err := list()
		if err != nil {
			return false, err
		}
		lists = append(lists, l)
		return true, nil
	})
	if err != nil {
		return nil, err
	}
	return roaring.FastOr(lists...), nil
}

// heldCells returns the cells of d's cuboid that the head holds data of in
// a row of resolution r overlapping [mint, maxt]: the head holds the finest
// rows, so those of r's rows are read, not only those of the range.
func (db *DB) heldCells(d *cellDict, r resolution, mint, maxt int64) *roaring.Bitmap {
	// Each step is a multiple of the finest, so r's row n covers the finest
	// rows [n*k, (n+1)*k); row numbers are far from overflowing.
	k := r.rowSpanMs / db.res[0].rowSpanMs
	h := db.head
	h.mu.Lock()
	v := h.viewLocked(db.byID[d.fam].idx, d.cuboid, r.Row(mint)*k, (r.Row(maxt)+1)*k-1, nil)
	h.mu.Unlock()
	return roaring.BitmapOf(v.cellIDs()...)
}

// rangeResolution picks the resolution whose presence answers "which cells
// have data in [mint, maxt]": the finest that still keeps mint, whose rows
// are the shortest, so the answer is the tightest.
func (db *DB) rangeResolution(now, mint int64) resolution {
	for _, r := range db.res {
		if mint >= now-r.retentionMs {
			return r
		}
	}
	return db.res[len(db.res)-1]
}

// fullRange reports whether [mint, maxt] means "any time".
func fullRange(mint, maxt int64) bool { return mint == math.MinInt64 && maxt == math.MaxInt64 }

package tsdb

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/prometheus/model/labels"
)

// cellDict is the index of one (family, cuboid): its cell dictionary, which
// maps cells to uint32 IDs, and its postings, which map each (label, value)
// to the IDs of the cells holding it. Both are held whole in memory, so
// their size follows the number of live cells and nothing else
// (docs/format/tsdb.md, "Memory"). Only the dictionary is persisted (prefix
// 0x02): Open builds the postings from it.
//
// Apply assigns an ID to a new cell and writes its dictionary entry in the
// batch that carries the cell's first data; the retention pass removes a
// cell whose data is all gone, and its ID is reused for the next new cell.
// Readers see a change, to the dictionary or the postings, only once its
// batch committed.
type cellDict struct {
	fam    uint16
	cuboid schema.CuboidID
	labels []string

	// Owned by Apply and the retention pass, which run under DB.apply.
	values  *valueTable      // the store's interned values, shared by every cellDict
	ids     cellIndex        // a cell's value numbers → its ID, committed or pending
	free    *roaring.Bitmap  // IDs below next that no committed or pending cell holds
	next    uint32           // the lowest ID never assigned
	added   []pendingCell    // cells the batch in flight adds
	removed []uint32         // cells the batch in flight removes
	staged  []stagedPostings // postings lists the batch in flight replaces, published with it

	mu sync.RWMutex
	// cells holds each committed cell's values by ID, nil for a free ID.
	// The values are the interned strings of d.values: one allocation a
	// cell, its slice.
	cells [][]string
	// live holds the committed cell IDs.
	live *roaring.Bitmap
	// postings is indexed by label slot (schema.Cuboid.Labels order).
	// Lists are never modified once published, only replaced.
	postings []labelIndex
}

// labelIndex is the postings of one label of a cuboid.
type labelIndex struct {
	lists  map[string]*roaring.Bitmap // value → cells holding it
	values []string                   // the keys of lists, ascending
}

type pendingCell struct {
	id     uint32
	key    cellKey
	values []string
}

// stagedPostings is the new list of one (label, value); nil deletes it.
type stagedPostings struct {
	slot  int
	value string
	list  *roaring.Bitmap
}

func newCellDict(fam uint16, c schema.Cuboid, values *valueTable) *cellDict {
	d := &cellDict{
		fam:      fam,
		cuboid:   c.ID,
		labels:   c.Labels,
		values:   values,
		ids:      newCellIndex(len(c.Labels)),
		free:     roaring.New(),
		live:     roaring.New(),
		postings: make([]labelIndex, len(c.Labels)),
	}
	for i := range d.postings {
		d.postings[i].lists = map[string]*roaring.Bitmap{}
	}
	return d
}

// add assigns an ID to a new cell whose values are values, adds its
// dictionary entry to b, and returns the ID and the cell's key. The cell
// takes the lowest free ID, so IDs stay dense while cells come and go, and
// holds its values in d.values from then on.
func (d *cellDict) add(b *pebble.Batch, values []string, keyBuf, valBuf *[]byte) (uint32, cellKey, error) {
	id, fromFree := d.next, !d.free.IsEmpty()
	switch {
	case fromFree:
		id = d.free.Minimum()
	case d.next == math.MaxUint32:
		return 0, cellKey{}, fmt.Errorf("tsdb: family ID %d cuboid %d: no cell ID left", d.fam, d.cuboid)
	}
	*keyBuf = appendCellKey((*keyBuf)[:0], d.fam, d.cuboid, id)
	*valBuf = appendCellValues((*valBuf)[:0], values)
	if err := b.Set(*keyBuf, *valBuf, nil); err != nil {
		return 0, cellKey{}, fmt.Errorf("tsdb: cannot add cell to batch: %w", err)
	}
	if fromFree {
		d.free.Remove(id)
	} else {
		d.next++
	}
	c := pendingCell{id: id, values: make([]string, len(values))}
	for i, v := range values {
		c.key[i], c.values[i] = d.values.intern(v)
	}
	d.ids.put(&c.key, id)
	d.added = append(d.added, c)
	return id, c.key, nil
}

// remove adds to b the removal of committed cells' dictionary entries; stage
// then takes their IDs out of the postings.
func (d *cellDict) remove(b *pebble.Batch, ids []uint32, keyBuf *[]byte) error {
	for _, id := range ids {
		*keyBuf = appendCellKey((*keyBuf)[:0], d.fam, d.cuboid, id)
		if err := b.Delete(*keyBuf, nil); err != nil {
			return fmt.Errorf("tsdb: cannot add cell removal to batch: %w", err)
		}
	}
	d.removed = append(d.removed, ids...)
	return nil
}

// stage builds, for publish, the new postings lists of every (label, value)
// that the batch's added and removed cells change. Only Apply and the
// retention pass publish lists, so it reads the published ones without the
// lock.
func (d *cellDict) stage() {
	if len(d.added) == 0 && len(d.removed) == 0 {
		return
	}
	type labelValue struct {
		slot  int
		value string
	}
	add := map[labelValue][]uint32{}
	del := map[labelValue][]uint32{}
	for _, c := range d.added {
		for slot, v := range c.values {
			lv := labelValue{slot, v}
			add[lv] = append(add[lv], c.id)
		}
	}
	for _, id := range d.removed {
		for slot, v := range d.cells[id] {
			lv := labelValue{slot, v}
			del[lv] = append(del[lv], id)
		}
	}
	changed := make([]labelValue, 0, len(add)+len(del))
	for lv := range add {
		changed = append(changed, lv)
	}
	for lv := range del {
		if add[lv] == nil {
			changed = append(changed, lv)
		}
	}
	for _, lv := range changed {
		list := roaring.New()
		if old := d.postings[lv.slot].lists[lv.value]; old != nil {
			list = old.Clone()
		}
		for _, id := range del[lv] {
			list.Remove(id)
		}
		list.AddMany(add[lv])
		if list.IsEmpty() {
			list = nil
		} else {
			list.RunOptimize()
		}
		d.staged = append(d.staged, stagedPostings{slot: lv.slot, value: lv.value, list: list})
	}
}

// publish makes the committed batch's changes visible to readers and
// returns how many cells it added and removed.
func (d *cellDict) publish() (added, removed int) {
	d.mu.Lock()
	for _, c := range d.added {
		if int(c.id) >= len(d.cells) {
			d.cells = append(d.cells, make([][]string, int(c.id)+1-len(d.cells))...)
		}
		d.cells[c.id] = c.values
		d.live.Add(c.id)
	}
	gone := make([]cellKey, len(d.removed))
	for i, id := range d.removed {
		gone[i] = d.values.keyOf(d.cells[id])
		d.cells[id] = nil
		d.live.Remove(id)
	}
	newValues := make([][]string, len(d.postings))
	dropped := make([]map[string]bool, len(d.postings))
	for _, s := range d.staged {
		li := &d.postings[s.slot]
		_, had := li.lists[s.value]
		switch {
		case s.list == nil:
			delete(li.lists, s.value)
			if dropped[s.slot] == nil {
				dropped[s.slot] = map[string]bool{}
			}
			dropped[s.slot][s.value] = true
		case !had:
			newValues[s.slot] = append(newValues[s.slot], s.value)
			fallthrough
		default:
			li.lists[s.value] = s.list
		}
	}
	for slot := range d.postings {
		li := &d.postings[slot]
		if dropped[slot] != nil {
			li.values = slices.DeleteFunc(li.values, func(v string) bool { return dropped[slot][v] })
		}
		if len(newValues[slot]) > 0 {
			li.values = mergeSorted(li.values, newValues[slot])
		}
	}
	d.mu.Unlock()

	// The apply-owned side: the removed cells' IDs become free, and their
	// values are released.
	for i, id := range d.removed {
		d.ids.delete(&gone[i])
		d.values.releaseKey(&gone[i], len(d.labels))
		d.free.Add(id)
	}
	added, removed = len(d.added), len(d.removed)
	d.reset()
	return added, removed
}

// rollback forgets the changes of a batch that did not commit: the IDs it
// assigned become free again.
func (d *cellDict) rollback() {
	for i := range d.added {
		c := &d.added[i]
		d.ids.delete(&c.key)
		d.values.releaseKey(&c.key, len(d.labels))
		d.free.Add(c.id)
	}
	d.reset()
}

func (d *cellDict) reset() {
	clear(d.added)
	clear(d.staged)
	d.added, d.removed, d.staged = d.added[:0], d.removed[:0], d.staged[:0]
}

// dirty reports whether the batch in flight changes d.
func (d *cellDict) dirty() bool { return len(d.added) > 0 || len(d.removed) > 0 }

// mergeSorted merges unsorted, distinct new values into an ascending slice
// that holds none of them.
func mergeSorted(values, add []string) []string {
	slices.Sort(add)
	out := make([]string, 0, len(values)+len(add))
	i, j := 0, 0
	for i < len(values) && j < len(add) {
		if values[i] < add[j] {
			out = append(out, values[i])
			i++
		} else {
			out = append(out, add[j])
			j++
		}
	}
	out = append(out, values[i:]...)
	return append(out, add[j:]...)
}

// match returns the committed cells whose labels satisfy every matcher, as
// Prometheus defines them: a matcher on a label the cuboid lacks sees "",
// and a cell whose value is "" lacks the label. Matchers on "__name__" are
// ignored. The result may be one of d's own bitmaps: callers only read it,
// and only under d.mu.
func (d *cellDict) match(ms []*labels.Matcher) *roaring.Bitmap {
	var set *roaring.Bitmap // nil: every cell so far
	// Equality matchers first: one lookup each, and the most selective.
	for _, pass := range []bool{true, false} {
		for _, m := range ms {
			if m.Name == labels.MetricName || (m.Type == labels.MatchEqual) != pass {
				continue
			}
			slot := slices.Index(d.labels, m.Name)
			if slot < 0 {
				if !m.Matches("") {
					return roaring.New()
				}
				continue
			}
			s := d.eval(slot, m)
			if set == nil {
				set = s
			} else {
				set = roaring.And(set, s)
			}
			if set.IsEmpty() {
				return set
			}
		}
	}
	if set == nil {
		return d.live
	}
	return set
}

// eval returns the cells one matcher on a label of the cuboid selects.
func (d *cellDict) eval(slot int, m *labels.Matcher) *roaring.Bitmap {
	li := &d.postings[slot]
	switch m.Type {
	case labels.MatchEqual:
		if l := li.lists[m.Value]; l != nil {
			return l
		}
		return roaring.New()
	case labels.MatchNotEqual:
		if l := li.lists[m.Value]; l != nil {
			return roaring.AndNot(d.live, l)
		}
		return d.live
	}
	// A regular expression: the union of the lists of the values the
	// expression (not the matcher, for !~) accepts, complemented for !~.
	positive := m.Type == labels.MatchRegexp
	var lists []*roaring.Bitmap
	if set := m.SetMatches(); set != nil {
		for _, v := range set {
			if l := li.lists[v]; l != nil {
				lists = append(lists, l)
			}
		}
	} else {
		values := li.values
		if p := m.Prefix(); p != "" {
			lo, _ := slices.BinarySearch(values, p)
			n := sort.Search(len(values)-lo, func(i int) bool { return !strings.HasPrefix(values[lo+i], p) })
			values = values[lo : lo+n]
		}
		for _, v := range values {
			if m.Matches(v) == positive {
				lists = append(lists, li.lists[v])
			}
		}
	}
	u := roaring.FastOr(lists...)
	if !positive {
		return roaring.AndNot(d.live, u)
	}
	return u
}

// labelValues returns the non-empty values of one label held by a cell of
// sel (nil: any committed cell), ascending, at most limit of them (0: no
// limit). Call it under d.mu.
func (d *cellDict) labelValues(slot int, sel *roaring.Bitmap, limit int) []string {
	li := &d.postings[slot]
	var out []string
	if sel != nil && sel.GetCardinality() < uint64(len(li.values)) {
		// Fewer cells than values: look the cells up.
		seen := map[string]bool{}
		for it := sel.Iterator(); it.HasNext(); {
			if v := d.cells[it.Next()][slot]; v != "" && !seen[v] {
				seen[v] = true
				out = append(out, v)
			}
		}
		slices.Sort(out)
		if limit > 0 && len(out) > limit {
			out = out[:limit]
		}
		return out
	}
	for _, v := range li.values {
		if v == "" || (sel != nil && !li.lists[v].Intersects(sel)) {
			continue
		}
		out = append(out, v)
		if len(out) == limit {
			break
		}
	}
	return out
}

// loadCells reads the cell dictionaries of the schema's families and builds
// their postings.
func (db *DB) loadCells() error {
	iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixCell}, UpperBound: []byte{prefixCell + 1}})
	if err != nil {
		return fmt.Errorf("tsdb: cannot read the cell dictionary: %w", err)
	}
	defer iter.Close()
	total := 0
	for valid := iter.First(); valid; valid = iter.Next() {
		famID, cuboid, cell, err := parseCellKey(iter.Key())
		if err != nil {
			return err
		}
		fs := db.byID[famID]
		if fs == nil {
			continue // a family no longer in the schema
		}
		d := fs.cuboid(cuboid)
		if d == nil {
			// loadFamilies checked the dimensions, which fix the cuboids.
			return fmt.Errorf("%w: cell dictionary key %x: family %q has no cuboid %d", ErrCorrupt, iter.Key(), fs.fam.Name, cuboid)
		}
		values, err := decodeCellValues(string(iter.Value()))
		if err == nil && len(values) != len(d.labels) {
			err = fmt.Errorf("%d values for %d labels", len(values), len(d.labels))
		}
		if err != nil {
			return fmt.Errorf("%w: cell dictionary entry %x: %v", ErrCorrupt, iter.Key(), err)
		}
		// The cell holds the interned values, not substrings of the
		// entry: a value is kept once however many cells hold it.
		var key cellKey
		for i, v := range values {
			key[i], values[i] = db.values.intern(v)
		}
		if _, dup := d.ids.get(&key); dup {
			return fmt.Errorf("%w: cell dictionary entry %x repeats an earlier cell", ErrCorrupt, iter.Key())
		}
		// Keys are ascending, so IDs are: the gaps are free IDs.
		d.free.AddRange(uint64(d.next), uint64(cell))
		d.next = cell + 1
		d.ids.put(&key, cell)
		d.cells = append(d.cells, make([][]string, int(cell)+1-len(d.cells))...)
		d.cells[cell] = values
		d.live.Add(cell)
		for slot, v := range values {
			li := &d.postings[slot]
			l := li.lists[v]
			if l == nil {
				l = roaring.New()
				li.lists[v] = l
				li.values = append(li.values, v)
			}
			l.Add(cell)
		}
		total++
	}
	if err := iter.Error(); err != nil {
		return fmt.Errorf("tsdb: cannot read the cell dictionary: %w", err)
	}
	for _, fs := range db.byID {
		for _, d := range fs.cuboids {
			for slot := range d.postings {
				li := &d.postings[slot]
				slices.Sort(li.values)
				for _, l := range li.lists {
					l.RunOptimize()
				}
			}
		}
	}
	db.metrics.cells.Set(float64(total))
	db.log.Info("loaded cell dictionaries", "cells", total)
	return nil
}

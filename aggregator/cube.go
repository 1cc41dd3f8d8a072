package aggregator

import (
	"math/bits"
	"slices"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// family is the aggregator's precomputed view of a schema family.
type family struct {
	*schema.Family
	// masks hold, per cuboid ID, a bit per family label the cuboid keeps.
	masks  []uint16
	finest schema.CuboidID
	// order lists the cuboids but the finest, those that keep the most
	// labels first; below[c] lists the cuboids whose labels are a subset
	// of c's, c among them.
	order []schema.CuboidID
	below [][]schema.CuboidID
}

// cuboidSet holds a bit per cuboid ID: a family has at most
// 2^schema.MaxLevels cuboids.
type cuboidSet [1 << schema.MaxLevels / 64]uint64

func (s *cuboidSet) has(c schema.CuboidID) bool { return s[c/64]&(1<<(c%64)) != 0 }

func (s *cuboidSet) add(c schema.CuboidID) { s[c/64] |= 1 << (c % 64) }

// newFamily precomputes the aggregator's view of f.
func newFamily(f *schema.Family) *family {
	cuboids := f.Cuboids()
	fam := &family{Family: f, finest: f.Finest().ID, masks: make([]uint16, len(cuboids))}
	for _, c := range cuboids {
		for _, s := range c.Slots {
			fam.masks[c.ID] |= 1 << s
		}
	}
	fam.below = make([][]schema.CuboidID, len(cuboids))
	for c, mask := range fam.masks {
		id := schema.CuboidID(c)
		if id != fam.finest {
			fam.order = append(fam.order, id)
		}
		for sub, m := range fam.masks {
			if m&^mask == 0 {
				fam.below[c] = append(fam.below[c], schema.CuboidID(sub))
			}
		}
	}
	slices.SortStableFunc(fam.order, func(x, y schema.CuboidID) int {
		return bits.OnesCount16(fam.masks[y]) - bits.OnesCount16(fam.masks[x])
	})
	return fam
}

// cellKey identifies one cell: a family, a cuboid, and the interned value of
// each label the cuboid keeps (0 elsewhere). It is a fixed-size comparable
// array so that looking a cell up allocates nothing.
type cellKey struct {
	fam    uint16
	cuboid schema.CuboidID
	v      [schema.MaxLevels]uint32
}

type agg struct {
	sum   float64
	count uint64
}

// window is the cube of one window. An event's finest cell (a leaf) is found
// with one map lookup; the leaf's fan lists where its value goes in every
// cuboid, so an event of a known leaf costs one lookup, not one per cuboid.
type window struct {
	// leaves maps a finest cell to the offset of its fan in fan.
	leaves map[cellKey]int32
	// fan holds, per leaf, the aggs index of the leaf's cell in each
	// cuboid, by cuboid ID.
	fan []int32
	// cells maps each cell of every cuboid but the finest to the fan of
	// the first leaf that reached it, which holds the cell's aggs index
	// and those of every cell below it (cells of cuboids keeping a subset
	// of its labels).
	cells  map[cellKey]int32
	aggs   []agg
	finest []int // leaves per family, for the cardinality limit
	room   int   // leaves its maps were made for by reserve
}

func newWindow(families int) *window {
	return &window{leaves: map[cellKey]int32{}, cells: map[cellKey]int32{}, finest: make([]int, families)}
}

// spareCells bounds the room of the flushed windows the aggregator keeps
// for reuse, in cells: a window's maps and slices keep their room when
// cleared, so a backfill, which opens windows as fast as it flushes them,
// allocates none. A cut takes at most about cutCells cells of such
// windows, so that much room covers the windows the next one opens.
const spareCells = cutCells

// spareRoom is the room of a window kept for reuse, in cells.
func (w *window) spareRoom() int { return max(cap(w.aggs), reserveAt) }

// newWindowLocked returns an empty window, a spare one if there is one.
func (a *Aggregator) newWindowLocked() *window {
	if n := len(a.mu.spare); n > 0 {
		w := a.mu.spare[n-1]
		a.mu.spare = a.mu.spare[:n-1]
		a.mu.spareRoom -= w.spareRoom()
		return w
	}
	return newWindow(len(a.fams))
}

// recycle keeps flushed windows, emptied, for newWindowLocked.
func (a *Aggregator) recycle(todo []ready) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range todo {
		w := r.w
		if a.mu.spareRoom+w.spareRoom() > spareCells {
			return
		}
		a.mu.spareRoom += w.spareRoom()
		clear(w.leaves)
		clear(w.cells)
		clear(w.finest)
		w.fan, w.aggs = w.fan[:0], w.aggs[:0]
		a.mu.spare = append(a.mu.spare, w)
	}
}

// reserveAt is the number of leaves at which a window that is growing takes
// the room the last cut's largest window needed, at once: growing a map or
// slice of a million entries step by step copies it many times over, while
// a window of a few late events must not take a full window's room.
const reserveAt = 256

// sizeHint is the size of the largest window the last cut took.
type sizeHint struct{ leaves, cells, fan int }

// reserve makes room for h at once, unless the window has it.
func (w *window) reserve(h sizeHint) {
	if h.leaves <= max(len(w.leaves), w.room) {
		return
	}
	w.room = h.leaves
	leaves := make(map[cellKey]int32, h.leaves)
	for k, v := range w.leaves {
		leaves[k] = v
	}
	cells := make(map[cellKey]int32, h.cells)
	for k, v := range w.cells {
		cells[k] = v
	}
	w.leaves, w.cells = leaves, cells
	w.fan = slices.Grow(w.fan, h.fan-len(w.fan))
	w.aggs = slices.Grow(w.aggs, h.cells+h.leaves-len(w.aggs))
}

// addLeaf creates a leaf, finding or creating its cell in every cuboid, and
// returns the offset of its fan. The cuboids are looked at most labels
// first: a cell found takes the fan of the leaf that first reached it, and
// with it the cells below, which then need no lookup of their own. A new
// leaf of a sparse window, whose coarse cells exist already, costs a few
// lookups instead of one per cuboid.
func (w *window) addLeaf(f *family, leaf cellKey) int32 {
	off := int32(len(w.fan))
	w.fan = slices.Grow(w.fan, len(f.masks))[:int(off)+len(f.masks)]
	fan := w.fan[off:]
	fan[f.finest] = int32(len(w.aggs))
	w.aggs = append(w.aggs, agg{})
	var done cuboidSet
	key := leaf
	for _, c := range f.order {
		if done.has(c) {
			continue
		}
		key.cuboid = c
		mask := f.masks[c]
		for j := range key.v {
			if mask&(1<<j) != 0 {
				key.v[j] = leaf.v[j]
			} else {
				key.v[j] = 0
			}
		}
		if first, ok := w.cells[key]; ok {
			for _, sub := range f.below[c] {
				fan[sub] = w.fan[first+int32(sub)]
				done.add(sub)
			}
			continue
		}
		fan[c] = int32(len(w.aggs))
		w.aggs = append(w.aggs, agg{})
		w.cells[key] = off
	}
	w.leaves[leaf] = off
	w.finest[leaf.fam]++
	return off
}

// MaxValue bounds the magnitude of an event's value and of a cell's sum for
// one window at one aggregator: 2^53, up to which float64 holds every
// integer exactly, so that sums of counts stay exact. A stored step adds up
// the sums of every aggregator and late flush, and a coarser step those of
// its finer steps, so a stored sum stays finite however many are added (it
// would take 2^970 of them to overflow); it stays exact while the true
// count is at most 2^53.
const MaxValue = 1 << 53

// addLocked rolls one event up into every cuboid of its family in the window
// starting at start, and returns how many cells it created there. It changes
// nothing and returns a reject reason when the event would create a finest
// cell beyond maxCells, or take a sum beyond MaxValue.
func (a *Aggregator) addLocked(ev *event, start int64, maxCells int) (int, wirepb.RejectReason) {
	w := a.mu.windows[start]
	if w == nil {
		w = a.newWindowLocked()
		a.mu.windows[start] = w
	}
	f := a.fams[ev.fam]
	leaf := cellKey{fam: uint16(ev.fam), cuboid: f.finest, v: ev.vals}
	off, ok := w.leaves[leaf]
	// Counter values are non-negative, so the apex cell (cuboid 0, every
	// label absent) holds the largest sum of the family's window: if it
	// stays finite, every cell does.
	apex, hasApex := int32(0), true
	if ok {
		apex = w.fan[off]
	} else {
		var first int32
		if first, hasApex = w.cells[cellKey{fam: uint16(ev.fam)}]; hasApex {
			apex = w.fan[first]
		}
	}
	if hasApex && w.aggs[apex].sum+ev.value > MaxValue {
		return 0, wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE
	}
	cells := len(w.aggs)
	if !ok {
		if w.finest[ev.fam] >= maxCells {
			return 0, wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT
		}
		off = w.addLeaf(f, leaf)
		if len(w.leaves) == reserveAt {
			w.reserve(a.mu.hint)
		}
	}
	for _, i := range w.fan[off : off+int32(len(f.masks))] {
		w.aggs[i].sum += ev.value
		w.aggs[i].count++
	}
	return len(w.aggs) - cells, noReason
}

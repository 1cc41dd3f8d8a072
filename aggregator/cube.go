package aggregator

import (
	"math/bits"
	"slices"

	"github.com/dimsum/dimsum/internal/mix"
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

// registry numbers the cells of the aggregator's windows, across windows: a
// finest cell (a leaf) keeps its number, and its fan, the numbers of its
// cells in every cuboid, from window to window. A window finds an event's
// cells by one lookup of its leaf here and an index a cuboid, however new
// the leaf is to the window: a sparse backfill, whose every event is a leaf
// new in its window, otherwise looked up the leaf's coarser cells anew in
// every window. Its cells outlive their windows until compactLocked drops
// those no open window holds.
type registry struct {
	// numbering tells this registry's numbers from those of the one it
	// replaced (compactLocked): a number names one cell within a numbering
	// of an incarnation, which the flushes carry for the combiners.
	numbering uint64
	// keys holds each cell's key, by number. It only grows, and its
	// elements never change, so a copy of the slice header taken under
	// the aggregator's lock stays valid outside it: compactLocked builds
	// a new registry rather than reuse this one.
	keys []cellKey
	// fanOf holds, by number, the offset in fan of a leaf's own fan, and
	// for a cell of a coarser cuboid that of the first leaf that reached
	// it, which holds the cell's number and those of every cell below it
	// (cells of cuboids keeping a subset of its labels).
	fanOf []int32
	// fan holds, per leaf, the number of the leaf's cell in each cuboid,
	// by cuboid ID.
	fan []int32
	// table finds a cell's number by its key.
	table cellTable
}

func newRegistry(numbering uint64) *registry { return &registry{numbering: numbering} }

// find returns the number of the cell of key k.
func (r *registry) find(k cellKey) (int32, bool) { return r.table.find(r.keys, k) }

// add registers a leaf, finding or numbering its cell in every cuboid, and
// returns the offset of its fan. The cuboids are looked at most labels
// first: a cell found takes the fan of the leaf that first reached it, and
// with it the cells below, which then need no lookup of their own. A new
// leaf whose coarse cells exist already costs a few lookups instead of one
// per cuboid.
func (r *registry) add(f *family, leaf cellKey) int32 {
	off := int32(len(r.fan))
	r.fan = slices.Grow(r.fan, len(f.masks))[:int(off)+len(f.masks)]
	fan := r.fan[off:]
	fan[f.finest] = r.number(leaf, off)
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
		if n, ok := r.find(key); ok {
			first := r.fanOf[n]
			for _, sub := range f.below[c] {
				fan[sub] = r.fan[first+int32(sub)]
				done.add(sub)
			}
			continue
		}
		fan[c] = r.number(key, off)
	}
	return off
}

// number numbers a new cell whose fan is at off.
func (r *registry) number(k cellKey, off int32) int32 {
	n := int32(len(r.keys))
	r.keys = append(r.keys, k)
	r.fanOf = append(r.fanOf, off)
	r.table.insert(r.keys, n)
	return n
}

// cellTable maps cell keys to their numbers in a registry: open addressing
// with linear probing over a power-of-two array of slots, at most half
// full. A slot holds a number plus one (0: empty) and the high bits of its
// key's hash, so that a probe reads a key only when those match: most
// lookups of a new cell's coarser cells miss, and a miss then reads no key.
// It takes about 24 bytes a cell, where a Go map holding the keys took
// some 60.
type cellTable struct {
	slots []tableSlot
	n     int
}

type tableSlot struct{ num, tag uint32 }

// hash is the key's hash for the registry's table.
func (k *cellKey) hash() uint64 { return mix.Words(uint64(k.fam)|uint64(k.cuboid)<<16, k.v[:]) }

func (t *cellTable) find(keys []cellKey, k cellKey) (int32, bool) {
	if len(t.slots) == 0 {
		return 0, false
	}
	h := k.hash()
	tag, mask := uint32(h>>32), uint64(len(t.slots)-1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := t.slots[i]
		if s.num == 0 {
			return 0, false
		}
		if s.tag == tag && keys[s.num-1] == k {
			return int32(s.num - 1), true
		}
	}
}

// insert adds number n, whose key is keys[n] and not in the table.
func (t *cellTable) insert(keys []cellKey, n int32) {
	if 2*(t.n+1) > len(t.slots) {
		old := t.slots
		t.slots = make([]tableSlot, max(2*len(old), 64))
		for _, s := range old {
			if s.num != 0 {
				t.place(keys[s.num-1].hash(), s.num)
			}
		}
	}
	t.place(keys[n].hash(), uint32(n)+1)
	t.n++
}

func (t *cellTable) place(h uint64, num uint32) {
	mask := uint64(len(t.slots) - 1)
	i := h & mask
	for t.slots[i].num != 0 {
		i = (i + 1) & mask
	}
	t.slots[i] = tableSlot{num: num, tag: uint32(h >> 32)}
}

// window is the cube of one window: an aggregate for each cell it holds, in
// the order the window made them, found by the cell's number in the
// registry.
type window struct {
	// slot maps a cell's number to 1 + the index of its aggregate, 0 for
	// a cell the window lacks, in pages of slotPage numbers, each made
	// when the window first holds a cell of its numbers: a window of a
	// few late events takes a few pages, not a slot for every registered
	// cell.
	slot   []*[slotPage]int32
	ids    []int32 // the number of each aggregate's cell
	aggs   []agg
	finest []int // leaves per family, for the cardinality limit
	leaves int   // all its families'
}

// slotPage is the numbers of a page of a window's slot (2 KiB), a power of
// two: a number's page is its high bits, its place in the page the low ones.
const (
	slotBits = 9
	slotPage = 1 << slotBits
	slotMask = slotPage - 1
)

// noPage stands for every page a window has not made: empty, never written.
var noPage = new([slotPage]int32)

func newWindow(families int) *window {
	return &window{finest: make([]int, families)}
}

// index is 1 + the index of the aggregate of cell id, 0 if the window
// lacks it.
func (w *window) index(id int32) int32 {
	if p := uint32(id) >> slotBits; p < uint32(len(w.slot)) {
		return w.slot[p][uint32(id)&slotMask]
	}
	return 0
}

// sum is the sum of cell id in the window, 0 if it lacks it.
func (w *window) sum(id int32) float64 {
	if i := w.index(id); i > 0 {
		return w.aggs[i-1].sum
	}
	return 0
}

// add gives cell id an aggregate and returns 1 + its index.
func (w *window) add(id int32) int32 {
	w.ids = append(w.ids, id)
	w.aggs = append(w.aggs, agg{})
	i := int32(len(w.aggs))
	w.set(id, i)
	return i
}

func (w *window) set(id, i int32) {
	p := int(uint32(id) >> slotBits)
	for len(w.slot) <= p {
		w.slot = append(w.slot, noPage)
	}
	if w.slot[p] == noPage {
		w.slot[p] = new([slotPage]int32)
	}
	w.slot[p][uint32(id)&slotMask] = i
}

// addFan adds (sum, count) to every cell of the leaf whose fan is at off,
// making those the window lacks, and returns how many it made.
func (w *window) addFan(r *registry, f *family, off int32, sum float64, count uint64) int {
	made := len(w.aggs)
	for _, id := range r.fan[off : off+int32(len(f.masks))] {
		i := w.index(id)
		if i == 0 {
			i = w.add(id)
		}
		w.aggs[i-1].sum += sum
		w.aggs[i-1].count += count
	}
	return len(w.aggs) - made
}

// newLeaf counts a leaf new to the window. A window reaching reserveAt
// leaves takes the room the last cut's largest window needed (hint cells)
// at once: growing a slice of a million entries step by step copies it many
// times over, while a window of a few late events must not take a full
// window's room.
func (w *window) newLeaf(fam, hint int) {
	w.finest[fam]++
	if w.leaves++; w.leaves == reserveAt {
		w.ids = slices.Grow(w.ids, max(hint-len(w.ids), 0))
		w.aggs = slices.Grow(w.aggs, max(hint-len(w.aggs), 0))
	}
}

// reset empties the window for reuse, keeping its room.
func (w *window) reset() {
	for _, id := range w.ids {
		w.slot[uint32(id)>>slotBits][uint32(id)&slotMask] = 0
	}
	clear(w.finest)
	w.leaves = 0
	w.ids, w.aggs = w.ids[:0], w.aggs[:0]
}

// spareCells bounds the room of the flushed windows the aggregator keeps
// for reuse, in cells: a window's slices keep their room when emptied, so a
// backfill, which opens windows as fast as it flushes them, allocates none.
// A cut takes at most about cutCells cells of such windows, so that much
// room covers the windows the next one opens.
const spareCells = cutCells

// spareRoom is the room of a window kept for reuse, in cells; a slot takes
// about a fifth of a cell's room (its aggregate and number).
func (w *window) spareRoom() int {
	pages := 0
	for _, p := range w.slot {
		if p != noPage {
			pages++
		}
	}
	return max(cap(w.aggs), reserveAt) + pages*slotPage/5
}

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
		w.reset()
		a.mu.spare = append(a.mu.spare, w)
	}
}

// reserveAt is the number of leaves at which a window that is growing takes
// the room the last cut's largest window needed.
const reserveAt = 256

// compactFloor is the registry size, in cells, below which compactLocked
// leaves it alone: some megabytes.
const compactFloor = 1 << 16

// compactLocked renumbers the registry once it holds more than twice the
// cells of the windows in memory (those open, and the cut's, whose cells
// counts) plus compactFloor, keeping only the open windows' cells: the
// series that stopped sending leave it. Each open window's cells take
// their new numbers. The windows being flushed keep the keys of the
// registry they were made in. Counting the cut's cells keeps a backfill,
// whose cuts leave few cells open, from compacting at every cut.
func (a *Aggregator) compactLocked(cut int) {
	old := a.mu.reg
	live := cut
	for _, w := range a.mu.windows {
		live += len(w.aggs)
	}
	if len(old.keys) <= 2*live+compactFloor {
		return
	}
	r := newRegistry(old.numbering + 1)
	for _, w := range a.mu.windows {
		for _, id := range w.ids {
			k := old.keys[id]
			if f := a.fams[k.fam]; k.cuboid == f.finest {
				if _, ok := r.find(k); !ok {
					r.add(f, k)
				}
			}
		}
	}
	for _, w := range a.mu.windows {
		for _, id := range w.ids {
			w.slot[uint32(id)>>slotBits][uint32(id)&slotMask] = 0
		}
		// Pages past the new numbers would stay empty.
		if pages := len(r.keys)>>slotBits + 1; len(w.slot) > pages {
			clear(w.slot[pages:])
			w.slot = w.slot[:pages]
		}
		for i, id := range w.ids {
			k := old.keys[id]
			w.ids[i], _ = r.find(k)
			w.set(w.ids[i], int32(i+1))
		}
	}
	a.mu.reg = r
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
	r := a.mu.reg
	leaf := cellKey{fam: uint16(ev.fam), cuboid: f.finest, v: ev.vals}
	n, known := r.find(leaf)
	off := int32(0)
	if known {
		off = r.fanOf[n]
	}
	// Counter values are non-negative, so the apex cell (cuboid 0, every
	// label absent) holds the largest sum of the family's window: if it
	// stays finite, every cell does.
	var apex float64
	if known {
		apex = w.sum(r.fan[off])
	} else if c, ok := r.find(cellKey{fam: uint16(ev.fam)}); ok {
		apex = w.sum(c)
	}
	if apex+ev.value > MaxValue {
		return 0, wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE
	}
	if !known || w.index(n) == 0 {
		if w.finest[ev.fam] >= maxCells {
			return 0, wirepb.RejectReason_REJECT_REASON_CARDINALITY_LIMIT
		}
		if !known {
			off = r.add(f, leaf)
		}
		w.newLeaf(ev.fam, a.mu.hint)
	}
	return w.addFan(r, f, off, ev.value, 1), noReason
}

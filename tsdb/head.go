package tsdb

import (
	"cmp"
	"encoding/binary"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/dimsum/dimsum/schema"
)

// The head holds the rows of the finest resolution that are still open, in
// memory: Apply adds each delta to its row there, after logging the batch
// as a staged batch in Pebble, and the writer (write.go) writes a row once
// its span has closed, rolling the coarser resolutions up from it at that
// moment. A row's cells thus cost one Pebble write a resolution for the
// whole span instead of one for every batch (docs/format/tsdb.md, "The
// head").
//
// The unit the writer takes is a group: every cell of every cuboid with
// data in one row of the finest resolution. A group is open while Apply
// adds to it, then closing while the writer encodes it (readers still read
// it from the head), then committing while its rows are committed (readers
// wait: they must see it either in the head or in Pebble, never in both or
// neither), then gone. A delta for a row whose group is closing or gone
// opens a new group for that row; its rows are written as merge operands
// that add to what was written before.

// head is the in-memory part of the store.
type head struct {
	mu sync.Mutex
	// cond is signalled when a group's commit ends and when the head
	// gives memory back.
	cond *sync.Cond
	// open holds the open groups by row of the finest resolution.
	open map[int64]*group
	// closing holds the groups the writer took, oldest first.
	closing []*group
	// bytes is the memory the groups hold.
	bytes int64
	// clock is the newest delta time added, but never past the wall clock
	// when it was added (unix ms): the writer closes the groups that ended
	// more than Options.HeadHold before it. A delta from a node whose clock
	// runs ahead must not close the rows still being written.
	clock int64
	// nextSeq is the sequence of the next staged batch; inflight is the
	// sequence of the batch an Apply committed and has not yet added,
	// plus one (0: none), so that the writer never deletes it.
	nextSeq  uint64
	inflight uint64
	// written holds, per row of the finest resolution, the highest staged
	// sequence whose entries for that row are written: replay skips them.
	// A mark goes once every staged batch at or below it is deleted.
	written map[int64]uint64
	// stagedLow is the lowest staged sequence that may still be stored.
	stagedLow uint64
	// writeErr is the writer's last failure, cleared by its next success:
	// Apply returns it rather than wait for room that will not come.
	writeErr error
	// stopping is set when Close begins: Apply stops waiting for room.
	stopping bool
}

// group is the head's data of one row of the finest resolution.
type group struct {
	row int64
	// minSeq and maxSeq are the lowest and highest staged sequences that
	// added to it.
	minSeq, maxSeq uint64
	// last is when the last delta was added (wall clock).
	last  time.Time
	bytes int64
	// committing is set while the writer commits its rows.
	committing bool
	// fams holds, per family (schema order), per cuboid ID, the cells
	// with data.
	fams [][]*cellSet
}

// cellSet holds the deltas of the cells of one cuboid in one group.
type cellSet struct {
	// cells holds, per cell ID, its deltas as head entries. A cell's
	// slice is only ever appended to, so a reader that copied its header
	// under the lock can read it afterwards: append never changes the
	// bytes below the length the reader saw.
	cells [][]byte
	n     int // cells with data
}

// entries returns the deltas g holds of the cell ref of family fi, nil if
// none.
func (g *group) entries(fi int, ref aliasRef) []byte {
	cuboids := g.fams[fi]
	if int(ref.cuboid) >= len(cuboids) || cuboids[ref.cuboid] == nil {
		return nil
	}
	cells := cuboids[ref.cuboid].cells
	if int(ref.cell) >= len(cells) {
		return nil
	}
	return cells[ref.cell]
}

// cellSetBytes is the memory a cell costs in a cellSet beyond its
// entries: its slice header.
const cellSetBytes = 24

func newHead() *head {
	h := &head{open: map[int64]*group{}, written: map[int64]uint64{}}
	h.cond = sync.NewCond(&h.mu)
	return h
}

// A head entry is a delta in a cell's slice: uvarint(slot<<2 | kind), the
// count as a uvarint, then the sum as the kind says (sumKind). Entries are
// in arrival order: a slot may appear more than once, and slots may come
// in any order.

func appendHeadEntry(dst []byte, slot int, sum float64, count uint64) []byte {
	kind := sumKind(sum, count)
	dst = binary.AppendUvarint(dst, uint64(slot)<<2|kind)
	dst = binary.AppendUvarint(dst, count)
	return appendSum(dst, kind, sum)
}

// addEntries folds a cell's head entries into r. The head wrote them, so
// they decode.
func (r *denseRow) addEntries(b []byte) {
	for len(b) > 0 {
		h, n := binary.Uvarint(b)
		b = b[n:]
		count, n := binary.Uvarint(b)
		b = b[n:]
		var sum float64
		switch h & 3 {
		case entrySumCount:
			sum = float64(count)
		case entrySumWhole:
			u, n := binary.Uvarint(b)
			b = b[n:]
			sum = float64(u)
		default:
			sum = math.Float64frombits(binary.LittleEndian.Uint64(b))
			b = b[8:]
		}
		r.add(int(h>>2), sum, count)
	}
}

// add puts the entries of the staged batch seq into their groups. Entries
// are in the order the batch lists them, so that sums add up in the same
// order at replay.
func (h *head) add(db *DB, seq uint64, entries []headEntry, now time.Time) {
	r := db.res[0]
	nowMs := now.UnixMilli()
	var g *group
	for i := range entries {
		e := &entries[i]
		stepStart := r.StepStart(e.time)
		row := r.Row(stepStart)
		if g == nil || g.row != row {
			g = h.open[row]
			if g == nil {
				g = &group{row: row, minSeq: seq, fams: make([][]*cellSet, len(db.fams))}
				h.open[row] = g
			}
			g.maxSeq, g.last = seq, now
		}
		cuboids := g.fams[e.fi]
		if cuboids == nil {
			cuboids = make([]*cellSet, len(db.fams[e.fi].cuboids))
			g.fams[e.fi] = cuboids
		}
		cs := cuboids[e.cuboid]
		if cs == nil {
			cs = &cellSet{}
			cuboids[e.cuboid] = cs
		}
		grown := 0
		if int(e.cell) >= len(cs.cells) {
			old := cap(cs.cells)
			cs.cells = slices.Grow(cs.cells, int(e.cell)+1-len(cs.cells))[:e.cell+1]
			grown += (cap(cs.cells) - old) * cellSetBytes
		}
		buf := cs.cells[e.cell]
		if len(buf) == 0 {
			cs.n++
		}
		old := cap(buf)
		buf = appendHeadEntry(buf, int((stepStart-row*r.rowSpanMs)/r.stepMs), e.sum, e.count)
		cs.cells[e.cell] = buf
		grown += cap(buf) - old
		g.bytes += int64(grown)
		h.bytes += int64(grown)
		h.clock = max(h.clock, min(e.time, nowMs))
	}
}

// groups calls fn with every group, open and closing, in no order.
func (h *head) groups(fn func(g *group)) {
	for _, g := range h.open {
		fn(g)
	}
	for _, g := range h.closing {
		fn(g)
	}
}

// lowest returns the lowest staged sequence a group other than except, or
// the Apply in flight, still needs.
func (h *head) lowest(except *group) uint64 {
	low := h.nextSeq
	if h.inflight > 0 {
		low = min(low, h.inflight-1)
	}
	h.groups(func(g *group) {
		if g != except {
			low = min(low, g.minSeq)
		}
	})
	return low
}

// headView is what a read needs of the head: the groups of one cuboid whose
// rows overlap its range, with the cells' slices as they were when the view
// was taken.
type headView struct {
	groups []viewGroup // by row, then in the order they were opened
}

type viewGroup struct {
	row int64
	// cells holds the cells' entries: by cell ID when ids is nil, else
	// parallel to ids.
	cells [][]byte
	ids   []uint32
}

func (v *viewGroup) get(cell uint32) []byte {
	if v.ids == nil {
		if int(cell) < len(v.cells) {
			return v.cells[cell]
		}
		return nil
	}
	if i, ok := slices.BinarySearch(v.ids, cell); ok {
		return v.cells[i]
	}
	return nil
}

// viewLocked returns the view of a cuboid over the rows of the finest
// resolution from first to last, of the listed cells (ascending), or of all
// when cells is nil. The caller holds h.mu and has waited for the commits
// in the range (waitLocked).
func (h *head) viewLocked(fi int, cuboid schema.CuboidID, first, last int64, cells []uint32) headView {
	var v headView
	h.groups(func(g *group) {
		if g.row < first || g.row > last || g.fams[fi] == nil {
			return
		}
		cs := g.fams[fi][cuboid]
		if cs == nil || cs.n == 0 {
			return
		}
		vg := viewGroup{row: g.row}
		if cells == nil {
			vg.cells = slices.Clone(cs.cells)
		} else {
			for _, c := range cells {
				if int(c) < len(cs.cells) && len(cs.cells[c]) > 0 {
					vg.ids = append(vg.ids, c)
					vg.cells = append(vg.cells, cs.cells[c])
				}
			}
			if vg.ids == nil {
				return
			}
		}
		v.groups = append(v.groups, vg)
	})
	// Closing groups of a row were opened before its open one; both
	// orders add up alike, but the same order every time keeps float sums
	// repeatable.
	slices.SortStableFunc(v.groups, func(a, b viewGroup) int { return cmp.Compare(a.row, b.row) })
	return v
}

// waitLocked waits, holding h.mu between waits, until no group whose row is
// in [first, last] is committing.
func (h *head) waitLocked(first, last int64) {
	for slices.ContainsFunc(h.closing, func(g *group) bool { return g.committing && g.row >= first && g.row <= last }) {
		h.cond.Wait()
	}
}

// cellIDs returns, ascending, the cells with data in the view.
func (v *headView) cellIDs() []uint32 {
	var out []uint32
	for _, g := range v.groups {
		if g.ids != nil {
			out = append(out, g.ids...)
			continue
		}
		for id, b := range g.cells {
			if len(b) > 0 {
				out = append(out, uint32(id))
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// steps appends to dst the steps of cell at resolution r whose start lies
// in [mint, maxt], rolled up from the view's rows of the finest
// resolution, ascending. fine is the finest resolution; row and fr are
// scratch, empty.
func (v *headView) steps(fine, r resolution, cell uint32, mint, maxt int64, row, fr *denseRow, dst []Step) []Step {
	cur := int64(math.MinInt64) // the row of r that row holds
	flush := func() {
		if cur == math.MinInt64 {
			return
		}
		dst = row.appendSteps(r, cur, mint, maxt, dst)
		row.reset()
	}
	for i := range v.groups {
		g := &v.groups[i]
		b := g.get(cell)
		if len(b) == 0 {
			continue
		}
		base := g.row * fine.rowSpanMs
		target := r.Row(base)
		if target != cur {
			flush()
			cur = target
		}
		if r.stepMs == fine.stepMs {
			row.addEntries(b)
			continue
		}
		fr.addEntries(b)
		fr.each(func(slot int, sum float64, count uint64) {
			t := r.StepStart(base + int64(slot)*fine.stepMs)
			row.add(int((t-cur*r.rowSpanMs)/r.stepMs), sum, count)
		})
		fr.reset()
	}
	flush()
	return dst
}

// appendSteps appends the present slots of r, the row of resolution res
// numbered row, whose start lies in [mint, maxt].
func (r *denseRow) appendSteps(res resolution, row, mint, maxt int64, dst []Step) []Step {
	base := row * res.rowSpanMs
	r.each(func(slot int, sum float64, count uint64) {
		if t := base + int64(slot)*res.stepMs; t >= mint && t <= maxt {
			dst = append(dst, Step{T: t, Sum: sum, Count: count})
		}
	})
	return dst
}

// mergeSteps adds the steps of b into those of a, both ascending by T, and
// returns the result in dst[:0]'s place: steps of the same T add up.
func mergeSteps(dst, a, b []Step) []Step {
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		switch {
		case a[i].T < b[j].T:
			dst = append(dst, a[i])
			i++
		case a[i].T > b[j].T:
			dst = append(dst, b[j])
			j++
		default:
			dst = append(dst, Step{T: a[i].T, Sum: a[i].Sum + b[j].Sum, Count: a[i].Count + b[j].Count})
			i++
			j++
		}
	}
	dst = append(dst, a[i:]...)
	return append(dst, b[j:]...)
}

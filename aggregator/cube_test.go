package aggregator

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/dimsum/dimsum/schema"
)

// TestRegistryWideLattice adds random leaves to two windows, through one
// registry, of a family of eight flat dimensions (256 cuboids, so the
// cuboid sets span several words) and of one with hierarchies, and checks
// every cuboid of each window against a brute-force roll-up: each cell the
// sum of the window's leaves that project onto it, and every leaf's fan
// pointing at its projections.
func TestRegistryWideLattice(t *testing.T) {
	for _, yaml := range []string{
		"resolutions: [\"10s:1h\"]\nfamilies: [{name: f, dimensions: [a, b, c, d, e, g, h, i]}]\n",
		"resolutions: [\"10s:1h\"]\nfamilies: [{name: f, dimensions: [dc/cluster/host, txn, status/code]}]\n",
	} {
		s, err := schema.Parse([]byte(yaml))
		if err != nil {
			t.Fatal(err)
		}
		f := newFamily(s.Families[0])
		r := newRegistry(1)
		rng := rand.New(rand.NewPCG(3, 4))
		type sum struct {
			v float64
			n uint64
		}
		// The second window takes fewer events, and fewer pages of its
		// slot in the flat family.
		for _, events := range []int{3000, 40} {
			w := newWindow(1)
			want := map[cellKey]sum{}
			for range events {
				leaf := cellKey{cuboid: f.finest}
				for j := range f.Labels {
					leaf.v[j] = 1 + uint32(rng.IntN(3))
				}
				var off int32
				if n, ok := r.find(leaf); ok {
					off = r.fanOf[n]
				} else {
					off = r.add(f, leaf)
				}
				v := float64(1 + rng.IntN(9))
				w.addFan(r, f, off, v, 1)
				for c := range f.masks {
					k := project(f, leaf, schema.CuboidID(c))
					want[k] = sum{want[k].v + v, want[k].n + 1}
				}
			}
			got := map[cellKey]sum{}
			for i, id := range w.ids {
				k := r.keys[id]
				if _, dup := got[k]; dup {
					t.Fatalf("%d cuboids: cell %v twice in the window", len(f.masks), k)
				}
				got[k] = sum{w.aggs[i].sum, w.aggs[i].count}
				if w.index(id) != int32(i+1) {
					t.Fatalf("%d cuboids: cell %v found at %d, it is at %d", len(f.masks), k, w.index(id)-1, i)
				}
			}
			for n, leaf := range r.keys {
				if leaf.cuboid != f.finest {
					continue
				}
				off := r.fanOf[n]
				for c := range f.masks {
					if k := project(f, leaf, schema.CuboidID(c)); r.keys[r.fan[off+int32(c)]] != k {
						t.Fatalf("%d cuboids: leaf %v's fan at cuboid %d is not its cell %v", len(f.masks), leaf.v, c, k.v)
					}
				}
			}
			if len(got) != len(want) {
				t.Fatalf("%d cuboids, %d events: %d cells, want %d", len(f.masks), events, len(got), len(want))
			}
			for k, s := range want {
				if got[k] != s {
					t.Fatalf("%d cuboids: cell %d %v: %+v, want %+v", len(f.masks), k.cuboid, k.v, got[k], s)
				}
			}
		}
	}
}

// TestCompactRegistry fills a window with many leaves and flushes it while
// another window holds a few of them and some of its own: once the registry
// is compacted it holds only the open window's cells, under new numbers,
// and the window's sums stay with their cells and keep adding up.
func TestCompactRegistry(t *testing.T) {
	a := &Aggregator{fams: []*family{newFamily(schema.Default().Families[0])}}
	f := a.fams[0]
	a.mu.reg = newRegistry(1)
	a.mu.windows = map[int64]*window{}
	leaf := func(host, txn int) cellKey {
		return cellKey{cuboid: f.finest, v: [schema.MaxLevels]uint32{1 + uint32(host/100), 10 + uint32(host/20), 100 + uint32(host), 1000 + uint32(txn), 2000}}
	}
	add := func(start int64, k cellKey, v float64) {
		ev := event{fam: 0, vals: k.v, value: v}
		if _, reason := a.addLocked(&ev, start, 1<<30); reason != noReason {
			t.Fatal(reason)
		}
	}
	for host := range 2000 {
		for txn := range 20 {
			add(0, leaf(host, txn), 1)
		}
	}
	// Two late events, after a cut of a big window: they take no big
	// window's room.
	a.mu.hint = 1 << 20
	add(10, leaf(5, 5), 2)
	add(10, leaf(3000, 1), 3)
	if c := cap(a.mu.windows[10].aggs); c >= 1<<20 {
		t.Errorf("a window of two events took room for %d cells", c)
	}
	registered := len(a.mu.reg.keys)
	a.compactLocked(0)
	if len(a.mu.reg.keys) != registered {
		t.Fatalf("compacted to %d cells of %d while the big window is open", len(a.mu.reg.keys), registered)
	}
	// The big window cut, its cells count for the cut that took it.
	big := len(a.mu.windows[0].aggs)
	delete(a.mu.windows, 0)
	a.compactLocked(big)
	if len(a.mu.reg.keys) != registered {
		t.Fatalf("compacted to %d cells of %d by the cut of the big window", len(a.mu.reg.keys), registered)
	}
	// A window of two late events holds pages of its slot for them only.
	if pages := a.mu.windows[10].spareRoom() - reserveAt; pages > 2*16*slotPage/5 {
		t.Errorf("a window of two events holds %d cells' room of slot pages", pages)
	}
	a.compactLocked(0)
	w := a.mu.windows[10]
	if n := len(a.mu.reg.keys); n != len(w.aggs) {
		t.Fatalf("registry holds %d cells after compaction, the open window %d", n, len(w.aggs))
	}
	add(10, leaf(5, 5), 4)
	add(10, leaf(3000, 2), 5)
	r := a.mu.reg
	sums := map[cellKey]float64{}
	for i, id := range w.ids {
		sums[r.keys[id]] = w.aggs[i].sum
		if w.index(id) != int32(i+1) {
			t.Fatalf("cell %v not found at its aggregate", r.keys[id])
		}
	}
	apex := cellKey{cuboid: 0}
	if sums[leaf(5, 5)] != 6 || sums[leaf(3000, 1)] != 3 || sums[leaf(3000, 2)] != 5 || sums[apex] != 14 {
		t.Fatalf("sums after compaction: %v %v %v apex %v, want 6 3 5 14", sums[leaf(5, 5)], sums[leaf(3000, 1)], sums[leaf(3000, 2)], sums[apex])
	}
	if w.finest[0] != 3 {
		t.Fatalf("the window counts %d leaves, want 3", w.finest[0])
	}
}

// project is leaf's cell in cuboid c.
func project(f *family, leaf cellKey, c schema.CuboidID) cellKey {
	k := cellKey{fam: leaf.fam, cuboid: c}
	for j := range k.v {
		if f.masks[c]&(1<<j) != 0 {
			k.v[j] = leaf.v[j]
		}
	}
	return k
}

// BenchmarkCubeNewLeaves measures a sparse window, where every event is a
// finest cell new in its window while the registry knows it: a backfill of
// one count per series a step. An op fills an emptied window with the
// 15,000 finest cells of 300 hosts (3 datacenters of 5 clusters of 20), 50
// transactions and one status of the default schema, in random order.
func BenchmarkCubeNewLeaves(b *testing.B) {
	a := &Aggregator{fams: []*family{newFamily(schema.Default().Families[0])}}
	a.mu.reg = newRegistry(1)
	a.mu.windows = map[int64]*window{}
	var events []event
	for host := range 300 {
		for txn := range 50 {
			// Interned values: one ID per distinct value of each label.
			events = append(events, event{value: 1, vals: [schema.MaxLevels]uint32{1 + uint32(host/100), 10 + uint32(host/20), 100 + uint32(host), 1000 + uint32(txn), 2000}})
		}
	}
	rand.New(rand.NewPCG(5, 6)).Shuffle(len(events), func(i, j int) { events[i], events[j] = events[j], events[i] })
	for b.Loop() {
		for i := range events {
			a.addLocked(&events[i], 0, 1<<30)
		}
		a.mu.hint = len(a.mu.windows[0].aggs)
		a.recycle([]ready{{w: a.mu.windows[0]}})
		delete(a.mu.windows, 0)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(events)), "ns/leaf")
}

// TestFlushNumbers flushes two windows of the same cells: each cell goes
// out under the same number in both, in the registry's numbering, and a
// compacted registry numbers anew under a numbering of its own.
func TestFlushNumbers(t *testing.T) {
	a := &Aggregator{fams: []*family{newFamily(schema.Default().Families[0])}, source: "agg/1"}
	a.mu.reg = newRegistry(1)
	a.mu.windows = map[int64]*window{}
	values := []string{""}
	for i := range 100 {
		values = append(values, fmt.Sprint("v", i))
	}
	for _, start := range []int64{0, 10_000} {
		for host := range 10 {
			ev := event{vals: [schema.MaxLevels]uint32{1, 2, 3 + uint32(host), 20, 30}, value: 1}
			if _, reason := a.addLocked(&ev, start, 1<<30); reason != noReason {
				t.Fatal(reason)
			}
		}
	}
	numberOf := func(start int64) map[string]uint32 {
		reqs := a.flushRequests(start, a.mu.windows[start], a.mu.reg.keys, a.mu.reg.numbering, values, 1)
		out := map[string]uint32{}
		for _, req := range reqs {
			if req.Numbering != a.mu.reg.numbering || len(req.CellNumbers) != len(req.CellCounts) {
				t.Fatalf("a flush of numbering %d with %d numbers for %d cells, want numbering %d", req.Numbering, len(req.CellNumbers), len(req.CellCounts), a.mu.reg.numbering)
			}
			vals := req.CellValues
			for i, n := range req.CellNumbers {
				// Named by its strings: the dictionary indexes differ from
				// flush to flush.
				names := []string{fmt.Sprint(req.CellCuboids[i])}
				for range a.fams[0].Cuboids()[req.CellCuboids[i]].Slots {
					names, vals = append(names, req.Dict[vals[0]]), vals[1:]
				}
				out[strings.Join(names, "/")] = n
			}
		}
		return out
	}
	first, second := numberOf(0), numberOf(10_000)
	if len(first) == 0 || len(first) != len(second) {
		t.Fatalf("%d and %d cells flushed", len(first), len(second))
	}
	for cell, n := range first {
		if second[cell] != n {
			t.Errorf("cell %s numbered %d, then %d", cell, n, second[cell])
		}
	}
	delete(a.mu.windows, 0)
	delete(a.mu.windows, 10_000)
	for range compactFloor + 1 {
		a.mu.reg.number(cellKey{cuboid: 99, v: [schema.MaxLevels]uint32{uint32(len(a.mu.reg.keys))}}, 0)
	}
	a.compactLocked(0)
	if a.mu.reg.numbering != 2 {
		t.Errorf("a compacted registry has numbering %d, want 2", a.mu.reg.numbering)
	}
}

package aggregator

import (
	"math/rand/v2"
	"testing"

	"github.com/dimsum/dimsum/schema"
)

// TestAddLeafWideLattice adds random leaves to a window of a family of
// eight flat dimensions (256 cuboids, so the cuboid sets span several
// words) and of one with hierarchies, and checks every cuboid against a
// brute-force roll-up: each cell the sum of the leaves that project onto
// it, and every leaf's fan pointing at its projections.
func TestAddLeafWideLattice(t *testing.T) {
	for _, yaml := range []string{
		"resolutions: [\"10s:1h\"]\nfamilies: [{name: f, dimensions: [a, b, c, d, e, g, h, i]}]\n",
		"resolutions: [\"10s:1h\"]\nfamilies: [{name: f, dimensions: [dc/cluster/host, txn, status/code]}]\n",
	} {
		s, err := schema.Parse([]byte(yaml))
		if err != nil {
			t.Fatal(err)
		}
		f := newFamily(s.Families[0])
		w := newWindow(1)
		rng := rand.New(rand.NewPCG(3, 4))
		type sum struct {
			v float64
			n uint64
		}
		want := map[cellKey]sum{}
		for range 3000 {
			leaf := cellKey{cuboid: f.finest}
			for j := range f.Labels {
				leaf.v[j] = 1 + uint32(rng.IntN(3))
			}
			off, ok := w.leaves[leaf]
			if !ok {
				off = w.addLeaf(f, leaf)
			}
			v := float64(1 + rng.IntN(9))
			for c := range f.masks {
				w.aggs[w.fan[off+int32(c)]].sum += v
				w.aggs[w.fan[off+int32(c)]].count++
				k := project(f, leaf, schema.CuboidID(c))
				want[k] = sum{want[k].v + v, want[k].n + 1}
			}
		}
		got := map[cellKey]sum{}
		for k, first := range w.cells {
			a := w.aggs[w.fan[first+int32(k.cuboid)]]
			got[k] = sum{a.sum, a.count}
		}
		for leaf, off := range w.leaves {
			a := w.aggs[w.fan[off+int32(f.finest)]]
			got[leaf] = sum{a.sum, a.count}
			for c := range f.masks {
				k := project(f, leaf, schema.CuboidID(c))
				if c != int(f.finest) && w.fan[off+int32(c)] != w.fan[w.cells[k]+int32(c)] {
					t.Fatalf("%d cuboids: leaf %v's fan at cuboid %d is not its cell %v", len(f.masks), leaf.v, c, k.v)
				}
			}
		}
		if len(got) != len(want) {
			t.Fatalf("%d cuboids: %d cells, want %d", len(f.masks), len(got), len(want))
		}
		// A flush places each cell at its aggregate's index.
		if len(w.aggs) != len(w.cells)+len(w.leaves) {
			t.Fatalf("%d cuboids: %d aggregates for %d cells", len(f.masks), len(w.aggs), len(w.cells)+len(w.leaves))
		}
		for k, s := range want {
			if got[k] != s {
				t.Fatalf("%d cuboids: cell %d %v: %+v, want %+v", len(f.masks), k.cuboid, k.v, got[k], s)
			}
		}
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

// BenchmarkCubeNewLeaves measures addLeaf on a sparse window, where every
// event is a finest cell new in its window while its coarser cells mostly
// exist: a backfill of one count per series a step. An op fills an emptied
// window with the 15,000 finest cells of 300 hosts (3 datacenters of 5
// clusters of 20), 50 transactions and one status of the default schema, in
// random order.
func BenchmarkCubeNewLeaves(b *testing.B) {
	f := newFamily(schema.Default().Families[0])
	var leaves []cellKey
	for host := range 300 {
		for txn := range 50 {
			// Interned values: one ID per distinct value of each label.
			leaf := cellKey{cuboid: f.finest, v: [schema.MaxLevels]uint32{1 + uint32(host/100), 10 + uint32(host/20), 100 + uint32(host), 1000 + uint32(txn), 2000}}
			leaves = append(leaves, leaf)
		}
	}
	rand.New(rand.NewPCG(5, 6)).Shuffle(len(leaves), func(i, j int) { leaves[i], leaves[j] = leaves[j], leaves[i] })
	w := newWindow(1)
	for b.Loop() {
		clear(w.leaves)
		clear(w.cells)
		clear(w.finest)
		w.fan, w.aggs = w.fan[:0], w.aggs[:0]
		for _, leaf := range leaves {
			w.addLeaf(f, leaf)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(leaves)), "ns/leaf")
}

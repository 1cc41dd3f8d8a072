package tsdb

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/dimsum/dimsum/schema"
)

// randomHosted returns a coarse row and its fine part with k sub-slots a
// step, consistent (each coarse slot the sum of its sub-slots): some steps
// with one sub-slot, some with several, of every kind of sum.
func randomHosted(rng *rand.Rand, k int) (*denseRow, *denseFine) {
	var c denseRow
	f := &denseFine{k: k}
	density := rng.Float64()
	for i := range schema.StepsPerRow {
		if rng.Float64() > density {
			continue
		}
		subs := 1
		if rng.IntN(3) == 0 {
			subs = 1 + rng.IntN(k)
		}
		for range subs {
			j := rng.IntN(k)
			count := uint64(rng.IntN(40))
			var sum float64
			switch rng.IntN(4) {
			case 0:
				sum = float64(count)
			case 1:
				sum = float64(rng.Int64N(1 << 40))
			case 2:
				sum = float64(rng.IntN(2001)-1000) / 8
			default:
				sum = math.Copysign(0, -1)
			}
			f.add(i*k+j, sum, count)
			c.add(i, sum, count)
		}
	}
	return &c, f
}

func denseFineEqual(a, b *denseFine) bool {
	if a.k != b.k || a.present != b.present {
		return false
	}
	for s := range schema.StepsPerRow * a.k {
		if a.has(s) && (a.count[s] != b.count[s] || math.Float64bits(a.sum[s]) != math.Float64bits(b.sum[s])) {
			return false
		}
	}
	return true
}

// A hosted row decodes to the coarse row and the fine part it was made of,
// bit for bit, and reads as its coarse row to every reader of rows.
func TestHostedRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for range 200 {
		k := 2 + rng.IntN(maxHostedSubslots-1)
		c, f := randomHosted(rng, k)
		b := appendHosted(nil, c, f)
		var gc denseRow
		var gf *denseFine
		if err := addHosted(&gc, &gf, b); err != nil {
			t.Fatalf("k=%d: %v", k, err)
		}
		if gc != *c {
			t.Fatalf("k=%d: the coarse part differs", k)
		}
		if f.any && (gf == nil || !denseFineEqual(gf, f)) {
			t.Fatalf("k=%d: the fine part differs", k)
		}
		coarse, err := decodeRow(b)
		if err != nil {
			t.Fatal(err)
		}
		var want []slotValue
		c.each(func(slot int, sum float64, count uint64) { want = append(want, slotValue{slot, sum, count}) })
		if !slotsEqual(coarse, want) {
			t.Fatalf("k=%d: the row decoder reads %v, want %v", k, coarse, want)
		}
		releaseFine(gf)
	}
}

// The merge operator folds hosted operands, in any grouping, into the row
// of their sums: the fine steps add up as the coarse ones do.
func TestHostedMerge(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for range 50 {
		k := 6
		var wantC denseRow
		wantF := &denseFine{k: k}
		var ops [][]byte
		for range 1 + rng.IntN(6) {
			c, f := randomHosted(rng, k)
			ops = append(ops, appendHosted(nil, c, f))
			c.each(func(slot int, sum float64, count uint64) { wantC.add(slot, sum, count) })
			for s := range schema.StepsPerRow * k {
				if f.has(s) {
					wantF.add(s, f.sum[s], f.count[s])
				}
			}
		}
		var first []byte
		for range 3 {
			rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
			got := mergeAll(t, ops)
			if first == nil {
				first = got
			} else if string(got) != string(first) {
				t.Fatal("another order merged into other bytes")
			}
		}
		var gc denseRow
		var gf *denseFine
		if err := addHosted(&gc, &gf, first); err != nil {
			t.Fatal(err)
		}
		if gc != wantC || !denseFineEqual(gf, wantF) {
			t.Fatal("the merged row is not the sum of its operands")
		}
		releaseFine(gf)
	}
}

// mergeAll folds ops with the merge operator, oldest first.
func mergeAll(t *testing.T, ops [][]byte) []byte {
	t.Helper()
	vm, err := rowMerger.Merge([]byte("k"), ops[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range ops[1:] {
		if err := vm.MergeNewer(op); err != nil {
			t.Fatal(err)
		}
	}
	return finish(t, vm, true)
}

// FuzzDecodeHosted feeds arbitrary bytes to the hosted-row decoder: it
// must never panic, and whatever it accepts must re-encode to a row that
// decodes to the same coarse and fine parts.
func FuzzDecodeHosted(f *testing.F) {
	rng := rand.New(rand.NewPCG(1, 1))
	for range 8 {
		c, fine := randomHosted(rng, 6)
		f.Add(appendHosted(nil, c, fine))
	}
	f.Add([]byte{hostedMagic})
	f.Add([]byte{hostedMagic, 5, rowMagic, 1, 0, 0, 0, 6})
	f.Fuzz(func(t *testing.T, b []byte) {
		var c denseRow
		var fine *denseFine
		if err := addHosted(&c, &fine, b); err != nil {
			return
		}
		defer releaseFine(fine)
		if fine == nil || !fine.any {
			return
		}
		again := appendHosted(nil, &c, fine)
		var c2 denseRow
		var f2 *denseFine
		if err := addHosted(&c2, &f2, again); err != nil {
			t.Fatalf("re-encoding %x does not decode: %v", again, err)
		}
		defer releaseFine(f2)
		if c2 != c || !denseFineEqual(f2, fine) {
			t.Fatalf("round trip through %x differs", again)
		}
	})
}

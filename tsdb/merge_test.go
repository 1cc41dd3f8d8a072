package tsdb

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/cockroachdb/pebble/v2"

	"github.com/dimsum/dimsum/internal/race"
	"github.com/dimsum/dimsum/schema"
)

// randomOperands returns 1 to 10 operands of one row, each in a random
// layout, and the row they must fold into: a plain per-slot sum. Each slot
// receives one kind of value (events of 1, whole numbers, eighths of either
// sign, negative zeros, huge multiples of 2^900), all of which add exactly,
// so that every order and grouping must give the same bits.
func randomOperands(rng *rand.Rand) (ops [][]byte, want []slotValue) {
	kinds := make([]int, schema.StepsPerRow)
	density := rng.Float64()
	for slot := range kinds {
		if rng.Float64() < density {
			kinds[slot] = 1 + rng.IntN(5)
		}
	}
	model := map[int]slotValue{}
	for range 1 + rng.IntN(10) {
		var slots []slotValue
		for slot, kind := range kinds {
			if kind == 0 || rng.IntN(3) == 0 {
				continue
			}
			count := uint64(rng.IntN(50))
			var sum float64
			switch kind {
			case 1:
				sum = float64(count)
			case 2:
				sum = float64(rng.Int64N(1 << 40))
			case 3:
				sum = float64(rng.IntN(2001)-1000) / 8
			case 4:
				sum = math.Copysign(0, -1)
			case 5:
				sum = math.Ldexp(float64(rng.IntN(1000)), 900)
			}
			slots = append(slots, slotValue{slot, sum, count})
			if m, ok := model[slot]; ok {
				m.sum += sum
				m.count += count
				model[slot] = m
			} else {
				model[slot] = slotValue{slot, sum, count}
			}
		}
		if rng.IntN(2) == 0 {
			ops = append(ops, encodeRow(slots...))
		} else {
			ops = append(ops, denseOf(slots).appendTo(nil))
		}
	}
	for slot := range schema.StepsPerRow {
		if m, ok := model[slot]; ok {
			want = append(want, m)
		}
	}
	return ops, want
}

// finish runs Finish and copies the result out before closing, as Pebble
// does with the value before it closes the closer.
func finish(t *testing.T, vm pebble.ValueMerger, includesBase bool) []byte {
	t.Helper()
	v, closer, err := vm.Finish(includesBase)
	if err != nil {
		t.Fatal(err)
	}
	out := append([]byte(nil), v...)
	if closer != nil {
		if err := closer.(io.Closer).Close(); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// fold merges operands (oldest first) the way Pebble does in one pass:
// starting from the newest and adding older ones, or from the oldest and
// adding newer ones.
func fold(t *testing.T, ops [][]byte, newestFirst bool, includesBase bool) []byte {
	t.Helper()
	key := []byte("k")
	if newestFirst {
		vm, err := rowMerger.Merge(key, ops[len(ops)-1])
		if err != nil {
			t.Fatal(err)
		}
		for i := len(ops) - 2; i >= 0; i-- {
			if err := vm.MergeOlder(ops[i]); err != nil {
				t.Fatal(err)
			}
		}
		return finish(t, vm, includesBase)
	}
	vm, err := rowMerger.Merge(key, ops[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range ops[1:] {
		if err := vm.MergeNewer(op); err != nil {
			t.Fatal(err)
		}
	}
	return finish(t, vm, includesBase)
}

// foldTree folds ops (oldest first) as Pebble may across flushes and
// compactions: split into random runs, each folded on its own, newest-first
// or oldest-first, with the base only in the run holding the oldest operand,
// and the partial results folded again.
func foldTree(t *testing.T, rng *rand.Rand, ops [][]byte, hasBase bool) []byte {
	t.Helper()
	if len(ops) == 1 || rng.IntN(3) == 0 {
		return fold(t, ops, rng.IntN(2) == 0, hasBase)
	}
	var partial [][]byte
	for i := 0; i < len(ops); {
		j := i + 1 + rng.IntN(len(ops)-i)
		partial = append(partial, foldTree(t, rng, ops[i:j], hasBase && i == 0))
		i = j
	}
	return fold(t, partial, rng.IntN(2) == 0, hasBase)
}

// TestMergeAssociative folds random operands of every layout in random
// groupings, with and without their base, and requires exactly the plain
// per-slot sum: the same bits whatever the grouping.
func TestMergeAssociative(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for iter := range 300 {
		ops, want := randomOperands(rng)
		t.Run(fmt.Sprint(iter), func(t *testing.T) {
			var first []byte
			for g := range 4 {
				row := foldTree(t, rng, ops, g%2 == 0)
				got, err := decodeRow(row)
				if err != nil {
					t.Fatalf("grouping %d: %x: %v", g, row, err)
				}
				if !slotsEqual(got, want) {
					t.Fatalf("grouping %d: %v\nwant %v", g, got, want)
				}
				if first == nil {
					first = row
				} else if string(row) != string(first) {
					t.Fatalf("grouping %d: %x, another grouping gave %x", g, row, first)
				}
			}
		})
	}
}

func TestMergeRejectsCorruptOperand(t *testing.T) {
	good := encodeRow(slotValue{3, 1, 1})
	f := func(name string, run func() error) {
		t.Helper()
		t.Run(name, func(t *testing.T) {
			err := run()
			if err == nil || !isCorruptNaming(err, []byte("key")) {
				t.Fatalf("got %v, want corruption naming the key", err)
			}
		})
	}
	f("first operand", func() error {
		_, err := rowMerger.Merge([]byte("key"), []byte{0x00})
		return err
	})
	f("newer operand", func() error {
		vm, err := rowMerger.Merge([]byte("key"), good)
		if err != nil {
			return nil
		}
		return vm.MergeNewer([]byte{rowMagic, 0x80})
	})
	f("older operand", func() error {
		vm, err := rowMerger.Merge([]byte("key"), good)
		if err != nil {
			return nil
		}
		return vm.MergeOlder(nil)
	})
}

// TestMergeAllocs pins the merge operator's hot path at zero allocations,
// for plain and hosted rows: its dense rows and buffers come from a pool.
func TestMergeAllocs(t *testing.T) {
	if race.Enabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	full := rowOf(schema.StepsPerRow, func(i int) (float64, uint64) { return float64(i), uint64(i) })
	rng := rand.New(rand.NewPCG(3, 4))
	r1, f1 := randomHosted(rng, 6)
	r2, f2 := randomHosted(rng, 6)
	for _, tc := range []struct {
		name string
		a, b []byte
	}{
		{"columnar", encodeRow(goldenRows[5].slots...), denseOf(full).appendTo(nil)},
		{"hosted", appendHosted(nil, r1, f1), appendHosted(nil, r2, f2)},
	} {
		key := []byte("some key")
		allocs := testing.AllocsPerRun(100, func() {
			vm, err := rowMerger.Merge(key, tc.a)
			if err != nil {
				t.Fatal(err)
			}
			if err := vm.MergeOlder(tc.b); err != nil {
				t.Fatal(err)
			}
			_, closer, err := vm.Finish(true)
			if err != nil {
				t.Fatal(err)
			}
			closer.Close()
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations a merge, want 0", tc.name, allocs)
		}
	}
}

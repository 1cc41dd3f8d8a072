package tsdb

import (
	"fmt"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/cockroachdb/pebble/v2"

	"github.com/dimsum/dimsum/internal/race"
	"github.com/dimsum/dimsum/schema"
)

// randomRow returns an encoded row with random slots, and adds it to want.
func randomRow(rng *rand.Rand, want *denseRow) []byte {
	var d denseRow
	for range 1 + rng.IntN(20) {
		slot := rng.IntN(schema.StepsPerRow)
		var op denseRow
		op.present[slot/64] |= 1 << (slot % 64)
		op.sum[slot] = float64(rng.IntN(1000)) / 8
		op.count[slot] = uint64(rng.IntN(4))
		if err := d.addRow(op.appendTo(nil)); err != nil {
			panic(err)
		}
	}
	b := d.appendTo(nil)
	if err := want.addRow(b); err != nil {
		panic(err)
	}
	return b
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

// TestMergeAssociative folds random operands in random groupings, as
// compactions do when they see only some of a key's operands, and requires
// the same row as a single fold.
func TestMergeAssociative(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for iter := range 200 {
		var want denseRow
		ops := make([][]byte, 1+rng.IntN(8))
		for i := range ops {
			ops[i] = randomRow(rng, &want)
		}
		wantRow := want.appendTo(nil)
		t.Run(fmt.Sprint(iter), func(t *testing.T) {
			for _, newestFirst := range []bool{false, true} {
				if got := fold(t, ops, newestFirst, true); string(got) != string(wantRow) {
					t.Fatalf("newestFirst=%v: %x, want %x", newestFirst, got, wantRow)
				}
			}
			// Split into runs, fold each without its base, then fold the
			// partial results.
			var partial [][]byte
			for i := 0; i < len(ops); {
				j := i + 1 + rng.IntN(len(ops)-i)
				partial = append(partial, fold(t, ops[i:j], rng.IntN(2) == 0, i == 0))
				i = j
			}
			if got := fold(t, partial, rng.IntN(2) == 0, true); string(got) != string(wantRow) {
				t.Fatalf("grouped: %x, want %x", got, wantRow)
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

// TestMergeAllocs pins the merge operator's hot path at zero allocations:
// its dense rows and buffers come from a pool.
func TestMergeAllocs(t *testing.T) {
	if race.Enabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var want denseRow
	a, b := randomRow(rng, &want), randomRow(rng, &want)
	key := []byte("some key")
	allocs := testing.AllocsPerRun(100, func() {
		vm, err := rowMerger.Merge(key, a)
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.MergeOlder(b); err != nil {
			t.Fatal(err)
		}
		_, closer, err := vm.Finish(true)
		if err != nil {
			t.Fatal(err)
		}
		closer.Close()
	})
	if allocs != 0 {
		t.Fatalf("%v allocations a merge, want 0", allocs)
	}
}

package tsdb

import (
	"hash/maphash"
	"slices"
	"strings"

	"github.com/dimsum/dimsum/schema"
)

// cellKey is a cell's key in its cuboid's cellIndex: the numbers of its
// values in the store's valueTable, one per label slot, the slots past the
// cuboid's labels zero.
type cellKey [schema.MaxLevels]uint32

// cellIndex maps the keys of one cuboid's cells to their IDs: a hash table
// with open addressing and linear probing, each slot holding a key's
// numbers inline beside the cell's ID. A lookup thus reads one slot and
// its neighbours, most often one cache line; a Go map of the same keys
// reads its control word and then the slot, two lines, and a map of the
// encoded values a third for the string's bytes. On the sparse backfill a
// flush's cells are spread over every cell of the store, so most lookups
// miss the cache: the lines a lookup reads are what it costs
// (BenchmarkApply of package combiner).
type cellIndex struct {
	width int          // numbers a key: the cuboid's labels
	seed  maphash.Seed // random, so that no choice of values makes keys collide
	n     int          // cells held
	mask  int          // slots - 1: the number of slots is a power of two
	// slots holds width+1 words a slot: the cell's ID + 1 (0: the slot is
	// empty), then its key's numbers.
	slots []uint32
}

func newCellIndex(width int) cellIndex {
	return cellIndex{width: width, seed: maphash.MakeSeed()}
}

// home is the slot where k's probe starts.
func (x *cellIndex) home(k *cellKey) int {
	return int(maphash.Comparable(x.seed, *k) & uint64(x.mask))
}

func (x *cellIndex) slot(i int) []uint32 {
	st := x.width + 1
	return x.slots[i*st : i*st+st : i*st+st]
}

// find returns the slot holding k, or the empty slot where its probe ends.
func (x *cellIndex) find(k *cellKey) (int, bool) {
	for i := x.home(k); ; i = (i + 1) & x.mask {
		s := x.slot(i)
		if s[0] == 0 {
			return i, false
		}
		if slices.Equal(s[1:], k[:x.width]) {
			return i, true
		}
	}
}

// get returns the ID of the cell whose key is k.
func (x *cellIndex) get(k *cellKey) (uint32, bool) {
	if x.n == 0 {
		return 0, false
	}
	i, ok := x.find(k)
	if !ok {
		return 0, false
	}
	return x.slot(i)[0] - 1, true
}

// put adds the cell whose key is k, which x does not hold.
func (x *cellIndex) put(k *cellKey, id uint32) {
	if (x.n+1)*4 > (x.mask+1)*3 || x.slots == nil {
		x.grow()
	}
	i, _ := x.find(k)
	s := x.slot(i)
	s[0] = id + 1
	copy(s[1:], k[:x.width])
	x.n++
}

// grow doubles the slots, so that at most three quarters of them are held.
func (x *cellIndex) grow() {
	old, st := x.slots, x.width+1
	slots := max(8, 2*(x.mask+1))
	x.slots, x.mask = make([]uint32, slots*st), slots-1
	var k cellKey
	for at := 0; at < len(old); at += st {
		if old[at] == 0 {
			continue
		}
		copy(k[:], old[at+1:at+st])
		i, _ := x.find(&k)
		copy(x.slot(i), old[at:at+st])
	}
}

// delete removes the cell whose key is k, if x holds it. The slots after
// it that probed past it move back (Knuth's algorithm R): linear probing
// then needs no tombstones, and a lookup never probes further than the
// cells held ask.
func (x *cellIndex) delete(k *cellKey) {
	if x.n == 0 {
		return
	}
	i, ok := x.find(k)
	if !ok {
		return
	}
	var moved cellKey
	for j := i; ; {
		j = (j + 1) & x.mask
		s := x.slot(j)
		if s[0] == 0 {
			break
		}
		copy(moved[:], s[1:])
		// The cell at j stays if its home lies cyclically in (i, j]:
		// its probe does not pass the hole at i.
		if h := x.home(&moved); (i < j && i < h && h <= j) || (i > j && (h > i || h <= j)) {
			continue
		}
		copy(x.slot(i), s)
		i = j
	}
	clear(x.slot(i))
	x.n--
}

// valueTable interns the label values of the store's cells: each distinct
// value has a number while some cell holds it, so that a cell's key in its
// dictionary is a few numbers (cellKey), cheap to hash and compare, and a
// batch resolves each distinct string of its dictionary once rather than
// once a cell (ApplyDict). Numbers are store-wide, whatever the family and
// label: a cell's key is per cuboid, where the slot tells the labels apart.
// Owned by Apply and the retention pass, which run under DB.apply, and by
// Open.
type valueTable struct {
	nums map[string]uint32 // value → number
	strs []string          // number → value, "" for a free number
	refs []int             // number → how many label slots of cells, committed or pending, hold it
	free []uint32          // numbers no cell holds, for reuse
}

func newValueTable() *valueTable { return &valueTable{nums: map[string]uint32{}} }

// lookup returns the number of v, if a cell holds it.
func (t *valueTable) lookup(v string) (uint32, bool) {
	n, ok := t.nums[v]
	return n, ok
}

// intern returns the number of v and its interned string, which one more
// label slot holds from now on.
func (t *valueTable) intern(v string) (uint32, string) {
	if n, ok := t.nums[v]; ok {
		t.refs[n]++
		return n, t.strs[n]
	}
	v = strings.Clone(v) // v may be a substring of a larger buffer
	var n uint32
	if k := len(t.free); k > 0 {
		n = t.free[k-1]
		t.free = t.free[:k-1]
		t.strs[n], t.refs[n] = v, 1
	} else {
		n = uint32(len(t.strs))
		t.strs, t.refs = append(t.strs, v), append(t.refs, 1)
	}
	t.nums[v] = n
	return n, v
}

// keyOf returns the key of a cell whose values are held.
func (t *valueTable) keyOf(values []string) cellKey {
	var k cellKey
	for i, v := range values {
		k[i] = t.nums[v]
	}
	return k
}

// releaseKey counts one label slot less holding each of the first n
// numbers of k: the slots of a cell that is forgotten or rolled back.
func (t *valueTable) releaseKey(k *cellKey, n int) {
	for _, num := range k[:n] {
		if t.refs[num]--; t.refs[num] == 0 {
			delete(t.nums, t.strs[num])
			t.strs[num] = ""
			t.free = append(t.free, num)
		}
	}
}

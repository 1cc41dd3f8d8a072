package tsdb

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
)

// Alias rows (docs/format/tsdb.md, "Alias rows"). A rolled-up cell whose
// data in a row is exactly its child's (a cell of a cuboid one level finer
// with the same values on the parent's labels) stores, in that row, only the
// child's name: a cuboid whose every cell has a single child (one status
// value) takes no room, nor does a host's transaction seen on one host. The
// writer decides it when a group first brings the cell into the row, and
// undoes it (writes the cell's whole row in place of the alias) when a later
// group brings the cell deltas its child lacks. Readers follow the alias to
// the child's row, which may itself be an alias.

// aliasMagic is the first byte of an alias row.
const aliasMagic byte = 0xD4

// aliasRef names the row an alias row stands for: in the same resolution,
// row and family, a cell of a finer cuboid.
type aliasRef struct {
	cuboid schema.CuboidID
	cell   uint32
}

func appendAlias(dst []byte, a aliasRef) []byte {
	dst = append(dst, aliasMagic)
	dst = binary.AppendUvarint(dst, uint64(a.cuboid))
	return binary.AppendUvarint(dst, uint64(a.cell))
}

func isAlias(v []byte) bool { return len(v) > 0 && v[0] == aliasMagic }

var (
	errAliasMalformed = errors.New("malformed alias row")
	errAliasCoarser   = errors.New("alias row names a cuboid that is not finer")
	errAliasMissing   = errors.New("alias row names a row that is not stored")
	errAliasMerged    = errors.New("alias row given a merge operand")
)

func parseAlias(v []byte) (aliasRef, error) {
	if !isAlias(v) {
		return aliasRef{}, errAliasMalformed
	}
	c, n := binary.Uvarint(v[1:])
	if n <= 0 || c > math.MaxUint16 {
		return aliasRef{}, errAliasMalformed
	}
	id, m := binary.Uvarint(v[1+n:])
	if m <= 0 || id > math.MaxUint32 || 1+n+m != len(v) {
		return aliasRef{}, errAliasMalformed
	}
	return aliasRef{cuboid: schema.CuboidID(c), cell: uint32(id)}, nil
}

// aliasTarget returns the key of the row that the alias row v, stored under
// key, stands for. Its cuboid must have a larger ID than key's (every finer
// cuboid has), so that every chain of aliases ends.
func aliasTarget(key, v []byte) (dataKey, error) {
	k, err := parseDataKey(key)
	if err != nil {
		return dataKey{}, err
	}
	a, err := parseAlias(v)
	if err == nil && a.cuboid <= k.cuboid {
		err = errAliasCoarser
	}
	if err != nil {
		return dataKey{}, corruptRowError(key, err)
	}
	return makeDataKey(k.stepSec, k.row, k.fam, a.cuboid, a.cell), nil
}

// aliasReader follows the alias rows a read meets, with clones of the
// read's iterator: the same view of the store. It keeps one clone per
// (row, cuboid) of the rows it reads, bounded to it, whose seeks then
// mostly move forward: a cuboid's cells and their children are numbered
// in much the same order (a flush lists them in the order their first
// events came), and Pebble makes a seek to a later key a step from where
// the iterator stands.
type aliasReader struct {
	from  *pebble.Iterator
	iters map[presenceKey]*pebble.Iterator
}

// resolve returns the key and value of the row that v, the value stored
// under key, stands for: v itself unless it is an alias row. What it
// returns is valid until the next call and while the read's iterator is.
func (a *aliasReader) resolve(key, v []byte) ([]byte, []byte, error) {
	for isAlias(v) {
		next, err := aliasTarget(key, v)
		if err != nil {
			return key, nil, err
		}
		it, err := a.iter(presenceOf(&next))
		if err != nil {
			return key, nil, err
		}
		if !it.SeekGE(next[:]) || !bytes.Equal(it.Key(), next[:]) {
			if err := it.Error(); err != nil {
				return key, nil, err
			}
			return key, nil, corruptRowError(key, errAliasMissing)
		}
		key = it.Key()
		if v, err = it.ValueAndErr(); err != nil {
			return key, nil, err
		}
	}
	return key, v, nil
}

// iter returns the clone that reads the cells of row pk.
func (a *aliasReader) iter(pk presenceKey) (*pebble.Iterator, error) {
	if it := a.iters[pk]; it != nil {
		return it, nil
	}
	it, err := a.from.Clone(pebble.CloneOptions{IterOptions: dataBounds(
		makeDataKey(pk.stepSec, pk.row, pk.fam, pk.cuboid, 0),
		makeDataKey(pk.stepSec, pk.row, pk.fam, pk.cuboid, math.MaxUint32))})
	if err != nil {
		return nil, err
	}
	if a.iters == nil {
		a.iters = map[presenceKey]*pebble.Iterator{}
	}
	a.iters[pk] = it
	return it, nil
}

func (a *aliasReader) close() error {
	var err error
	for _, it := range a.iters {
		err = errors.Join(err, it.Close())
	}
	a.iters = nil
	return err
}

// storedRow returns the stored value of the row under key, following alias
// rows, or nil when the row holds nothing. The writer reads it before the
// group it writes is ingested.
func (db *DB) storedRow(key []byte) ([]byte, error) {
	first := key
	for {
		v, closer, err := db.pdb.Get(key)
		switch {
		case errors.Is(err, pebble.ErrNotFound) && bytes.Equal(key, first):
			return nil, nil
		case errors.Is(err, pebble.ErrNotFound):
			return nil, corruptRowError(first, errAliasMissing)
		case err != nil:
			return nil, fmt.Errorf("tsdb: cannot read row %x: %w", key, err)
		}
		v = slices.Clone(v)
		closer.Close()
		if !isAlias(v) {
			return v, nil
		}
		next, err := aliasTarget(key, v)
		if err != nil {
			return nil, err
		}
		key = next[:]
	}
}

// foldRows returns the row that adds up the row values a and b.
func foldRows(key, a, b []byte) ([]byte, error) {
	m, err := rowMerger.Merge(key, a)
	if err != nil {
		return nil, err
	}
	if err := m.MergeOlder(b); err != nil {
		m.(*valueMerger).release()
		return nil, err
	}
	v, closer, err := m.Finish(true)
	v = slices.Clone(v)
	closer.Close()
	return v, err
}

// childCuboid is a cuboid one level finer than another: one more level of
// one dimension. proj holds, for each label of the coarser cuboid, its index
// in the finer one's labels.
type childCuboid struct {
	id   schema.CuboidID
	proj []int
}

// cuboidChildren returns, per cuboid ID of f, the cuboids one level finer,
// in the order of the dimensions they refine.
func cuboidChildren(f *schema.Family) [][]childCuboid {
	cuboids := f.Cuboids()
	byDepths := map[string]schema.Cuboid{}
	for _, c := range cuboids {
		byDepths[fmt.Sprint(c.Depths)] = c
	}
	out := make([][]childCuboid, len(cuboids))
	for _, c := range cuboids {
		for i, d := range f.Dimensions {
			if c.Depths[i] == len(d.Levels) {
				continue
			}
			depths := slices.Clone(c.Depths)
			depths[i]++
			child := byDepths[fmt.Sprint(depths)]
			proj := make([]int, len(c.Labels))
			for j, l := range c.Labels {
				proj[j] = slices.Index(child.Labels, l)
			}
			out[c.ID] = append(out[c.ID], childCuboid{id: child.ID, proj: proj})
		}
	}
	return out
}

// aliasCandidates returns, per cuboid of family fi in g, the cells of g
// whose deltas in g are, byte for byte, those of one of their children in g:
// the candidates, in the order of cuboidChildren. Such a cell's rows from g
// would be its child's, at every resolution. A cell or child that is not
// published yet (its first batch is still committing) is left out.
//
// A child is found by its values on the parent's labels, held as an array
// of the dictionary's strings: a map keyed by it allocates nothing a cell,
// where one keyed by the values' encoded bytes took half of a group's
// allocations.
func (db *DB) aliasCandidates(fi int, g *group) []map[uint32]childRefs {
	fs := db.fams[fi]
	cuboids := g.fams[fi]
	out := make([]map[uint32]childRefs, len(cuboids))
	byParent := map[projKey]int64{} // the child cell; -1 when two children share the values
	for q, cs := range cuboids {
		if cs == nil || cs.n == 0 {
			continue
		}
		for _, child := range fs.children[q] {
			ccs := cuboids[child.id]
			if ccs == nil || ccs.n == 0 {
				continue
			}
			clear(byParent)
			fs.cuboids[child.id].eachValues(ccs, func(c uint32, values []string) {
				var k projKey
				for j, i := range child.proj {
					k[j] = values[i]
				}
				if _, ok := byParent[k]; ok {
					byParent[k] = -1
				} else {
					byParent[k] = int64(c)
				}
			})
			fs.cuboids[q].eachValues(cs, func(cell uint32, values []string) {
				var k projKey
				copy(k[:], values)
				c, ok := byParent[k]
				if !ok || c < 0 || !bytes.Equal(cs.cells[cell], ccs.cells[c]) {
					return
				}
				if out[q] == nil {
					out[q] = map[uint32]childRefs{}
				}
				refs := out[q][cell]
				refs.refs[refs.n] = aliasRef{cuboid: child.id, cell: uint32(c)}
				refs.n++
				out[q][cell] = refs
			})
		}
	}
	return out
}

// projKey is a cell's values on a cuboid's labels, the rest empty.
type projKey [schema.MaxLevels]string

// childRefs are a cell's candidates: at most one child cuboid a dimension,
// and a family has at most schema.MaxLevels labels.
type childRefs struct {
	n    int
	refs [schema.MaxLevels]aliasRef
}

// eachValues calls fn with each published cell of d that has deltas in cs,
// and its values.
func (d *cellDict) eachValues(cs *cellSet, fn func(cell uint32, values []string)) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	for c, e := range cs.cells {
		if len(e) > 0 && c < len(d.cells) && d.cells[c] != nil {
			fn(uint32(c), d.cells[c])
		}
	}
}

// aliases is the writer's cache of the alias rows of recent rows, per
// (resolution, row, family, cuboid): which cells are aliases, and of which
// child. Like presence, it holds at most limit rows, and a row it lacks is
// read from Pebble (by scanning the row's cells). The writer and the
// retention pass own it, under DB.write.
type aliases struct {
	limit  int
	cache  map[presenceKey]map[uint32]aliasRef
	staged map[presenceKey]map[uint32]aliasRef // written by the batch in flight
}

// rowAliases returns the alias rows of pk as committed, or as the group in
// flight leaves them. The caller must not modify the map.
func (db *DB) rowAliases(pk presenceKey) (map[uint32]aliasRef, error) {
	a := &db.aliases
	if m, ok := a.staged[pk]; ok {
		return m, nil
	}
	if m, ok := a.cache[pk]; ok {
		return m, nil
	}
	lo := makeDataKey(pk.stepSec, pk.row, pk.fam, pk.cuboid, 0)
	hi := makeDataKey(pk.stepSec, pk.row, pk.fam, pk.cuboid, math.MaxUint32)
	iter, err := db.pdb.NewIter(dataBounds(lo, hi))
	if err != nil {
		return nil, fmt.Errorf("tsdb: cannot read the alias rows of %x: %w", pk.append(nil), err)
	}
	m := map[uint32]aliasRef{}
	for valid := iter.First(); valid && err == nil; valid = iter.Next() {
		var v []byte
		if v, err = iter.ValueAndErr(); err != nil || !isAlias(v) {
			continue
		}
		var ref aliasRef
		if ref, err = parseAlias(v); err != nil {
			err = corruptRowError(iter.Key(), err)
			continue
		}
		var k parsedDataKey
		if k, err = parseDataKey(iter.Key()); err == nil {
			m[k.cell] = ref
		}
	}
	if err = errors.Join(err, iter.Error(), iter.Close()); err != nil {
		return nil, fmt.Errorf("tsdb: cannot read the alias rows of %x: %w", pk.append(nil), err)
	}
	a.remember(pk, m)
	return m, nil
}

// stageAlias records that the group in flight makes cell of pk an alias of
// ref, or, with ok false, that it writes the cell's whole row in place of
// its alias.
func (db *DB) stageAlias(pk presenceKey, cell uint32, ref aliasRef, ok bool) error {
	a := &db.aliases
	m, staged := a.staged[pk]
	if !staged {
		cur, err := db.rowAliases(pk)
		if err != nil {
			return err
		}
		m = maps.Clone(cur)
		a.staged[pk] = m
	}
	if ok {
		m[cell] = ref
	} else {
		delete(m, cell)
	}
	return nil
}

func (a *aliases) remember(pk presenceKey, m map[uint32]aliasRef) {
	if len(a.cache) >= a.limit {
		clear(a.cache)
	}
	a.cache[pk] = m
}

// publish moves the committed batch's alias rows into the cache.
func (a *aliases) publish() {
	for pk, m := range a.staged {
		a.remember(pk, m)
	}
	clear(a.staged)
}

package aggregator

import (
	"math/bits"
	"slices"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// maxFlushCells bounds the cells of one flush request. A request holds
// about 12 bytes a cell plus its strings, so a window of any size goes out
// in requests of a few MB, well under the combiner's message limit.
const maxFlushCells = 100_000

// encodeScratch is flushRequests' scratch space, kept across flushes:
// dictIdx[v] is the index, in the dictionary of the request being built, of
// interned value v, valid when stamp[v] is that request's number.
type encodeScratch struct {
	dictIdx, stamp []uint32
	number         uint32
	cells          []cellRef
	shardOf        []uint32
}

// cellRef is a cell of a window being encoded, and its aggregate's index.
type cellRef struct {
	key cellKey
	agg int32
}

// flushRequests encodes one window's cells, whose keys are in keys and
// whose numbers are of numbering, as requests in the columnar
// layout, one or more per shard of the global cube (schema.Shard), each of
// at most maxFlushCells cells and with its own string dictionary. The
// caller numbers them. Cells are grouped by shard first, so that one
// request is built at a time. It runs under flushMu, which guards a.encode.
func (a *Aggregator) flushRequests(start int64, w *window, keys []cellKey, numbering uint64, values []string, shards int) []*wirepb.FlushRequest {
	// The cells in the order the window made them (their aggregates'
	// order): every cuboid's cells then go in the order of their first
	// events, and the store, which numbers new cells in the order they
	// come, numbers a cell and its children alike, so that a read
	// following alias rows from a cuboid to a finer one moves forward.
	cells := slices.Grow(a.encode.cells[:0], len(w.aggs))[:len(w.aggs)]
	for i, id := range w.ids {
		cells[i] = cellRef{keys[id], int32(i)}
	}
	// shardOf[i] is the shard of cells[i]; a counting sort groups the
	// cells by shard.
	shardOf := slices.Grow(a.encode.shardOf[:0], len(cells))[:len(cells)]
	clear(shardOf)
	if shards > 1 {
		counts := make([]int, shards+1)
		var vals []string
		for i, c := range cells {
			f := a.fams[c.key.fam]
			mask := f.masks[c.key.cuboid]
			vals = vals[:0]
			for j := range c.key.v {
				if mask&(1<<j) != 0 {
					vals = append(vals, values[c.key.v[j]])
				}
			}
			shardOf[i] = schema.Shard(f.Name, c.key.cuboid, vals, shards)
			counts[shardOf[i]+1]++
		}
		for s := 1; s <= shards; s++ {
			counts[s] += counts[s-1]
		}
		sorted := make([]cellRef, len(cells))
		sortedShard := make([]uint32, len(cells))
		for i, c := range cells {
			at := counts[shardOf[i]]
			sorted[at], sortedShard[at] = c, shardOf[i]
			counts[shardOf[i]]++
		}
		cells, shardOf = sorted, sortedShard
	}
	defer func() { a.encode.cells, a.encode.shardOf = cells[:0], shardOf[:0] }()
	var reqs []*wirepb.FlushRequest
	sc := &a.encode
	if len(sc.stamp) < len(values) {
		sc.dictIdx = make([]uint32, len(values))
		sc.stamp = make([]uint32, len(values))
		sc.number = 0
	}
	famIdx := make([]uint32, len(a.fams))
	for lo := 0; lo < len(cells); {
		shard := shardOf[lo]
		hi := lo + 1
		for hi < len(cells) && hi-lo < maxFlushCells && shardOf[hi] == shard {
			hi++
		}
		n := hi - lo
		req := &wirepb.FlushRequest{
			Source: a.source, WindowStartMs: start, Shard: shard, Shards: uint32(shards), Numbering: numbering,
			CellFamilies: make([]uint32, 0, n),
			CellCuboids:  make([]uint32, 0, n),
			CellSums:     make([]float64, 0, n),
			CellCounts:   make([]uint64, 0, n),
			CellNumbers:  make([]uint32, 0, n),
		}
		sc.number++
		if sc.number == 0 { // wrapped around: no stamp may match
			clear(sc.stamp)
			sc.number = 1
		}
		for i := range famIdx {
			famIdx[i] = ^uint32(0)
		}
		nv := 0
		for _, c := range cells[lo:hi] {
			nv += bits.OnesCount16(a.fams[c.key.fam].masks[c.key.cuboid])
		}
		req.CellValues = make([]uint32, 0, nv)
		for _, c := range cells[lo:hi] {
			f := a.fams[c.key.fam]
			if famIdx[c.key.fam] == ^uint32(0) {
				famIdx[c.key.fam] = uint32(len(req.Dict))
				req.Dict = append(req.Dict, f.Name)
			}
			req.CellFamilies = append(req.CellFamilies, famIdx[c.key.fam])
			req.CellCuboids = append(req.CellCuboids, uint32(c.key.cuboid))
			mask := f.masks[c.key.cuboid]
			for j := range c.key.v {
				if mask&(1<<j) == 0 {
					continue
				}
				v := c.key.v[j]
				if sc.stamp[v] != sc.number {
					sc.stamp[v], sc.dictIdx[v] = sc.number, uint32(len(req.Dict))
					req.Dict = append(req.Dict, values[v])
				}
				req.CellValues = append(req.CellValues, sc.dictIdx[v])
			}
			req.CellSums = append(req.CellSums, w.aggs[c.agg].sum)
			req.CellCounts = append(req.CellCounts, w.aggs[c.agg].count)
			req.CellNumbers = append(req.CellNumbers, uint32(w.ids[c.agg]))
		}
		reqs = append(reqs, req)
		lo = hi
	}
	return reqs
}

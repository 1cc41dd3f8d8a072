package fanout

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"maps"
	"slices"

	"github.com/prometheus/prometheus/model/labels"
	"google.golang.org/grpc"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The reads of a view: each asks the replicas its fan-out picked, over the
// read protocol, and merges their answers.

func shardSet(n int, shards []int) *wirepb.ShardSet {
	set := &wirepb.ShardSet{Count: uint32(n), Shards: make([]uint32, len(shards))}
	for i, s := range shards {
		set.Shards[i] = uint32(s)
	}
	return set
}

var matchTypes = map[labels.MatchType]wirepb.MatchType{
	labels.MatchEqual:     wirepb.MatchType_MATCH_TYPE_EQUAL,
	labels.MatchNotEqual:  wirepb.MatchType_MATCH_TYPE_NOT_EQUAL,
	labels.MatchRegexp:    wirepb.MatchType_MATCH_TYPE_REGEXP,
	labels.MatchNotRegexp: wirepb.MatchType_MATCH_TYPE_NOT_REGEXP,
}

// matchers converts matchers for the wire. Those on the metric name are
// left out: the query layer has mapped the name to the family.
func matchers(ms []*labels.Matcher) []*wirepb.Matcher {
	out := make([]*wirepb.Matcher, 0, len(ms))
	for _, m := range ms {
		if m.Name != labels.MetricName {
			out = append(out, &wirepb.Matcher{Type: matchTypes[m.Type], Name: m.Name, Value: m.Value})
		}
	}
	return out
}

// cuboid checks a family and cuboid before any replica is asked.
func (v *view) cuboid(family string, id schema.CuboidID) (schema.Cuboid, error) {
	f := v.r.opts.Schema.Family(family)
	if f == nil {
		return schema.Cuboid{}, fmt.Errorf("fanout: unknown family %q", family)
	}
	c, ok := f.Cuboid(id)
	if !ok {
		return schema.Cuboid{}, fmt.Errorf("fanout: family %q has no cuboid %d", family, id)
	}
	return c, nil
}

// Cells returns the cells of every shard, read from each shard's replica,
// with view cell IDs: the shard above localBits, the replica's ID below.
func (v *view) Cells(family string, cuboid schema.CuboidID, ms []*labels.Matcher) ([]tsdb.Cell, error) {
	cub, err := v.cuboid(family, cuboid)
	if err != nil {
		return nil, err
	}
	wms := matchers(ms)
	parts, err := fanOut(v, "cells", v.allShards(), true, func(ctx context.Context, c wirepb.ReadClient, shards []int) ([]tsdb.Cell, error) {
		stream, err := c.Cells(ctx, &wirepb.CellsRequest{Family: family, Cuboid: uint32(cuboid), Matchers: wms, Shards: shardSet(v.shards, shards)})
		if err != nil {
			return nil, err
		}
		return v.readCells(stream, family, cub, shards)
	})
	if err != nil {
		return nil, err
	}
	var out []tsdb.Cell
	for _, p := range parts {
		out = append(out, p.val...)
	}
	return out, nil
}

// readCells reads a Cells stream, checking every cell: its values fit the
// cuboid, it belongs to one of the shards asked for, and its ID is new and
// fits the view's IDs.
func (v *view) readCells(stream grpc.ServerStreamingClient[wirepb.CellsChunk], family string, cub schema.Cuboid, shards []int) ([]tsdb.Cell, error) {
	asked := make(map[uint32]bool, len(shards))
	for _, s := range shards {
		asked[uint32(s)] = true
	}
	seen := map[uint32]bool{}
	var out []tsdb.Cell
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		for _, c := range chunk.Cells {
			if len(c.Values) != len(cub.Labels) {
				return nil, badReply("a cell of %q with %d values, want %d", family, len(c.Values), len(cub.Labels))
			}
			s := schema.Shard(family, cub.ID, c.Values, v.shards)
			if !asked[s] {
				return nil, badReply("cell %v of %q belongs to shard %d, which was not asked for", c.Values, family, s)
			}
			if uint64(c.Id) >= 1<<v.localBits {
				return nil, fmt.Errorf("%w: cell ID %d of %s is beyond the %d a query can address with %d shards; a cuboid holds too many cells on one combiner for this shard count",
					errTooManyCells, c.Id, family, uint64(1)<<v.localBits, v.shards)
			}
			if seen[c.Id] {
				return nil, badReply("cell ID %d sent twice", c.Id)
			}
			seen[c.Id] = true
			out = append(out, tsdb.Cell{ID: v.viewID(int(s), c.Id), Values: c.Values})
		}
	}
}

func (v *view) viewID(shard int, local uint32) uint32 {
	return uint32(uint64(shard)<<v.localBits | uint64(local))
}

func (v *view) split(id uint32) (shard int, local uint32) {
	return int(uint64(id) >> v.localBits), uint32(uint64(id) & (1<<v.localBits - 1))
}

// scanBatch is the most cell IDs one Scan request lists: 64Ki IDs take at
// most 320 KiB, far below what a combiner accepts (MaxScanCells, and gRPC's
// 4 MiB).
const scanBatch = 1 << 16

// scanned is the steps of one cell, at steps[from:to] of the buffer of
// the part-th replica's answer.
type scanned struct {
	id             uint32 // view ID
	part, from, to int
}

// scanPart is what one replica's Scan returned.
type scanPart struct {
	cells []scanned
	steps []tsdb.Step
}

// Scan reads each shard's cells from the replica its Cells came from, all
// at once, and calls fn in ascending view ID order. A replica's stream is
// read whole before any of it is used, so a stream that breaks midway
// leaves its shards missing rather than half read.
func (v *view) Scan(res int, family string, cuboid schema.CuboidID, cells []uint32, mint, maxt int64, fn func(cell uint32, steps []tsdb.Step) error) error {
	if _, err := v.cuboid(family, cuboid); err != nil {
		return err
	}
	if res < 0 || res >= len(v.r.opts.Schema.Resolutions) {
		return fmt.Errorf("fanout: resolution %d of %d", res, len(v.r.opts.Schema.Resolutions))
	}
	byShard := map[int][]uint32{}
	for _, id := range cells {
		s, local := v.split(id)
		if s >= v.shards {
			return fmt.Errorf("fanout: cell ID %d names shard %d of %d", id, s, v.shards)
		}
		byShard[s] = append(byShard[s], local)
	}
	todo := slices.Sorted(maps.Keys(byShard))
	v.mu.Lock()
	for _, s := range todo {
		if v.mu.pinned[s] == "" && !v.mu.missing[s] {
			v.mu.Unlock()
			return fmt.Errorf("fanout: cells of shard %d scanned before any were read", s)
		}
	}
	v.mu.Unlock()
	parts, err := fanOut(v, "scan", todo, true, func(ctx context.Context, c wirepb.ReadClient, shards []int) (scanPart, error) {
		// Every shard of one replica lives in its one store, so their IDs
		// never clash.
		var locals []uint32
		view := map[uint32]uint32{}
		for _, s := range shards {
			for _, local := range byShard[s] {
				view[local] = v.viewID(s, local)
				locals = append(locals, local)
			}
		}
		// Batches of ascending IDs keep each request small and the
		// answers, one after the other, ascending.
		slices.Sort(locals)
		var out scanPart
		for batch := range slices.Chunk(locals, scanBatch) {
			req := &wirepb.ScanRequest{Resolution: uint32(res), Family: family, Cuboid: uint32(cuboid), CellIds: batch, MintMs: mint, MaxtMs: maxt}
			asked := make(map[uint32]uint32, len(batch))
			for _, local := range batch {
				asked[local] = view[local]
			}
			stream, err := c.Scan(ctx, req)
			if err != nil {
				return scanPart{}, err
			}
			if err := readScan(&out, stream, asked, mint, maxt); err != nil {
				return scanPart{}, err
			}
		}
		return out, nil
	})
	if err != nil {
		return err
	}
	var all []scanned
	for i, p := range parts {
		for _, c := range p.val.cells {
			c.part = i
			all = append(all, c)
		}
	}
	slices.SortFunc(all, func(a, b scanned) int { return cmp.Compare(a.id, b.id) })
	for _, c := range all {
		if err := fn(c.id, parts[c.part].val.steps[c.from:c.to]); err != nil {
			return err
		}
	}
	return nil
}

// readScan reads a Scan stream whole, checking it: cells ascending, each
// asked for and sent once (its steps may span consecutive messages), steps
// ascending within [mint, maxt], the three lists of a cell of one length.
// It appends to out.
func readScan(out *scanPart, stream grpc.ServerStreamingClient[wirepb.ScanChunk], asked map[uint32]uint32, mint, maxt int64) error {
	var last uint32
	started := false
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		for _, c := range chunk.Cells {
			id, ok := asked[c.Id]
			switch {
			case !ok:
				return badReply("steps of cell %d, which was not asked for", c.Id)
			case len(c.StartsMs) != len(c.Sums) || len(c.StartsMs) != len(c.Counts):
				return badReply("cell %d has %d starts, %d sums and %d counts", c.Id, len(c.StartsMs), len(c.Sums), len(c.Counts))
			case len(c.StartsMs) == 0:
				return badReply("cell %d has no steps", c.Id)
			case started && c.Id < last:
				return badReply("cell %d after cell %d", c.Id, last)
			}
			lo := mint // the least start the next step may have
			if !started || c.Id != last {
				out.cells = append(out.cells, scanned{id: id, from: len(out.steps)})
			} else {
				lo = out.steps[len(out.steps)-1].T + 1
			}
			for i, t := range c.StartsMs {
				if t < lo || t > maxt {
					return badReply("cell %d: a step at %d, outside [%d, %d]", c.Id, t, lo, maxt)
				}
				lo = t + 1
				out.steps = append(out.steps, tsdb.Step{T: t, Sum: c.Sums[i], Count: c.Counts[i]})
			}
			out.cells[len(out.cells)-1].to = len(out.steps)
			last, started = c.Id, true
		}
	}
}

// labelsQuery asks every shard's replica and returns the sorted union,
// cut to limit.
func (v *view) labelsQuery(method string, family string, cuboid schema.CuboidID, name string, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error) {
	if _, err := v.cuboid(family, cuboid); err != nil {
		return nil, err
	}
	if limit < 0 {
		return nil, fmt.Errorf("fanout: negative limit %d", limit)
	}
	wms := matchers(ms)
	parts, err := fanOut(v, method, v.allShards(), false, func(ctx context.Context, c wirepb.ReadClient, shards []int) ([]string, error) {
		req := &wirepb.LabelsRequest{Family: family, Cuboid: uint32(cuboid), Name: name, MintMs: mint, MaxtMs: maxt, Limit: uint32(limit), Matchers: wms, Shards: shardSet(v.shards, shards)}
		var resp *wirepb.LabelsResponse
		var err error
		if method == "label_names" {
			resp, err = c.LabelNames(ctx, req)
		} else {
			resp, err = c.LabelValues(ctx, req)
		}
		if err != nil {
			return nil, err
		}
		return resp.Values, nil
	})
	if err != nil {
		return nil, err
	}
	set := map[string]struct{}{}
	for _, p := range parts {
		for _, s := range p.val {
			set[s] = struct{}{}
		}
	}
	out := slices.Sorted(maps.Keys(set))
	if limit > 0 && len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

// LabelNames returns the sorted union of every shard's label names.
func (v *view) LabelNames(family string, cuboid schema.CuboidID, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error) {
	return v.labelsQuery("label_names", family, cuboid, "", mint, maxt, limit, ms)
}

// LabelValues returns the sorted union of every shard's values of a label.
func (v *view) LabelValues(family string, cuboid schema.CuboidID, name string, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error) {
	return v.labelsQuery("label_values", family, cuboid, name, mint, maxt, limit, ms)
}

package combiner

import (
	"context"
	"errors"
	"maps"
	"math"
	"slices"

	"github.com/prometheus/prometheus/model/labels"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// ReadStore is what the read service needs of the cube store; tsdb.DB
// satisfies it.
type ReadStore interface {
	Cells(family string, cuboid schema.CuboidID, ms []*labels.Matcher) ([]tsdb.Cell, error)
	Scan(res int, family string, cuboid schema.CuboidID, cells []uint32, mint, maxt int64, fn func(cell uint32, steps []tsdb.Step) error) error
	LabelNames(family string, cuboid schema.CuboidID, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error)
	LabelValues(family string, cuboid schema.CuboidID, name string, mint, maxt int64, limit int, ms []*labels.Matcher) ([]string, error)
}

// Bounds of the read service.
const (
	// MaxScanCells is the most cell IDs one Scan request may list.
	MaxScanCells = 1 << 20
	// MaxShards is the most shards a cube may be split into.
	MaxShards = 1 << 16
	// maxChunkBytes bounds the encoded size of one streamed message, well
	// under gRPC's default 4 MiB limit on what a client receives.
	maxChunkBytes = 1 << 20
	// stepBytes is the most one step takes in a ScanChunk: a 10-byte
	// varint start, an 8-byte sum and a 10-byte varint count.
	stepBytes = 28
)

// ReadServer serves the Read service over the store of a combiner: the
// cells and steps of the shards the combiner holds.
type ReadServer struct {
	wirepb.UnimplementedReadServer
	schema *schema.Schema
	store  ReadStore
}

// NewReadServer returns the read service over store, whose cube follows s.
func NewReadServer(s *schema.Schema, store ReadStore) *ReadServer {
	return &ReadServer{schema: s, store: store}
}

// Register serves the Read service on s.
func (r *ReadServer) Register(s *grpc.Server) { wirepb.RegisterReadServer(s, r) }

// invalid is the status of a request no retry can make acceptable.
func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

// storeError maps a store's error to a status: bad input is the request's
// fault; a closed store is unavailable, so a reader tries another replica.
func storeError(err error) error {
	switch {
	case errors.Is(err, tsdb.ErrBadInput):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, tsdb.ErrClosed):
		return status.Error(codes.Unavailable, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// cuboid checks a request's family and cuboid.
func (r *ReadServer) cuboid(family string, id uint32) (schema.Cuboid, error) {
	f := r.schema.Family(family)
	if f == nil {
		return schema.Cuboid{}, invalid("unknown family %q", family)
	}
	if id > math.MaxUint16 {
		return schema.Cuboid{}, invalid("family %q has no cuboid %d", family, id)
	}
	c, ok := f.Cuboid(schema.CuboidID(id))
	if !ok {
		return schema.Cuboid{}, invalid("family %q has no cuboid %d", family, id)
	}
	return c, nil
}

// matchers converts wire matchers, compiling regular expressions.
func matchers(ms []*wirepb.Matcher) ([]*labels.Matcher, error) {
	out := make([]*labels.Matcher, len(ms))
	for i, m := range ms {
		if m.Name == "" {
			return nil, invalid("matcher %d has no label name", i)
		}
		typ, ok := matchTypes[m.Type]
		if !ok {
			return nil, invalid("matcher %d on %q has unknown type %d", i, m.Name, m.Type)
		}
		lm, err := labels.NewMatcher(typ, m.Name, m.Value)
		if err != nil {
			return nil, invalid("matcher %d on %q: bad regular expression %q: %v", i, m.Name, m.Value, err)
		}
		out[i] = lm
	}
	return out, nil
}

var matchTypes = map[wirepb.MatchType]labels.MatchType{
	wirepb.MatchType_MATCH_TYPE_EQUAL:      labels.MatchEqual,
	wirepb.MatchType_MATCH_TYPE_NOT_EQUAL:  labels.MatchNotEqual,
	wirepb.MatchType_MATCH_TYPE_REGEXP:     labels.MatchRegexp,
	wirepb.MatchType_MATCH_TYPE_NOT_REGEXP: labels.MatchNotRegexp,
}

// shardFilter is a checked ShardSet: nil holds every cell.
type shardFilter struct {
	count int
	in    []bool
}

func shards(set *wirepb.ShardSet) (*shardFilter, error) {
	if set == nil || set.Count <= 1 {
		for _, s := range set.GetShards() {
			if s != 0 {
				return nil, invalid("shard %d is out of range: the cube is not split", s)
			}
		}
		return nil, nil
	}
	if set.Count > MaxShards {
		return nil, invalid("shard count %d is above the limit of %d", set.Count, MaxShards)
	}
	f := &shardFilter{count: int(set.Count), in: make([]bool, set.Count)}
	for _, s := range set.Shards {
		if s >= set.Count {
			return nil, invalid("shard %d is out of range: the cube has %d shards", s, set.Count)
		}
		if f.in[s] {
			return nil, invalid("shard %d is listed twice", s)
		}
		f.in[s] = true
	}
	if len(set.Shards) == int(set.Count) {
		return nil, nil // every shard: nothing to filter out
	}
	return f, nil
}

// keep reports whether the filter holds a cell.
func (f *shardFilter) keep(family string, cuboid schema.CuboidID, values []string) bool {
	return f == nil || f.in[schema.Shard(family, cuboid, values, f.count)]
}

// selection is a request's checked family, cuboid, matchers and shards.
type selection struct {
	family string
	cuboid schema.Cuboid
	ms     []*labels.Matcher
	shards *shardFilter
}

// selection checks the part of a request that selects cells.
func (r *ReadServer) selection(family string, cuboid uint32, wms []*wirepb.Matcher, set *wirepb.ShardSet) (selection, error) {
	c, err := r.cuboid(family, cuboid)
	if err != nil {
		return selection{}, err
	}
	ms, err := matchers(wms)
	if err != nil {
		return selection{}, err
	}
	f, err := shards(set)
	if err != nil {
		return selection{}, err
	}
	return selection{family: family, cuboid: c, ms: ms, shards: f}, nil
}

// cells returns the selected cells.
func (r *ReadServer) cells(sel selection) ([]tsdb.Cell, error) {
	cells, err := r.store.Cells(sel.family, sel.cuboid.ID, sel.ms)
	if err != nil {
		return nil, storeError(err)
	}
	if sel.shards != nil {
		cells = slices.DeleteFunc(cells, func(cell tsdb.Cell) bool { return !sel.shards.keep(sel.family, sel.cuboid.ID, cell.Values) })
	}
	return cells, nil
}

// Cells streams the cells of the request's shards, in messages of at most
// about maxChunkBytes.
func (r *ReadServer) Cells(req *wirepb.CellsRequest, stream grpc.ServerStreamingServer[wirepb.CellsChunk]) error {
	sel, err := r.selection(req.Family, req.Cuboid, req.Matchers, req.Shards)
	if err != nil {
		return err
	}
	cells, err := r.cells(sel)
	if err != nil {
		return err
	}
	chunk := &wirepb.CellsChunk{}
	size := 0
	for _, c := range cells {
		chunk.Cells = append(chunk.Cells, &wirepb.ReadCell{Id: c.ID, Values: c.Values})
		size += 8
		for _, v := range c.Values {
			size += len(v) + 2
		}
		if size >= maxChunkBytes {
			if err := stream.Send(chunk); err != nil {
				return err
			}
			chunk, size = &wirepb.CellsChunk{}, 0
		}
	}
	if len(chunk.Cells) == 0 {
		return nil
	}
	return stream.Send(chunk)
}

// Scan streams the steps of the listed cells. A message holds at most
// about maxChunkBytes; a cell with more steps is split over several. It
// stops at the next cell once the reader is gone.
func (r *ReadServer) Scan(req *wirepb.ScanRequest, stream grpc.ServerStreamingServer[wirepb.ScanChunk]) error {
	if _, err := r.cuboid(req.Family, req.Cuboid); err != nil {
		return err
	}
	if int(req.Resolution) >= len(r.schema.Resolutions) {
		return invalid("resolution %d is out of range: the schema has %d", req.Resolution, len(r.schema.Resolutions))
	}
	if len(req.CellIds) > MaxScanCells {
		return invalid("%d cell IDs, more than the %d one scan may list", len(req.CellIds), MaxScanCells)
	}
	if len(req.CellIds) == 0 {
		return nil // nil would read every cell
	}
	chunk := &wirepb.ScanChunk{}
	size := 0
	send := func() error {
		err := stream.Send(chunk)
		chunk, size = &wirepb.ScanChunk{}, 0
		return err
	}
	ctx := stream.Context()
	err := r.store.Scan(int(req.Resolution), req.Family, schema.CuboidID(req.Cuboid), req.CellIds, req.MintMs, req.MaxtMs, func(id uint32, steps []tsdb.Step) error {
		if err := ctx.Err(); err != nil {
			return status.FromContextError(err).Err() // the reader is gone
		}
		for len(steps) > 0 {
			n := min(len(steps), (maxChunkBytes-size)/stepBytes+1)
			sc := &wirepb.ScanCell{Id: id, StartsMs: make([]int64, n), Sums: make([]float64, n), Counts: make([]uint64, n)}
			for i, s := range steps[:n] {
				sc.StartsMs[i], sc.Sums[i], sc.Counts[i] = s.T, s.Sum, s.Count
			}
			chunk.Cells = append(chunk.Cells, sc)
			size += 8 + n*stepBytes
			steps = steps[n:]
			if size >= maxChunkBytes {
				if err := send(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return err // the stream's own error
		}
		return storeError(err)
	}
	if len(chunk.Cells) == 0 {
		return nil
	}
	return send()
}

// labelsQuery answers LabelNames or LabelValues. Over the whole cube, or
// every shard, the store answers from its index. Over some shards, the
// cells of those shards answer, from their values; over a bounded time
// range, a name or value they hold counts only when the store's index also
// finds it among the cells with data in the range. The store may hold
// other shards' cells, so that is exact only when those cells agree; every
// replica of a shard holds the same cells, so a reader that reads all
// shards gets the same union either way.
func (r *ReadServer) labelsQuery(req *wirepb.LabelsRequest, names bool) (*wirepb.LabelsResponse, error) {
	sel, err := r.selection(req.Family, req.Cuboid, req.Matchers, req.Shards)
	if err != nil {
		return nil, err
	}
	if req.MintMs > req.MaxtMs {
		return nil, invalid("mint %d is after maxt %d", req.MintMs, req.MaxtMs)
	}
	c := sel.cuboid
	index := func(limit int) ([]string, error) {
		if names {
			return r.store.LabelNames(req.Family, c.ID, req.MintMs, req.MaxtMs, limit, sel.ms)
		}
		return r.store.LabelValues(req.Family, c.ID, req.Name, req.MintMs, req.MaxtMs, limit, sel.ms)
	}
	if sel.shards == nil {
		vals, err := index(int(req.Limit))
		if err != nil {
			return nil, storeError(err)
		}
		return &wirepb.LabelsResponse{Values: vals}, nil
	}
	cells, err := r.cells(sel)
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for _, cell := range cells {
		for i, v := range cell.Values {
			switch {
			case v == "":
			case names:
				set[c.Labels[i]] = true
			case c.Labels[i] == req.Name:
				set[v] = true
			}
		}
	}
	var out []string
	if req.MintMs == math.MinInt64 && req.MaxtMs == math.MaxInt64 {
		out = slices.Sorted(maps.Keys(set))
	} else {
		all, err := index(0)
		if err != nil {
			return nil, storeError(err)
		}
		for _, v := range all {
			if set[v] {
				out = append(out, v)
			}
		}
	}
	if req.Limit > 0 && len(out) > int(req.Limit) {
		out = out[:req.Limit]
	}
	return &wirepb.LabelsResponse{Values: out}, nil
}

// LabelNames returns the names of the labels the selected cells hold with
// a non-empty value, ascending.
func (r *ReadServer) LabelNames(_ context.Context, req *wirepb.LabelsRequest) (*wirepb.LabelsResponse, error) {
	return r.labelsQuery(req, true)
}

// LabelValues returns the non-empty values of one label over the selected
// cells, ascending.
func (r *ReadServer) LabelValues(_ context.Context, req *wirepb.LabelsRequest) (*wirepb.LabelsResponse, error) {
	if req.Name == "" {
		return nil, invalid("no label name")
	}
	return r.labelsQuery(req, false)
}

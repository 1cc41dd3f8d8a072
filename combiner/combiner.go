package combiner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Store is what the combiner needs of the cube store.
type Store interface {
	// ApplyDict adds deltas, whose strings are indexes into dict, to the
	// store, unless the batch with the same id was applied before.
	ApplyDict(id tsdb.BatchID, dict []string, deltas []tsdb.DictDelta) (applied bool, err error)
	// ApplyDictUnsynced is ApplyDict returning before the batch is
	// durable; Sync makes every batch applied before it durable.
	ApplyDictUnsynced(id tsdb.BatchID, dict []string, deltas []tsdb.DictDelta) (applied bool, err error)
	Sync() error
}

// Options configure a Combiner.
type Options struct {
	// Store persists the global cube. Required.
	Store Store
	// Schema is the store's schema: it says how many values each cuboid's
	// cells carry. Required.
	Schema *schema.Schema
	// Ready, when set, is asked before every flush: while it returns an
	// error, flushes are refused with gRPC Unavailable, and the
	// aggregators retry them later. In a node, it refuses them while the
	// store's disk is below its free-space floor or the store has failed.
	// nil, the default, is always ready.
	Ready func() error
	// Logger receives operational logs. nil discards them.
	Logger *slog.Logger
	// Registerer registers the combiner's metrics. nil registers none.
	Registerer prometheus.Registerer
}

// ErrBadFlush marks a flush that does not fit the schema; nothing of it is
// written.
var ErrBadFlush = errors.New("combiner: bad flush")

// Combiner applies flushes to the store.
type Combiner struct {
	opts    Options
	metrics *metrics
	// slots admits the flushes served over gRPC: one decodes while
	// another is applied, and the others wait for a slot until their
	// caller gives up. A store whose head is full parks the one it is
	// applying, so without them every retry of a flush would park a
	// goroutine holding its cells.
	slots chan struct{}
}

// flushSlots is how many served flushes a combiner holds at once.
const flushSlots = 2

// New builds a combiner.
func New(opts Options) (*Combiner, error) {
	if opts.Store == nil || opts.Schema == nil {
		return nil, errors.New("combiner: invalid options: a store and a schema are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Combiner{opts: opts, metrics: newMetrics(opts.Registerer), slots: make(chan struct{}, flushSlots)}, nil
}

// Apply resolves a flush's dictionary references and writes it; the store
// checks the cells against the schema. It reports whether the flush was a
// duplicate of one applied before. A flush that does not fit is refused
// whole with an error wrapping ErrBadFlush. The flush is durable when Apply
// returns.
func (c *Combiner) Apply(req *wirepb.FlushRequest) (duplicate bool, err error) {
	return c.apply(req, true)
}

// apply is Apply, which returns before the flush is durable unless synced
// (the store's ApplyDictUnsynced).
func (c *Combiner) apply(req *wirepb.FlushRequest, synced bool) (duplicate bool, err error) {
	sc := scratchPool.Get().(*scratch)
	defer scratchPool.Put(sc)
	defer sc.clear()
	deltas, err := c.deltas(req, sc)
	if err != nil {
		c.metrics.refused.Inc()
		return false, err
	}
	// An aggregator numbers its flushes across windows and sends each
	// replica its flushes in that order, retrying one until it is taken,
	// so the store's window of recent sequences recognises every retry.
	applyDict := c.opts.Store.ApplyDict
	if !synced {
		applyDict = c.opts.Store.ApplyDictUnsynced
	}
	applied, err := applyDict(tsdb.BatchID{Source: req.Source, Seq: req.Sequence, Numbering: req.Numbering}, req.Dict, deltas)
	if errors.Is(err, tsdb.ErrBadInput) {
		c.metrics.refused.Inc()
		return false, fmt.Errorf("%w from %s: %w", ErrBadFlush, req.Source, err)
	}
	if err != nil {
		return false, fmt.Errorf("combiner: cannot apply flush from %s: %w", req.Source, err)
	}
	if !applied {
		c.metrics.duplicates.Inc()
		c.opts.Logger.Info("duplicate flush ignored", "source", req.Source, "window", req.WindowStartMs, "sequence", req.Sequence)
		return true, nil
	}
	c.metrics.applied.Inc()
	c.metrics.cells.Add(float64(len(deltas)))
	return false, nil
}

// scratch is the room a flush's deltas take, reused: the store copies what
// it keeps.
type scratch struct {
	deltas []tsdb.DictDelta
	values []string
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

// clear drops sc's references to a flush, which the pool would keep.
func (sc *scratch) clear() {
	clear(sc.deltas)
	clear(sc.values)
	sc.deltas, sc.values = sc.deltas[:0], sc.values[:0]
}

// deltas checks a flush's cells and returns them as deltas, in sc's room:
// their strings stay indexes into the flush's dictionary, which the store
// resolves once per string.
func (c *Combiner) deltas(req *wirepb.FlushRequest, sc *scratch) ([]tsdb.DictDelta, error) {
	if req.Source == "" {
		return nil, fmt.Errorf("%w: no source", ErrBadFlush)
	}
	shards := max(int(req.Shards), 1) // 0: an unsharded flush
	if int(req.Shard) >= shards {
		return nil, fmt.Errorf("%w: shard %d out of %d", ErrBadFlush, req.Shard, shards)
	}
	dict := req.Dict
	n := len(req.CellCounts)
	sums, whole := len(req.CellSums), req.CellWholeSums
	if len(whole) > 0 {
		if sums > 0 {
			return nil, fmt.Errorf("%w: %d sums and %d whole sums", ErrBadFlush, sums, len(whole))
		}
		sums = len(whole)
	}
	if len(req.CellFamilies) != n || len(req.CellCuboids) != n || sums != n {
		return nil, fmt.Errorf("%w: the cell columns have %d families, %d cuboids, %d sums and %d counts", ErrBadFlush, len(req.CellFamilies), len(req.CellCuboids), sums, n)
	}
	if n > 0 && len(req.Cells) > 0 {
		return nil, fmt.Errorf("%w: cells both in columns and as messages", ErrBadFlush)
	}
	numbered := req.Numbering != 0 && len(req.CellNumbers) > 0
	if numbered && len(req.CellNumbers) != n {
		return nil, fmt.Errorf("%w: %d cell numbers for %d cells", ErrBadFlush, len(req.CellNumbers), n)
	}
	deltas := slices.Grow(sc.deltas[:0], n+len(req.Cells))
	values := sc.values[:0] // a cell's values, for its shard
	defer func() { sc.values, sc.deltas = values, deltas }()
	// add appends cell i, its values the dictionary indexes vals.
	outside := func(i uint32) error {
		if int(i) >= len(dict) {
			return fmt.Errorf("%w: index %d outside the dictionary of %d strings", ErrBadFlush, i, len(dict))
		}
		return nil
	}
	add := func(i int, family, cuboid uint32, vals []uint32, sum float64, count uint64) error {
		if err := outside(family); err != nil {
			return err
		}
		if cuboid > math.MaxUint16 {
			return fmt.Errorf("%w: cell %d: cuboid %d is out of range", ErrBadFlush, i, cuboid)
		}
		for _, v := range vals {
			if err := outside(v); err != nil {
				return err
			}
			if dict[v] == "" {
				// Aggregators refuse events with an empty label, and
				// PromQL would read one as an absent label.
				return fmt.Errorf("%w: cell %d of %q has an empty value", ErrBadFlush, i, dict[family])
			}
		}
		// With one shard every cell is in shard 0, which req.Shard is:
		// the hash would tell nothing.
		if shards > 1 {
			values = values[:0]
			for _, v := range vals {
				values = append(values, dict[v])
			}
			if sh := schema.Shard(dict[family], schema.CuboidID(cuboid), values, shards); sh != req.Shard {
				return fmt.Errorf("%w: cell %d of %q belongs to shard %d, the flush is for shard %d of %d", ErrBadFlush, i, dict[family], sh, req.Shard, shards)
			}
		}
		deltas = append(deltas, tsdb.DictDelta{
			Family: family,
			Cuboid: schema.CuboidID(cuboid),
			Values: vals,
			Time:   req.WindowStartMs,
			Sum:    sum,
			Count:  count,
		})
		return nil
	}
	for i, cell := range req.Cells {
		if err := add(i, cell.Family, cell.Cuboid, cell.Values, cell.Sum, cell.Count); err != nil {
			return nil, err
		}
	}
	err := eachColumnCell(c.opts.Schema, req, func(i int, vals []uint32) error {
		var sum float64
		if len(whole) > 0 {
			sum = float64(whole[i])
		} else {
			sum = req.CellSums[i]
		}
		if err := add(i, req.CellFamilies[i], req.CellCuboids[i], vals, sum, req.CellCounts[i]); err != nil {
			return err
		}
		if numbered && req.CellNumbers[i] < math.MaxUint32 {
			deltas[len(deltas)-1].Number = req.CellNumbers[i] + 1
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return deltas, nil
}

// eachColumnCell calls fn with each cell a flush holds in columns and its
// values: the next as many entries of cell_values as its cuboid has labels
// in s. The columns must have one length.
func eachColumnCell(s *schema.Schema, req *wirepb.FlushRequest, fn func(i int, vals []uint32) error) error {
	rest := req.CellValues
	// The family of the last cell: cells come in runs of one family.
	var (
		f      *schema.Family
		fi     uint32
		looked bool
	)
	for i, family := range req.CellFamilies {
		if int(family) >= len(req.Dict) {
			return fmt.Errorf("%w: index %d outside the dictionary of %d strings", ErrBadFlush, family, len(req.Dict))
		}
		if !looked || family != fi {
			f, fi, looked = s.Family(req.Dict[family]), family, true
		}
		labels := 0
		if f != nil {
			if cub, ok := f.Cuboid(schema.CuboidID(req.CellCuboids[i])); ok {
				labels = len(cub.Labels)
			}
		}
		if labels > len(rest) {
			return fmt.Errorf("%w: cell %d needs %d values, %d are left", ErrBadFlush, i, labels, len(rest))
		}
		if err := fn(i, rest[:labels]); err != nil {
			return err
		}
		rest = rest[labels:]
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: %d values left after the last cell", ErrBadFlush, len(rest))
	}
	return nil
}

// cellsLayout returns a marshalled flush with the cells of data, a
// marshalled flush, as messages rather than in columns: what a combiner
// that predates the columns reads.
func cellsLayout(s *schema.Schema, data wire.Encoded) (wire.Encoded, error) {
	var req wirepb.FlushRequest
	if err := proto.Unmarshal(data, &req); err != nil {
		return nil, fmt.Errorf("combiner: cannot decode a logged flush: %w", err)
	}
	if len(req.CellCounts) == 0 {
		return data, nil
	}
	if n := len(req.CellCounts); len(req.CellFamilies) != n || len(req.CellCuboids) != n || len(req.CellSums) != n {
		return nil, fmt.Errorf("%w: the cell columns have different lengths", ErrBadFlush)
	}
	req.Cells = make([]*wirepb.FlushCell, 0, len(req.CellCounts))
	err := eachColumnCell(s, &req, func(i int, vals []uint32) error {
		req.Cells = append(req.Cells, &wirepb.FlushCell{Family: req.CellFamilies[i], Cuboid: req.CellCuboids[i], Values: vals, Sum: req.CellSums[i], Count: req.CellCounts[i]})
		return nil
	})
	if err != nil {
		return nil, err
	}
	req.CellFamilies, req.CellCuboids, req.CellValues, req.CellSums, req.CellCounts = nil, nil, nil, nil, nil
	return proto.Marshal(&req)
}

// doubleSums is a logged flush with its whole sums (wire.WholeSums) back
// in cell_sums, as doubles.
func doubleSums(data wire.Encoded) (wire.Encoded, error) {
	var req wirepb.FlushRequest
	if err := proto.Unmarshal(data, &req); err != nil {
		return nil, fmt.Errorf("combiner: cannot decode a logged flush: %w", err)
	}
	req.CellSums = make([]float64, len(req.CellWholeSums))
	for i, s := range req.CellWholeSums {
		req.CellSums[i] = float64(s)
	}
	req.CellWholeSums = nil
	return proto.Marshal(&req)
}

// Register serves the Combiner service on s.
func (c *Combiner) Register(s *grpc.Server) {
	wirepb.RegisterCombinerServer(s, server{c: c})
}

type server struct {
	wirepb.UnimplementedCombinerServer
	c *Combiner
}

func (s server) Flush(ctx context.Context, req *wirepb.FlushRequest) (*wirepb.FlushResponse, error) {
	dup, err := s.c.take(ctx, req, true)
	if err != nil {
		return nil, err
	}
	return &wirepb.FlushResponse{Duplicate: dup}, nil
}

// take applies a flush an aggregator delivered, by gRPC or in process,
// once a slot is free and the node is ready, and answers with the status
// the aggregator acts on: InvalidArgument for a flush no retry can make
// acceptable, Unavailable (or the context's code) for one to retry. An
// unsynced flush is durable only once the store's Sync returns (Local).
func (c *Combiner) take(ctx context.Context, req *wirepb.FlushRequest, synced bool) (duplicate bool, err error) {
	select {
	case c.slots <- struct{}{}:
		defer func() { <-c.slots }()
	case <-ctx.Done():
		return false, status.FromContextError(ctx.Err()).Err()
	}
	if err := ctx.Err(); err != nil {
		return false, status.FromContextError(err).Err() // the aggregator retries it
	}
	if ready := c.opts.Ready; ready != nil {
		if err := ready(); err != nil {
			c.metrics.unready.Inc()
			return false, status.Error(codes.Unavailable, err.Error())
		}
	}
	dup, err := c.apply(req, synced)
	switch {
	case errors.Is(err, ErrBadFlush):
		// No retry can make the flush acceptable.
		return false, status.Error(codes.InvalidArgument, err.Error())
	case err != nil:
		c.opts.Logger.Error("flush not applied", "source", req.Source, "window", req.WindowStartMs, "err", err)
		return false, status.Error(codes.Unavailable, err.Error())
	}
	return dup, nil
}

// Local is the aggregator's sink for a combiner in the same process: it
// hands each flush to the combiner directly, decoded from the bytes it was
// logged as, and answers with the status codes the combiner's gRPC server
// would, so that the aggregator retries and gives up on exactly what it
// would over the network. It saves the round trip through the gRPC stack
// that otherwise stood between the aggregator and the store, in series
// with every apply: a third of the time of the aggregator's sender during a
// backfill. Like Client, it is one shard and one replica, which every
// replica name reaches.
//
// A flush it applies is durable only once Sync returns: a crash of the
// process takes the aggregator down with the combiner, and the aggregator
// keeps each flush in its log until it has called Sync, so one fsync
// covers every flush delivered since the last, and the aggregator's
// sender does not wait for one a flush (more than half of its time during
// a backfill).
type Local struct {
	name string
	c    *Combiner
}

// Local returns the in-process sink of c, a combiner named name.
func (c *Combiner) Local(name string) *Local { return &Local{name: name, c: c} }

// Shards is 1: the combiner holds the whole cube.
func (l *Local) Shards() int { return 1 }

// Replicas names the one combiner.
func (l *Local) Replicas(uint32) []string { return []string{l.name} }

// Flush applies one partial cube.
func (l *Local) Flush(ctx context.Context, _ string, f *wire.Flush) error {
	req := f.Request
	if req == nil {
		req = new(wirepb.FlushRequest)
		if err := proto.Unmarshal(f.Data, req); err != nil {
			return status.Errorf(codes.InvalidArgument, "combiner: the flush does not decode: %v", err)
		}
	}
	_, err := l.c.take(ctx, req, false)
	return err
}

// InProcess is true: the combiner is in the aggregator's process.
func (l *Local) InProcess(string) bool { return true }

// Sync makes every flush applied before it durable.
func (l *Local) Sync(string) error { return l.c.opts.Store.Sync() }

// FlushColumns is Flush: a combiner reads either layout by either method.
func (s server) FlushColumns(ctx context.Context, req *wirepb.FlushRequest) (*wirepb.FlushResponse, error) {
	return s.Flush(ctx, req)
}

// Client adapts a gRPC connection to one combiner, holding the whole cube,
// into the aggregator's sink: one shard, one replica.
type Client struct {
	name   string
	conn   grpc.ClientConnInterface
	schema *schema.Schema
}

// NewClient returns a sink that flushes over conn to the combiner named
// name, whose cube has schema s.
func NewClient(name string, conn grpc.ClientConnInterface, s *schema.Schema) *Client {
	return &Client{name: name, conn: conn, schema: s}
}

// Shards is 1: the combiner holds the whole cube.
func (c *Client) Shards() int { return 1 }

// Replicas names the one combiner.
func (c *Client) Replicas(uint32) []string { return []string{c.name} }

// Flush sends one partial cube to the combiner, as the bytes it was
// marshalled into, by FlushColumns. A combiner that predates the columnar
// layout answers that Unimplemented, and gets the same cells as messages by
// Flush: during a rolling upgrade, old and new nodes flush to each other.
// Every replica name reaches it: requests logged under an earlier name of
// the node (the host name, when a container restarts under a new one) must
// still be delivered, and the combiner holds the whole cube.
func (c *Client) Flush(ctx context.Context, _ string, f *wire.Flush) error {
	data := f.Data
	if f.WholeSums {
		// Logged for the node's own combiner, which is now another
		// node's (the node was renamed, or gave up the role): sent as
		// every combiner reads it.
		var err error
		if data, err = doubleSums(data); err != nil {
			return err
		}
	}
	err := wire.Invoke(ctx, c.conn, wirepb.Combiner_FlushColumns_FullMethodName, data, new(wirepb.FlushResponse))
	if status.Code(err) != codes.Unimplemented {
		return err
	}
	data, err = cellsLayout(c.schema, data)
	if err != nil {
		return err
	}
	return wire.Invoke(ctx, c.conn, wirepb.Combiner_Flush_FullMethodName, data, new(wirepb.FlushResponse))
}

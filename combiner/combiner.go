package combiner

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Store is what the combiner needs of the cube store.
type Store interface {
	// Apply merges deltas into every resolution at once, unless a write with
	// the same idempotency key was applied before.
	Apply(idempotencyKey []byte, keyTime int64, deltas []tsdb.Delta) (applied bool, err error)
}

// Options configure a Combiner.
type Options struct {
	// Store persists the global cube. Required.
	Store Store
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
}

// New builds a combiner.
func New(opts Options) (*Combiner, error) {
	if opts.Store == nil {
		return nil, errors.New("combiner: invalid options: a store is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Combiner{opts: opts, metrics: newMetrics(opts.Registerer)}, nil
}

// Apply resolves a flush's dictionary references and writes it; the store
// checks the cells against the schema. It reports whether the flush was a
// duplicate of one applied before. A flush that does not fit is refused
// whole with an error wrapping ErrBadFlush.
func (c *Combiner) Apply(req *wirepb.FlushRequest) (duplicate bool, err error) {
	deltas, err := c.deltas(req)
	if err != nil {
		c.metrics.refused.Inc()
		return false, err
	}
	applied, err := c.opts.Store.Apply(flushKey(req), req.WindowStartMs, deltas)
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

// flushKey is the flush's identity: source, window start and sequence.
func flushKey(req *wirepb.FlushRequest) []byte {
	k := make([]byte, 0, len(req.Source)+1+16)
	k = append(k, req.Source...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint64(k, uint64(req.WindowStartMs))
	return binary.BigEndian.AppendUint64(k, req.Sequence)
}

func (c *Combiner) deltas(req *wirepb.FlushRequest) ([]tsdb.Delta, error) {
	if req.Source == "" {
		return nil, fmt.Errorf("%w: no source", ErrBadFlush)
	}
	shards := max(int(req.Shards), 1) // 0: an unsharded flush
	if int(req.Shard) >= shards {
		return nil, fmt.Errorf("%w: shard %d out of %d", ErrBadFlush, req.Shard, shards)
	}
	str := func(i uint32) (string, error) {
		if int(i) >= len(req.Dict) {
			return "", fmt.Errorf("%w: index %d outside the dictionary of %d strings", ErrBadFlush, i, len(req.Dict))
		}
		return req.Dict[i], nil
	}
	deltas := make([]tsdb.Delta, len(req.Cells))
	n := 0
	for _, cell := range req.Cells {
		n += len(cell.Values)
	}
	values := make([]string, 0, n)
	for i, cell := range req.Cells {
		name, err := str(cell.Family)
		if err != nil {
			return nil, err
		}
		if cell.Cuboid > math.MaxUint16 {
			return nil, fmt.Errorf("%w: cell %d: cuboid %d is out of range", ErrBadFlush, i, cell.Cuboid)
		}
		start := len(values)
		for _, v := range cell.Values {
			s, err := str(v)
			if err != nil {
				return nil, err
			}
			if s == "" {
				// Aggregators refuse events with an empty label, and
				// PromQL would read one as an absent label.
				return nil, fmt.Errorf("%w: cell %d of %q has an empty value", ErrBadFlush, i, name)
			}
			values = append(values, s)
		}
		if sh := schema.Shard(name, schema.CuboidID(cell.Cuboid), values[start:], shards); sh != req.Shard {
			return nil, fmt.Errorf("%w: cell %d of %q belongs to shard %d, the flush is for shard %d of %d", ErrBadFlush, i, name, sh, req.Shard, shards)
		}
		deltas[i] = tsdb.Delta{
			Family: name,
			Cuboid: schema.CuboidID(cell.Cuboid),
			Values: values[start:len(values):len(values)],
			Time:   req.WindowStartMs,
			Sum:    cell.Sum,
			Count:  cell.Count,
		}
	}
	return deltas, nil
}

// Register serves the Combiner service on s.
func (c *Combiner) Register(s *grpc.Server) {
	wirepb.RegisterCombinerServer(s, server{c: c})
}

type server struct {
	wirepb.UnimplementedCombinerServer
	c *Combiner
}

func (s server) Flush(_ context.Context, req *wirepb.FlushRequest) (*wirepb.FlushResponse, error) {
	if ready := s.c.opts.Ready; ready != nil {
		if err := ready(); err != nil {
			s.c.metrics.unready.Inc()
			return nil, status.Error(codes.Unavailable, err.Error())
		}
	}
	dup, err := s.c.Apply(req)
	switch {
	case errors.Is(err, ErrBadFlush):
		// No retry can make the flush acceptable.
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case err != nil:
		s.c.opts.Logger.Error("flush not applied", "source", req.Source, "window", req.WindowStartMs, "err", err)
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	return &wirepb.FlushResponse{Duplicate: dup}, nil
}

// Client adapts a gRPC connection to one combiner, holding the whole cube,
// into the aggregator's sink: one shard, one replica.
type Client struct {
	name string
	c    wirepb.CombinerClient
}

// NewClient returns a sink that flushes over conn to the combiner named
// name.
func NewClient(name string, conn grpc.ClientConnInterface) *Client {
	return &Client{name: name, c: wirepb.NewCombinerClient(conn)}
}

// Shards is 1: the combiner holds the whole cube.
func (c *Client) Shards() int { return 1 }

// Replicas names the one combiner.
func (c *Client) Replicas(uint32) []string { return []string{c.name} }

// Flush sends one partial cube to the combiner. Every replica name reaches
// it: requests logged under an earlier name of the node (the host name,
// when a container restarts under a new one) must still be delivered, and
// the combiner holds the whole cube.
func (c *Client) Flush(ctx context.Context, _ string, req *wirepb.FlushRequest) error {
	_, err := c.c.Flush(ctx, req)
	return err
}

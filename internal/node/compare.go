package node

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// comparer has a combiner compare the shards it holds with their other
// replicas (docs/architecture.md, "Replicas compare themselves"): every
// interval, for each resolution, over the range no flush can change any
// more, it asks each alive replica that is not catching up for the digests
// of the shards they share (combiner.ReadServer.Digest) and compares them
// with its own. A shard that differs is asked again once, so that a flush
// applied between the two reads is no divergence.
type comparer struct {
	t        *topology
	local    *combiner.ReadServer
	schema   *schema.Schema
	self     string
	settle   time.Duration // how old a step must be for no flush to change it
	interval time.Duration
	log      *slog.Logger

	comparisons *prometheus.CounterVec
	divergent   *prometheus.GaugeVec
}

// compareRetry is how long the comparer waits before it asks again for
// the digests of a shard that differed.
const compareRetry = 2 * time.Second

func newComparer(t *topology, local *combiner.ReadServer, s *schema.Schema, self string, settle, interval time.Duration, reg prometheus.Registerer, log *slog.Logger) *comparer {
	c := &comparer{t: t, local: local, schema: s, self: self, settle: settle, interval: interval, log: log,
		comparisons: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_cluster_replica_comparisons_total",
			Help: "Comparisons of a shard's digest at one resolution with another replica's, by outcome: same, different (twice in a row), failed (the replica did not answer).",
		}, []string{"outcome"}),
		divergent: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "dimsum_cluster_replica_divergent_shards",
			Help: "Shards this combiner and another replica of them held differently at the last comparison, by replica.",
		}, []string{"replica"}),
	}
	reg.MustRegister(c.comparisons, c.divergent)
	return c
}

// run compares every interval until stop is closed.
func (c *comparer) run(stop <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-stop
		cancel()
	}()
	for {
		select {
		case <-stop:
			return
		case <-time.After(c.interval):
		}
		c.pass(ctx, time.Now())
	}
}

// pass compares the shards this combiner holds with each of their other
// replicas, at every resolution, as of now.
func (c *comparer) pass(ctx context.Context, now time.Time) {
	view := c.t.view.Load()
	if view.behind[c.self] {
		return // catching up: what it lacks is on its way
	}
	byReplica := map[string][]uint32{}
	for shard := range c.t.shards {
		reps := c.t.placement(shard)
		if !slices.Contains(reps, c.self) {
			continue
		}
		for _, r := range reps {
			if r != c.self && view.state[r] == cluster.StateAlive && !view.behind[r] {
				byReplica[r] = append(byReplica[r], uint32(shard))
			}
		}
	}
	for name := range view.state {
		if _, ok := byReplica[name]; !ok {
			c.divergent.DeleteLabelValues(name)
		}
	}
	for r, shards := range byReplica {
		conn, err := c.t.conn(r)
		if err != nil {
			c.comparisons.WithLabelValues("failed").Add(float64(len(shards)))
			continue
		}
		c.divergent.WithLabelValues(r).Set(float64(len(c.compare(ctx, r, conn, shards, now))))
	}
}

// compare compares shards with replica r at every resolution, and returns
// those that differ at some resolution.
func (c *comparer) compare(ctx context.Context, r string, conn grpc.ClientConnInterface, shards []uint32, now time.Time) []uint32 {
	client := wirepb.NewReadClient(conn)
	var differ []uint32
	for res, rs := range c.schema.Resolutions {
		step := rs.Step.Milliseconds()
		// The oldest rows may be gone at one replica and not yet at the
		// other, and the newest may still gain late flushes.
		mint := (now.Add(-rs.Retention).UnixMilli()/rs.RowSpan().Milliseconds() + 2) * rs.RowSpan().Milliseconds()
		maxt := now.Add(-c.settle).UnixMilli()/step*step - 1
		if mint > maxt {
			continue
		}
		req := &wirepb.DigestRequest{Shards: &wirepb.ShardSet{Count: uint32(c.t.shards), Shards: shards}, Resolution: uint32(res), MintMs: mint, MaxtMs: maxt}
		diff, err := c.differ(ctx, client, req)
		if err == nil && len(diff) > 0 {
			select {
			case <-ctx.Done():
				return differ
			case <-time.After(compareRetry):
			}
			req.Shards.Shards = nil
			for _, d := range diff {
				req.Shards.Shards = append(req.Shards.Shards, d.mine.Shard)
			}
			diff, err = c.differ(ctx, client, req)
		}
		if err != nil {
			c.comparisons.WithLabelValues("failed").Add(float64(len(req.Shards.Shards)))
			c.log.Warn("cannot compare shards with another replica", "replica", r, "resolution", rs.Step, "err", err)
			continue
		}
		c.comparisons.WithLabelValues("same").Add(float64(len(shards) - len(diff)))
		c.comparisons.WithLabelValues("different").Add(float64(len(diff)))
		for _, d := range diff {
			c.log.Warn("replicas of a shard hold different data: the one with fewer cells or steps most likely lacks some (its data directory lost?); see docs/operations.md, \"Replicas that differ\"",
				"shard", d.mine.Shard, "replica", r, "resolution", rs.Step,
				"from", time.UnixMilli(mint).UTC(), "to", time.UnixMilli(maxt).UTC(),
				"cells", d.mine.Cells, "steps", d.mine.Steps, "replica_cells", d.theirs.Cells, "replica_steps", d.theirs.Steps)
			if !slices.Contains(differ, d.mine.Shard) {
				differ = append(differ, d.mine.Shard)
			}
		}
	}
	slices.Sort(differ)
	return differ
}

// shardDiff is a shard whose digests differ: this combiner's and the
// other replica's.
type shardDiff struct{ mine, theirs *wirepb.ShardDigest }

// differ asks this combiner and the replica for the digests of req's
// shards, and returns those that differ.
func (c *comparer) differ(ctx context.Context, client wirepb.ReadClient, req *wirepb.DigestRequest) ([]shardDiff, error) {
	mine, err := c.local.Digest(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("this combiner's digest: %w", err)
	}
	theirs, err := client.Digest(ctx, req)
	if err != nil {
		return nil, err
	}
	if len(theirs.Shards) != len(mine.Shards) {
		return nil, fmt.Errorf("%d digests for %d shards", len(theirs.Shards), len(mine.Shards))
	}
	var diff []shardDiff
	for i, m := range mine.Shards {
		o := theirs.Shards[i]
		if o.Shard != m.Shard {
			return nil, fmt.Errorf("the digest of shard %d where shard %d was asked for", o.Shard, m.Shard)
		}
		if o.Cells != m.Cells || o.Steps != m.Steps || o.Sum != m.Sum {
			diff = append(diff, shardDiff{m, o})
		}
	}
	return diff, nil
}

package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

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
	gauged      map[string]bool // the replicas divergent holds a series of
	lacking     []uint32        // the shards last gossiped as lacking
	// file keeps lacking across restarts (lackingFile in the data
	// directory).
	file string
}

// lackingFile is the file in the data directory that keeps the shards a
// combiner found it lacks, so that it gossips them from its start: a
// restart must not have it read as whole until its next comparison. It
// holds their numbers as text, separated by spaces.
const lackingFile = "lacking-shards"

// loadLacking reads the shards file keeps, ascending, each below shards;
// none when there is no file.
func loadLacking(file string, shards int) ([]uint32, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []uint32
	for _, f := range strings.Fields(string(b)) {
		s, err := strconv.ParseUint(f, 10, 32)
		if err != nil || s >= uint64(shards) {
			return nil, fmt.Errorf("%s: %q is not a shard of %d", file, f, shards)
		}
		out = append(out, uint32(s))
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// saveLacking replaces what file keeps with shards, by a rename.
func saveLacking(file string, shards []uint32) error {
	text := make([]string, len(shards))
	for i, s := range shards {
		text[i] = strconv.FormatUint(uint64(s), 10)
	}
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.Join(text, " ")+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// compareRetry is how long the comparer waits before it asks again for
// the digests of a shard that differed.
const compareRetry = 2 * time.Second

// newComparer returns the comparer of combiner self, which gossips lacking,
// kept in file, from its start.
func newComparer(t *topology, local *combiner.ReadServer, s *schema.Schema, self string, settle, interval time.Duration, file string, lacking []uint32, reg prometheus.Registerer, log *slog.Logger) *comparer {
	c := &comparer{t: t, local: local, schema: s, self: self, settle: settle, interval: interval, log: log, file: file, lacking: lacking,
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

// compareSoon is how long the comparer waits before its first pass, and
// before the next one when it could not compare (it was catching up): a
// combiner back on an empty data directory is found within about that,
// not an interval later.
const compareSoon = 30 * time.Second

// run compares every interval until stop is closed.
func (c *comparer) run(stop <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-stop
		cancel()
	}()
	wait := min(c.interval, compareSoon)
	for {
		select {
		case <-stop:
			return
		case <-time.After(wait):
		}
		wait = c.interval
		if !c.pass(ctx, time.Now()) {
			wait = min(c.interval, compareSoon)
		}
	}
}

// compareTimeout bounds one digest call: a replica that stops answering
// holds up the comparer no longer.
const compareTimeout = 10 * time.Minute

// pass compares the shards this combiner holds with each of their other
// replicas, at every resolution, as of now: its own digests once a
// resolution, each replica's for the shards they share. It reports false
// when it compared nothing: this combiner is catching up, no other replica
// of its shards is ready, or no comparison succeeded.
func (c *comparer) pass(ctx context.Context, now time.Time) bool {
	if c.t.view.Load().behind[c.self] {
		return false // catching up: what it lacks is on its way
	}
	byReplica := map[string][]uint32{}
	// held are the shards this combiner holds that another replica ready
	// shares, mine all it holds.
	var held []uint32
	mine := map[uint32]bool{}
	for shard := range c.t.shards {
		reps := c.t.placement(shard)
		if !slices.Contains(reps, c.self) {
			continue
		}
		mine[uint32(shard)] = true
		shared := false
		for _, r := range reps {
			if r != c.self && c.ready(r) {
				byReplica[r] = append(byReplica[r], uint32(shard))
				shared = true
			}
		}
		if shared {
			held = append(held, uint32(shard))
		}
	}
	differ := map[string]map[uint32]bool{}
	// The shards found lacking here; those some comparison found whole,
	// against a replica that does not itself lack them; and those some
	// comparison could not tell. A shard clears only when found whole and
	// never untold: its loss may show at one resolution alone.
	lacking, whole, untold := map[uint32]bool{}, map[uint32]bool{}, map[uint32]bool{}
	told := false // whether some comparison succeeded
	for res, rs := range c.schema.Resolutions {
		if ctx.Err() != nil {
			return true // stopping
		}
		step := rs.Step.Milliseconds()
		// The oldest rows may be gone at one replica and not yet at the
		// other, and the newest may still gain late flushes.
		mint := (now.Add(-rs.Retention).UnixMilli()/rs.RowSpan().Milliseconds() + 2) * rs.RowSpan().Milliseconds()
		maxt := now.Add(-c.settle).UnixMilli()/step*step - 1
		if mint > maxt || len(held) == 0 {
			continue
		}
		digests, err := c.digest(ctx, c.local.Digest, res, mint, maxt, held)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Warn("cannot digest the shards this combiner holds", "resolution", rs.Step, "err", err)
			}
			for _, s := range held {
				untold[s] = true
			}
			continue
		}
		for r, shards := range byReplica {
			diff, less, err := c.compare(ctx, r, digests, res, mint, maxt, shards)
			if ctx.Err() != nil {
				return true
			}
			if err != nil {
				c.comparisons.WithLabelValues("failed").Add(float64(len(shards)))
				c.log.Warn("cannot compare shards with another replica", "replica", r, "resolution", rs.Step, "err", err)
				for _, s := range shards {
					untold[s] = true
				}
				continue
			}
			told = true
			if differ[r] == nil {
				differ[r] = map[uint32]bool{}
			}
			for _, d := range diff {
				differ[r][d] = true
			}
			view := c.t.view.Load()
			for _, s := range shards {
				if !slices.Contains(diff, s) && !view.lacking[r][int(s)] {
					whole[s] = true
				}
			}
			for _, s := range less {
				lacking[s] = true
			}
			if len(less) > 0 {
				// Said at once: the rest of the pass may take long.
				c.announce(slices.Sorted(maps.Keys(merged(lacking, c.lacking))))
			}
		}
	}
	for _, s := range c.lacking {
		if mine[s] && (!whole[s] || untold[s]) {
			lacking[s] = true
		}
	}
	c.announce(slices.Sorted(maps.Keys(lacking)))
	for r := range c.gauged {
		if differ[r] == nil {
			c.divergent.DeleteLabelValues(r)
		}
	}
	c.gauged = map[string]bool{}
	for r, shards := range differ {
		c.divergent.WithLabelValues(r).Set(float64(len(shards)))
		c.gauged[r] = true
	}
	return told
}

// merged is the set of found and the shards of was.
func merged(found map[uint32]bool, was []uint32) map[uint32]bool {
	out := maps.Clone(found)
	for _, s := range was {
		out[s] = true
	}
	return out
}

// ready reports whether replica r is alive and neither it nor this
// combiner is catching up: only then do their digests tell a divergence.
func (c *comparer) ready(r string) bool {
	v := c.t.view.Load()
	return v.state[r] == cluster.StateAlive && !v.behind[r] && !v.behind[c.self]
}

// digest asks one side, this combiner's read service or a replica's, for
// the digests of shards.
func (c *comparer) digest(ctx context.Context, ask func(context.Context, *wirepb.DigestRequest) (*wirepb.DigestResponse, error), res int, mint, maxt int64, shards []uint32) (map[uint32]*wirepb.ShardDigest, error) {
	ctx, cancel := context.WithTimeout(ctx, compareTimeout)
	defer cancel()
	resp, err := ask(ctx, &wirepb.DigestRequest{Shards: &wirepb.ShardSet{Count: uint32(c.t.shards), Shards: shards}, Resolution: uint32(res), MintMs: mint, MaxtMs: maxt})
	if err != nil {
		return nil, err
	}
	if len(resp.Shards) != len(shards) {
		return nil, fmt.Errorf("%d digests for %d shards", len(resp.Shards), len(shards))
	}
	out := map[uint32]*wirepb.ShardDigest{}
	for i, d := range resp.Shards {
		if d.Shard != shards[i] {
			return nil, fmt.Errorf("the digest of shard %d where shard %d was asked for", d.Shard, shards[i])
		}
		out[d.Shard] = d
	}
	return out, nil
}

// compare compares shards with replica r at resolution res, against mine,
// this combiner's digests. Those that differ are asked of both again after
// compareRetry, and those that differ twice, while both are still ready,
// are logged, counted and returned, with those of them this combiner holds
// fewer cells or steps of: less.
func (c *comparer) compare(ctx context.Context, r string, mine map[uint32]*wirepb.ShardDigest, res int, mint, maxt int64, shards []uint32) (diff, less []uint32, err error) {
	conn, err := c.t.conn(r)
	if err != nil {
		return nil, nil, err
	}
	client := wirepb.NewReadClient(conn)
	ask := func(ctx context.Context, req *wirepb.DigestRequest) (*wirepb.DigestResponse, error) {
		return client.Digest(ctx, req)
	}
	theirs, err := c.digest(ctx, ask, res, mint, maxt, shards)
	if err != nil {
		return nil, nil, err
	}
	diff = differing(mine, theirs, shards)
	if len(diff) > 0 {
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(compareRetry):
		}
		if mine, err = c.digest(ctx, c.local.Digest, res, mint, maxt, diff); err != nil {
			return nil, nil, err
		}
		if theirs, err = c.digest(ctx, ask, res, mint, maxt, diff); err != nil {
			return nil, nil, err
		}
		if !c.ready(r) {
			return nil, nil, fmt.Errorf("replica %s stopped being ready during the comparison", r)
		}
		diff = differing(mine, theirs, diff)
	}
	c.comparisons.WithLabelValues("same").Add(float64(len(shards) - len(diff)))
	c.comparisons.WithLabelValues("different").Add(float64(len(diff)))
	rs := c.schema.Resolutions[res]
	for _, d := range diff {
		c.log.Warn("replicas of a shard hold different data: the one with fewer cells or steps most likely lacks some (its data directory lost?); see docs/operations.md, \"Replicas that differ\"",
			"shard", d, "replica", r, "resolution", rs.Step,
			"from", time.UnixMilli(mint).UTC(), "to", time.UnixMilli(maxt).UTC(),
			"cells", mine[d].Cells, "steps", mine[d].Steps, "replica_cells", theirs[d].Cells, "replica_steps", theirs[d].Steps)
		if mine[d].Cells < theirs[d].Cells || mine[d].Steps < theirs[d].Steps {
			less = append(less, d)
		}
	}
	return diff, less, nil
}

// announce gossips the shards this combiner lacks when they changed, so
// that readers prefer the other replicas for them, and warn when only it
// can be read (cluster.Meta.Lacking).
func (c *comparer) announce(lacking []uint32) {
	if slices.Equal(lacking, c.lacking) {
		return
	}
	if err := c.t.members.UpdateMeta(func(m *cluster.Meta) { m.Lacking = lacking }); err != nil {
		c.log.Warn("cannot gossip the shards this combiner lacks", "shards", lacking, "err", err)
		return
	}
	if err := saveLacking(c.file, lacking); err != nil {
		c.log.Warn("cannot keep the shards this combiner lacks: after a restart it is read as whole until it compares itself again", "shards", lacking, "err", err)
	}
	if len(lacking) > 0 {
		c.log.Warn("this combiner holds less of some shards than another replica: queries read them from the others, and warn when only it can answer", "shards", lacking)
	}
	c.lacking = lacking
}

// differing lists the shards whose digests differ.
func differing(mine, theirs map[uint32]*wirepb.ShardDigest, shards []uint32) []uint32 {
	var diff []uint32
	for _, s := range shards {
		m, o := mine[s], theirs[s]
		if m.Cells != o.Cells || m.Steps != o.Steps || m.Sum != o.Sum {
			diff = append(diff, s)
		}
	}
	return diff
}

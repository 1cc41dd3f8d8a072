package node

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/query/fanout"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// topology is a cluster member's view of who does what: which aggregator
// owns a partition key, which combiners hold a shard, and a connection to
// each member. It backs the router, the aggregator's sink and the query
// fan-out. Its lists are rebuilt when the membership changes, so the hot
// paths read them without locks.
type topology struct {
	self        string
	members     *cluster.Cluster
	shards      int
	replication int
	dial        []grpc.DialOption    // how to reach a member's internal listener
	combiners   []string             // the configured combiners; nil: those seen
	handover    time.Duration        // how long an aggregator is dead before its keys move
	gauge       *prometheus.GaugeVec // members by role and state

	view atomic.Pointer[members]
	// returned is called when a member comes back (alive again, or at a
	// new address): the aggregator retries what waits for it at once.
	returned atomic.Pointer[func()]
	conns    struct {
		sync.Mutex
		byAddr map[string]*grpc.ClientConn
	}
	stop chan struct{}
	done chan struct{}
}

// members is one snapshot of the membership, by role.
type members struct {
	// aggregators are the owners of partition keys: alive or dead, not
	// leaving or left, nor handed over. A dead one keeps its keys for
	// handover, and the parts forwarded to it wait in the other
	// aggregators' outboxes.
	aggregators []string
	// handedOver are the aggregators dead for handover or longer: their
	// keys moved to the others, and so do the parts waiting for them.
	handedOver map[string]bool
	// combiners hold the shards: the configured ones, or those seen that
	// did not leave, alive or dead. A dead one keeps its shards, and its
	// flushes wait for it.
	combiners []string
	// behind lists the members for which a request has waited at some
	// alive aggregator for over behindAfter: down, or catching up.
	behind map[string]bool
	// lacking holds, by combiner, the shards it found it holds less of
	// than another replica (cluster.Meta.Lacking).
	lacking map[string]map[int]bool
	// gaps are the events acknowledged to the cluster that no combiner
	// may hold yet, by aggregator: see Gaps.
	gaps  []fanout.Gap
	state map[string]cluster.State
	grpc  map[string]string // gRPC address by member name
}

func newTopology(self string, c *cluster.Cluster, cfg ClusterConfig, dial []grpc.DialOption, reg prometheus.Registerer) *topology {
	t := &topology{self: self, members: c, shards: cfg.Shards, replication: cfg.Replication, dial: dial,
		combiners: slices.Sorted(slices.Values(cfg.Combiners)), handover: time.Duration(cfg.HandoverAfter),
		stop: make(chan struct{}), done: make(chan struct{})}
	t.gauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "dimsum_cluster_members",
		Help: "Members of the cluster as this node sees them, by role and state (alive, dead, left).",
	}, []string{"role", "state"})
	reg.MustRegister(t.gauge)
	t.conns.byAddr = map[string]*grpc.ClientConn{}
	next := t.refresh()
	changes, cancel := c.Subscribe()
	go func() {
		defer close(t.done)
		defer cancel()
		for {
			// handover fires when the next dead aggregator is due to be
			// handed over, a moment no membership change announces.
			var handover <-chan time.Time
			if next > 0 {
				handover = time.After(next)
			}
			select {
			case <-t.stop:
				return
			case _, ok := <-changes:
				if !ok {
					return
				}
			case <-handover:
			}
			next = t.refresh()
		}
	}()
	return t
}

// refresh rebuilds the view from the member table. It returns how long
// until the next dead aggregator is handed over, 0 when none is dead.
func (t *topology) refresh() (next time.Duration) {
	m := &members{behind: map[string]bool{}, lacking: map[string]map[int]bool{}, handedOver: map[string]bool{}, state: map[string]cluster.State{}, grpc: map[string]string{}}
	gaps := map[string]*fanout.Gap{}
	gap := func(name string) *fanout.Gap {
		if gaps[name] == nil {
			gaps[name] = &fanout.Gap{Aggregator: name}
		}
		return gaps[name]
	}
	t.gauge.Reset()
	for _, mm := range t.members.Members() {
		for _, r := range mm.Meta.Roles {
			t.gauge.WithLabelValues(string(r), mm.State.String()).Inc()
		}
		m.state[mm.Name] = mm.State
		m.grpc[mm.Name] = mm.Meta.GRPCAddr
		if mm.Meta.HasRole(cluster.RoleAggregator) && mm.State == cluster.StateAlive {
			for _, name := range mm.Meta.PendingHandoff {
				m.behind[name] = true
			}
			for _, name := range mm.Meta.PendingForward {
				g := gap(name)
				g.WaitingAt = append(g.WaitingAt, mm.Name) // sorted: the members are
			}
		}
		if mm.Meta.HasRole(cluster.RoleAggregator) && mm.State == cluster.StateDead {
			gap(mm.Name).Down = true
			// Since is when the first member to see it dead did, so
			// every node hands it over at about the same moment.
			if left := t.handover - time.Since(mm.Since); left > 0 {
				if next == 0 || left < next {
					next = left
				}
			} else {
				m.handedOver[mm.Name] = true
			}
		}
		// Aggregators own keys until they leave or are handed over: a
		// dead one keeps them for a while, and what others take for it
		// waits until it returns, so a brief crash moves no key. One that
		// announced its leave owns none.
		if mm.Meta.HasRole(cluster.RoleAggregator) && mm.State != cluster.StateLeft && !mm.Meta.Leaving && !m.handedOver[mm.Name] {
			m.aggregators = append(m.aggregators, mm.Name)
		}
		if mm.Meta.HasRole(cluster.RoleCombiner) && mm.State != cluster.StateLeft {
			m.combiners = append(m.combiners, mm.Name)
			for _, s := range mm.Meta.Lacking {
				if m.lacking[mm.Name] == nil {
					m.lacking[mm.Name] = map[int]bool{}
				}
				m.lacking[mm.Name][int(s)] = true
			}
		}
	}
	if t.combiners != nil {
		m.combiners = t.combiners // placement ignores what this node has seen
	}
	for _, name := range slices.Sorted(maps.Keys(gaps)) {
		m.gaps = append(m.gaps, *gaps[name])
	}
	old := t.view.Swap(m)
	t.pruneConns(m)
	if f := t.returned.Load(); f != nil && old != nil && cameBack(old, m) {
		(*f)()
	}
	return next
}

// cameBack reports whether a member is alive in now and was not in before,
// or is at another gRPC address.
func cameBack(before, now *members) bool {
	for name, st := range now.state {
		if st == cluster.StateAlive && (before.state[name] != cluster.StateAlive || before.grpc[name] != now.grpc[name]) {
			return true
		}
	}
	return false
}

// pruneConns closes the connections to addresses no member has any more: a
// member that came back at another address. A call still on such a
// connection fails and is retried by its caller at the new address.
func (t *topology) pruneConns(m *members) {
	used := map[string]bool{}
	for _, addr := range m.grpc {
		used[addr] = true
	}
	t.conns.Lock()
	defer t.conns.Unlock()
	for addr, c := range t.conns.byAddr {
		if !used[addr] {
			c.Close()
			delete(t.conns.byAddr, addr)
		}
	}
}

func (t *topology) close() {
	close(t.stop)
	<-t.done
	t.conns.Lock()
	defer t.conns.Unlock()
	for _, c := range t.conns.byAddr {
		c.Close()
	}
}

// conn returns a connection to a member by name. Connections are kept per
// address, so a member that restarts at its address is reached again by the
// same connection.
func (t *topology) conn(name string) (*grpc.ClientConn, error) {
	addr := t.view.Load().grpc[name]
	if addr == "" {
		return nil, fmt.Errorf("node: no gRPC address known for member %q", name)
	}
	t.conns.Lock()
	defer t.conns.Unlock()
	if c := t.conns.byAddr[addr]; c != nil {
		return c, nil
	}
	c, err := grpc.NewClient("passthrough:///"+addr, t.dial...)
	if err != nil {
		return nil, fmt.Errorf("node: cannot dial member %q at %s: %w", name, addr, err)
	}
	t.conns.byAddr[addr] = c
	return c, nil
}

// Owner names the aggregator that owns a partition key; this node when it
// sees no owner, itself included.
func (t *topology) Owner(key uint64) string {
	aggs := t.view.Load().aggregators
	if len(aggs) == 0 {
		return t.self
	}
	return cluster.Owner(key, aggs)
}

// Peer returns an Ingest client of the named aggregator.
func (t *topology) Peer(name string) (wirepb.IngestClient, error) {
	c, err := t.conn(name)
	if err != nil {
		return nil, err
	}
	return wirepb.NewIngestClient(c), nil
}

// placement returns the combiners that hold a shard.
func (t *topology) placement(shard int) []string {
	return cluster.Replicas(uint32(shard), t.view.Load().combiners, t.replication)
}

// Shards is the number of shards of the global cube.
func (t *topology) Shards() int { return t.shards }

// flushSink is the topology as the aggregator's sink, for a cube of
// schema s: the flushes for self, this node, go to local, its combiner, in
// process, when it has the role.
type flushSink struct {
	t     *topology
	s     *schema.Schema
	self  string
	local *combiner.Local
}

func (s flushSink) Shards() int { return s.t.shards }

func (s flushSink) Replicas(shard uint32) []string { return s.t.placement(int(shard)) }

func (s flushSink) Flush(ctx context.Context, replica string, f *wire.Flush) error {
	if replica == s.self && s.local != nil {
		return s.local.Flush(ctx, replica, f)
	}
	c, err := s.t.conn(replica)
	if err != nil {
		return err
	}
	return combiner.NewClient(replica, c, s.s).Flush(ctx, replica, f)
}

// InProcess reports whether replica is the node's own combiner.
func (s flushSink) InProcess(replica string) bool { return replica == s.self && s.local != nil }

// Sync makes the flushes the node's own combiner took durable; a remote
// combiner's are when it answers.
func (s flushSink) Sync(replica string) error {
	if s.InProcess(replica) {
		return s.local.Sync(replica)
	}
	return nil
}

// Replicas lists, for the query fan-out, the combiners of a shard that are
// alive: first those that hold all of it as far as is known, then those
// that may lack some (Behind). Dead ones are left out; a shard with none is
// missing.
func (t *topology) Replicas(shard int) []string {
	m := t.view.Load()
	var ready, behind []string
	for _, name := range t.placement(shard) {
		switch {
		case m.state[name] != cluster.StateAlive:
		case m.mayLack(name, shard):
			behind = append(behind, name)
		default:
			ready = append(ready, name)
		}
	}
	return append(ready, behind...)
}

// Behind reports whether a shard read from a member may lack some
// (mayLack): a combiner that was down and is catching up, or one that found
// it holds less of the shard than another replica.
func (t *topology) Behind(name string, shard int) bool { return t.view.Load().mayLack(name, shard) }

// mayLack reports whether a shard read from a member may lack some: some
// alive aggregator holds writes for it, or it found it holds less of the
// shard than another replica.
func (m *members) mayLack(name string, shard int) bool {
	return m.behind[name] || m.lacking[name][shard]
}

// Gaps lists, for the query fan-out, what no combiner may hold yet: for
// each aggregator that is dead, the events it took and had not passed on, and
// for each aggregator that alive ones gossip forwarded parts waiting for,
// those parts. A flush waiting for a combiner is no gap: the shard's other
// replicas have it, or the fan-out warns that none could be read, or that
// the one read is behind.
func (t *topology) Gaps() []fanout.Gap { return t.view.Load().gaps }

// Conn returns a connection to a combiner, for the query fan-out.
func (t *topology) Conn(name string) (grpc.ClientConnInterface, error) { return t.conn(name) }

// handoffGossipInterval is how often an aggregator gossips the names it
// holds hinted handoff for.
const handoffGossipInterval = 500 * time.Millisecond

// behindAfter is how long a request must have waited for a member before
// the member counts as behind: a healthy combiner takes a flush within
// milliseconds, one that is down or catching up keeps requests waiting.
const behindAfter = time.Second

// HandedOver reports whether an aggregator is dead for long enough that its
// keys moved to the others.
func (t *topology) HandedOver(name string) bool { return t.view.Load().handedOver[name] }

// handOver gives what this aggregator holds for handed-over ones to their
// keys' new owners. It runs every handoffGossipInterval: a part being sent
// when it looks, or queued by a push that routed it just before the keys
// moved, goes the next time.
func handOver(t *topology, agg *aggregator.Aggregator, r *aggregator.Router, log *slog.Logger) {
	for name := range agg.Pending() {
		if !t.HandedOver(name) {
			continue
		}
		if n, err := r.HandOver(name); err != nil {
			log.Error("cannot hand over what waits for a dead aggregator", "aggregator", name, "err", err)
		} else if n > 0 {
			log.Warn("batches waiting for a dead aggregator handed over to its keys' new owners", "aggregator", name, "parts", n)
		}
	}
}

// gossipHandoff keeps this aggregator's PendingHandoff and PendingForward
// meta up to date, so that query nodes prefer replicas that have every
// flush and warn of the events waiting for an aggregator, and a leaving
// aggregator waits for what others hold for it. It hands over, too, what
// waits for aggregators declared dead for good (handOver).
func gossipHandoff(c *cluster.Cluster, t *topology, agg *aggregator.Aggregator, r *aggregator.Router, stop <-chan struct{}, log *slog.Logger) {
	var last, lastForwards []string
	tick := time.NewTicker(handoffGossipInterval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		handOver(t, agg, r, log)
		names, forwards := agg.Waiting(behindAfter)
		if slices.Equal(names, last) && slices.Equal(forwards, lastForwards) {
			continue
		}
		if err := c.UpdateMeta(func(m *cluster.Meta) { m.PendingHandoff, m.PendingForward = names, forwards }); err != nil {
			log.Warn("cannot gossip pending handoff", "err", err)
			continue
		}
		last, lastForwards = names, forwards
	}
}

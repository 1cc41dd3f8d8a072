package fanout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/prometheus/util/annotations"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/query"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Topology is the cluster as the read path sees it. The node backs it with
// its membership; it must be safe for concurrent use.
type Topology interface {
	// Shards is the number of shards the cube is split into, at least 1.
	Shards() int
	// Replicas names the combiners holding a shard, preferred first.
	Replicas(shard int) []string
	// Behind reports whether a shard read from a combiner may lack some:
	// the combiner is still receiving writes it missed while it was down,
	// or found it holds less of the shard than another replica.
	Behind(replica string, shard int) bool
	// Conn returns a connection to a combiner, by name.
	Conn(replica string) (grpc.ClientConnInterface, error)
	// Gaps lists, by aggregator, the events the cluster acknowledged that
	// may be in no combiner yet; nil when none are known.
	Gaps() []Gap
}

// Gap is what answers may lack for one aggregator: the events it owns that
// wait at other aggregators, and, while it is down, those it took itself
// and had not yet flushed or forwarded. Neither is in any combiner, so
// every answer over the cube may lack them, whatever the replicas hold.
type Gap struct {
	// Aggregator owns the missing events.
	Aggregator string
	// Down says the aggregator is down.
	Down bool
	// WaitingAt names the aggregators holding parts of batches for it
	// that have waited over a second, sorted.
	WaitingAt []string
}

func (g Gap) String() string {
	at := strings.Join(g.WaitingAt, ", ")
	switch {
	case g.Down && at != "":
		return fmt.Sprintf("aggregator %s is down: the events it took and had not yet flushed or forwarded, and those of its hosts waiting for it at %s, are in no answer", g.Aggregator, at)
	case g.Down:
		return fmt.Sprintf("aggregator %s is down: the events it took and had not yet flushed or forwarded are in no answer", g.Aggregator)
	}
	return fmt.Sprintf("events of the hosts of aggregator %s wait for it at %s and are in no answer", g.Aggregator, at)
}

// Options configure a Reader.
type Options struct {
	// Schema of the cube. Required.
	Schema *schema.Schema
	// Topology says which combiners hold which shard. Required.
	Topology Topology
	// Timeout bounds each request to a combiner, a Scan's whole stream
	// included; a combiner that has not answered by then counts as failed,
	// and the shard's next replica is asked when that is still possible.
	// The default is 30s.
	Timeout time.Duration
	// Logger receives operational logs. nil discards them.
	Logger *slog.Logger
	// Registerer registers the reader's metrics. nil registers none.
	Registerer prometheus.Registerer
}

// Reader is the query.Source of a cluster's cube.
type Reader struct {
	opts    Options
	metrics *metrics
}

// New builds a Reader.
func New(opts Options) (*Reader, error) {
	if opts.Schema == nil || opts.Topology == nil {
		return nil, errors.New("fanout: invalid options: a schema and a topology are required")
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("fanout: invalid options: negative timeout %s", opts.Timeout)
	}
	if opts.Timeout == 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	return &Reader{opts: opts, metrics: m}, nil
}

// Open returns the view of one query: the replica that first answers for a
// shard answers for it until Close. The topology is read once, here.
func (r *Reader) Open(ctx context.Context, partial bool) query.View {
	n := max(r.opts.Topology.Shards(), 1)
	v := &view{r: r, ctx: ctx, partial: partial, shards: n, localBits: 32 - bits.Len(uint(n-1))}
	v.mu.replicas = make([][]string, n)
	for s := range n {
		v.mu.replicas[s] = r.opts.Topology.Replicas(s)
	}
	v.mu.pinned = make([]string, n)
	v.mu.missing = make([]bool, n)
	v.mu.behind = make([]bool, n)
	v.mu.dead = map[string]bool{}
	v.gaps = r.opts.Topology.Gaps()
	return v
}

// view is one query's reads of the cluster.
type view struct {
	r       *Reader
	ctx     context.Context
	partial bool
	shards  int
	// gaps are the events no combiner may hold yet, as the topology said
	// when the view opened.
	gaps []Gap
	// localBits is how many low bits of a view's cell ID hold the
	// combiner's own ID; the shard is above them.
	localBits int
	mu        struct {
		sync.Mutex
		// replicas lists each shard's replicas, preferred first.
		replicas [][]string
		// pinned names the replica each shard's data came from, "" while
		// none has.
		pinned []string
		// dead holds the replicas that failed during this query.
		dead map[string]bool
		// missing marks the shards no replica answered for.
		missing []bool
		// behind marks the shards answered for by a replica that may
		// lack some of them (Topology.Behind).
		behind []bool
		// read says a fan-out ran: the answer holds what the cube holds,
		// so it lacks the gaps.
		read bool
	}
}

// errBadReply marks an answer from a replica that does not make sense: the
// replica is treated as failed.
var errBadReply = errors.New("fanout: bad reply")

// errTooManyCells marks a combiner whose cell IDs of a cuboid outgrow the
// bits a view leaves them: every replica would answer the same, so the read
// fails rather than fails over.
var errTooManyCells = errors.New("fanout: too many cells")

func badReply(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errBadReply, fmt.Sprintf(format, args...))
}

// part is the shards one replica serves in one round of a fan-out.
type part[T any] struct {
	replica string
	shards  []int
	val     T
	err     error
}

// assign groups the shards of todo by the replica to ask: the one the
// shard is pinned to, or its first live one. A shard with neither is
// missing.
func (v *view) assign(todo []int) map[string][]int {
	v.mu.Lock()
	defer v.mu.Unlock()
	groups := map[string][]int{}
	for _, s := range todo {
		if v.mu.missing[s] {
			continue
		}
		rep := v.mu.pinned[s]
		if rep == "" {
			i := slices.IndexFunc(v.mu.replicas[s], func(r string) bool { return !v.mu.dead[r] })
			if i >= 0 {
				rep = v.mu.replicas[s][i]
			}
		} else if v.mu.dead[rep] {
			rep = ""
		}
		if rep == "" {
			v.mu.missing[s] = true
			continue
		}
		groups[rep] = append(groups[rep], s)
	}
	return groups
}

// settle records a round's outcome: a failed replica is dead for the rest
// of the query, and the shards pinned to it are missing, since their cell
// IDs mean nothing to another replica; with pin, the shards a replica
// answered for are pinned to it.
func (v *view) settle(rep string, shards []int, failed, pin bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if failed {
		v.mu.dead[rep] = true
		for s, p := range v.mu.pinned {
			if p == rep {
				v.mu.missing[s] = true
			}
		}
		return
	}
	for _, s := range shards {
		if pin {
			v.mu.pinned[s] = rep
		}
		v.mu.behind[s] = v.mu.behind[s] || v.r.opts.Topology.Behind(rep, s)
	}
}

// fanOut asks, concurrently, each replica that serves shards of todo for
// them, with call, and asks the next replica of a shard whose replica
// failed, unless the shard was pinned. It returns the answers of the
// replicas that answered; the shards none answered for are missing. With a
// partial answer refused, a missing shard fails the read, as do a shard
// read from a replica that may lack some of it and the view's gaps. A replica
// that refuses the request fails the read too: every replica would.
func fanOut[T any](v *view, method string, todo []int, pin bool, call func(ctx context.Context, c wirepb.ReadClient, shards []int) (T, error)) ([]*part[T], error) {
	v.mu.Lock()
	v.mu.read = true
	v.mu.Unlock()
	var done []*part[T]
	for len(todo) > 0 {
		groups := v.assign(todo)
		parts := make([]*part[T], 0, len(groups))
		for _, rep := range slices.Sorted(maps.Keys(groups)) {
			parts = append(parts, &part[T]{replica: rep, shards: groups[rep]})
		}
		var wg sync.WaitGroup
		for _, p := range parts {
			wg.Go(func() { p.val, p.err = ask(v, method, p.replica, p.shards, call) })
		}
		wg.Wait()
		todo = todo[:0:0]
		for _, p := range parts {
			switch {
			case p.err == nil:
				v.settle(p.replica, p.shards, false, pin)
				done = append(done, p)
			case v.ctx.Err() != nil:
				return nil, v.ctx.Err()
			case status.Code(p.err) == codes.InvalidArgument:
				return nil, fmt.Errorf("fanout: combiner %s refused the read: %w", p.replica, p.err)
			case errors.Is(p.err, errTooManyCells):
				return nil, fmt.Errorf("fanout: combiner %s: %w", p.replica, p.err)
			default:
				v.r.opts.Logger.Warn("combiner read failed", "replica", p.replica, "method", method, "shards", p.shards, "err", p.err)
				v.settle(p.replica, p.shards, true, pin)
				todo = append(todo, p.shards...)
			}
		}
	}
	if !v.partial {
		if missing := v.missing(); len(missing) > 0 {
			return nil, fmt.Errorf("%w: %s", query.ErrUnavailable, missingText(missing))
		}
		if behind := v.behind(); len(behind) > 0 {
			return nil, fmt.Errorf("%w: %s", query.ErrUnavailable, behindText(behind))
		}
		if len(v.gaps) > 0 {
			return nil, fmt.Errorf("%w: %s", query.ErrUnavailable, gapsText(v.gaps))
		}
	}
	return done, nil
}

// ask makes one request to one replica, bounded by the timeout, and
// counts it.
func ask[T any](v *view, method, rep string, shards []int, call func(ctx context.Context, c wirepb.ReadClient, shards []int) (T, error)) (T, error) {
	start := time.Now()
	var val T
	conn, err := v.r.opts.Topology.Conn(rep)
	if err == nil {
		ctx, cancel := context.WithTimeout(v.ctx, v.r.opts.Timeout)
		val, err = call(ctx, wirepb.NewReadClient(conn), shards)
		cancel()
	}
	outcome := "ok"
	switch {
	case err == nil:
	case v.ctx.Err() != nil:
		outcome = "canceled"
	case status.Code(err) == codes.InvalidArgument:
		outcome = "refused"
	default:
		outcome = "failed"
	}
	v.r.metrics.requests.WithLabelValues(rep, outcome).Inc()
	v.r.metrics.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
	return val, err
}

// missing lists the shards no replica answered for.
func (v *view) missing() []int { return v.marked(func(s int) bool { return v.mu.missing[s] }) }

// behind lists the shards a replica that may lack some of them answered
// for.
func (v *view) behind() []int {
	return v.marked(func(s int) bool { return v.mu.behind[s] && !v.mu.missing[s] })
}

// marked lists the shards for which is holds, under the view's lock.
func (v *view) marked(is func(shard int) bool) []int {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []int
	for s := range v.shards {
		if is(s) {
			out = append(out, s)
		}
	}
	return out
}

// shardsText names shards: "shard 3" or "shards 3, 7".
func shardsText(shards []int) string {
	ns := make([]string, len(shards))
	for i, s := range shards {
		ns[i] = strconv.Itoa(s)
	}
	if len(shards) == 1 {
		return "shard " + ns[0]
	}
	return "shards " + strings.Join(ns, ", ")
}

func missingText(shards []int) string {
	if len(shards) == 1 {
		return shardsText(shards) + " has no reachable replica"
	}
	return shardsText(shards) + " have no reachable replica"
}

func behindText(shards []int) string {
	return shardsText(shards) + " could only be read from a replica that may lack some of them (still receiving the writes it missed while down, or found holding less than another replica)"
}

func gapsText(gaps []Gap) string {
	texts := make([]string, len(gaps))
	for i, g := range gaps {
		texts[i] = g.String()
	}
	return strings.Join(texts, "; ")
}

// Warnings names the missing shards, those read from a replica that may
// lack some of them, and, once anything was read, the events no combiner
// may hold yet.
func (v *view) Warnings() annotations.Annotations {
	var a annotations.Annotations
	if missing := v.missing(); len(missing) > 0 {
		a.Add(fmt.Errorf("%s; the result is partial", missingText(missing)))
	}
	if behind := v.behind(); len(behind) > 0 {
		a.Add(fmt.Errorf("%s; the result may be partial", behindText(behind)))
	}
	if v.wasRead() {
		for _, g := range v.gaps {
			a.Add(fmt.Errorf("%s; the result may be partial", g))
		}
	}
	return a
}

// wasRead reports whether a fan-out ran.
func (v *view) wasRead() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.mu.read
}

// Close counts a partial answer.
func (v *view) Close() {
	if v.partial && (len(v.missing()) > 0 || len(v.behind()) > 0 || len(v.gaps) > 0 && v.wasRead()) {
		v.r.metrics.partial.Inc()
	}
}

// allShards lists every shard.
func (v *view) allShards() []int {
	out := make([]int, v.shards)
	for i := range out {
		out[i] = i
	}
	return out
}

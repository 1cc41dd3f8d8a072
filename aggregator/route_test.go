package aggregator_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// peer serves an aggregator's Ingest on a fixed loopback address that can be
// stopped and served again, as a node that goes down and comes back.
type peer struct {
	t        *testing.T
	register func(*grpc.Server)
	addr     string
	mu       sync.Mutex
	srv      *grpc.Server
	conn     *grpc.ClientConn
}

func newPeer(t *testing.T, register func(*grpc.Server)) *peer {
	p := &peer{t: t, register: register, addr: "127.0.0.1:0"}
	p.up()
	// A short reconnect backoff, so that a client finds the server again
	// soon after it comes back.
	conn, err := grpc.NewClient("passthrough:///"+p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, MaxDelay: 100 * time.Millisecond}, MinConnectTimeout: time.Second}))
	if err != nil {
		t.Fatal(err)
	}
	p.conn = conn
	t.Cleanup(func() { p.down(); conn.Close() })
	return p
}

func (p *peer) up() {
	p.t.Helper()
	lis, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatal(err)
	}
	p.addr = lis.Addr().String()
	// The node's codec, which decodes each batch into a request an earlier
	// one was decoded into: what a part waiting for its owner holds must
	// not be that request's.
	srv := grpc.NewServer(grpc.ForceServerCodecV2(wire.ServerCodec()))
	p.register(srv)
	go srv.Serve(lis)
	p.mu.Lock()
	p.srv = srv
	p.mu.Unlock()
}

func (p *peer) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.srv != nil {
		p.srv.Stop()
		p.srv = nil
	}
}

// ring is a cluster of routed aggregators in one test: each with its own
// log directory, store and combiner, served over gRPC on 127.0.0.1 through
// its Router, forwarding to the others over gRPC. All share one clock and
// one owner function, which a test may change as a join would.
type ring struct {
	t     *testing.T
	clock *clock
	owner atomic.Pointer[func(key uint64) string]
	nodes map[string]*ringNode
}

type ringNode struct {
	r    *ring
	name string
	h    *harness // its store; h.reg is the registry of the current incarnation
	dir  string
	srv  *peer
	// lossy makes the delivery of every forward lose its reply, after
	// the owner took it, as a connection cut at the wrong moment does.
	lossy atomic.Bool
	// walMax is the WALMaxBytes of its next incarnation, 0 for the
	// default.
	walMax int64
	// segBytes is the WALSegmentBytes of its next incarnation, 0 for the
	// default.
	segBytes int64
	agg      *aggregator.Aggregator
	router   *aggregator.Router
}

func newRing(t *testing.T, names ...string) *ring {
	r := &ring{t: t, nodes: map[string]*ringNode{}}
	for _, name := range names {
		n := &ringNode{r: r, name: name, h: newHarness(t, schema.Default()), dir: t.TempDir()}
		if first := r.nodes[names[0]]; first != nil {
			n.h.window = first.h.window
		} else {
			r.clock = n.h.clock
		}
		r.nodes[name] = n
		n.open()
		n.srv = newPeer(t, func(s *grpc.Server) { n.router.RegisterInternal(s) })
	}
	return r
}

func (r *ring) setOwner(f func(key uint64) string) { r.owner.Store(&f) }

// open starts an incarnation of the node's aggregator on its log, with a
// fresh registry.
func (n *ringNode) open() {
	t := n.r.t
	t.Helper()
	n.h.reg = prometheus.NewRegistry()
	a, err := aggregator.New(aggregator.Options{
		Schema: n.h.schema, Sink: n.h.sink, Name: n.name, Now: n.r.clock.Now, WALDir: n.dir,
		FlushInterval: time.Hour, RetryBackoff: time.Millisecond, Registerer: n.h.reg,
		Peers: ringPeers{n}, WALMaxBytes: n.walMax, WALSegmentBytes: n.segBytes,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	n.agg = a
	n.router, err = aggregator.NewRouter(aggregator.RouterOptions{
		Local: a, Self: n.name, Owner: func(key uint64) string { return (*n.r.owner.Load())(key) },
	})
	if err != nil {
		t.Fatal(err)
	}
}

// crash stops the node as SIGKILL would: its server, then its aggregator
// without a flush.
func (n *ringNode) crash() {
	n.srv.down()
	aggregator.Crash(n.agg)
}

// restart opens a new incarnation on the log and serves it.
func (n *ringNode) restart() {
	n.open()
	n.srv.up()
}

// ringPeers delivers a node's forwards over gRPC, through the real client
// the node uses (aggregator.PeerClients).
type ringPeers struct{ n *ringNode }

func (p ringPeers) Forward(ctx context.Context, owner string, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	to := p.n.r.nodes[owner]
	if to == nil {
		return nil, errors.New("unknown aggregator " + owner)
	}
	resp, err := aggregator.PeerClients(func(string) (wirepb.IngestClient, error) {
		return wirepb.NewIngestClient(to.srv.conn), nil
	}).Forward(ctx, owner, req)
	if err == nil && p.n.lossy.Load() {
		return nil, status.Error(codes.DeadlineExceeded, "reply lost")
	}
	return resp, err
}

// push sends a publisher's batch to node name over gRPC.
func (r *ring) push(name string, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return wirepb.NewIngestClient(r.nodes[name].srv.conn).Push(ctx, req)
}

// settle waits until no node holds a forward or a flush undelivered.
func (r *ring) settle() {
	r.t.Helper()
	poll(r.t, "every outbox to empty", func() bool {
		for _, n := range r.nodes {
			if len(n.agg.Pending()) > 0 {
				return false
			}
		}
		return true
	})
}

// counts closes every aggregator, which flushes every window, and returns,
// per node, how many events of each host its store holds.
func (r *ring) counts() map[string]map[int]uint64 {
	r.t.Helper()
	r.settle()
	for _, n := range r.nodes {
		n.h.agg = n.agg
		n.h.close(r.t)
	}
	out := map[string]map[int]uint64{}
	finest := schema.Default().Families[0].Finest().ID
	for name, n := range r.nodes {
		out[name] = map[int]uint64{}
		cells := n.h.read(r.t, 0, finest)
		for h := range routeHosts {
			if s, ok := cells[cellOf(labels(h, h%5, 0))]; ok {
				out[name][h] = s.Count
			}
		}
	}
	return out
}

// routeHosts is how many hosts a test batch has an event for.
const routeHosts = 40

// routeBatch is a publisher's batch: an event of value 1 for each host,
// then an event with a negative delta and one of an unknown family, which
// the receiver rejects.
func routeBatch(ts int64, seq uint64) *wirepb.PushRequest {
	var b wire.Batch
	b.Identify("pub", seq)
	for h := range routeHosts {
		addGood(&b, ts, 1, h, h%5, 0)
	}
	addGood(&b, ts, -1, 1, 0, 0)
	b.Add("nosuch", ts, 1, labels(2, 0, 0)...)
	return b.Request()
}

// checkReply checks the reply to routeBatch.
func checkReply(t *testing.T, resp *wirepb.PushResponse, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("Push: %v", err)
	}
	if resp.Accepted != routeHosts || len(resp.Rejects) != 2 ||
		resp.Rejects[0].Index != routeHosts || resp.Rejects[0].Reason != wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA ||
		resp.Rejects[1].Index != routeHosts+1 || resp.Rejects[1].Reason != wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY {
		t.Fatalf("reply: accepted %d, rejects %v; want %d accepted, events %d and %d rejected",
			resp.Accepted, resp.Rejects, routeHosts, routeHosts, routeHosts+1)
	}
}

// hostKey is the partition key of host h's events.
func hostKey(h int) uint64 {
	l := labels(h, 0, 0)
	return schema.PartitionKey(family, []string{l[1], l[3], l[5]})
}

// byKey spreads keys over names.
func byKey(names ...string) func(uint64) string {
	return func(key uint64) string { return names[key%uint64(len(names))] }
}

// checkOwned checks that each host's owner holds want of its events and
// every other node none.
func checkOwned(t *testing.T, got map[string]map[int]uint64, owner func(uint64) string, want uint64) {
	t.Helper()
	for name, hosts := range got {
		if len(hosts) == 0 {
			t.Errorf("%s owns no host: the test does not route", name)
		}
	}
	for h := range routeHosts {
		own := owner(hostKey(h))
		for name, hosts := range got {
			if w := map[bool]uint64{true: want}[name == own]; hosts[h] != w {
				t.Errorf("host %d: %s holds %d events, want %d (its owner is %s)", h, name, hosts[h], w, own)
			}
		}
	}
}

// TestRouterCountsOnce pushes batches through each of three aggregators:
// every event is counted once, by its owner, and a batch retried at the same
// or another aggregator is counted once.
func TestRouterCountsOnce(t *testing.T) {
	r := newRing(t, "a", "b", "c")
	owner := byKey("a", "b", "c")
	r.setOwner(owner)
	ts := r.clock.Now().UnixMilli()
	for seq, name := range []string{"a", "b", "c"} {
		resp, err := r.push(name, routeBatch(ts, uint64(seq+1)))
		checkReply(t, resp, err)
		if resp.Duplicate {
			t.Fatalf("batch %d via %s: a duplicate the first time", seq+1, name)
		}
	}
	resp, err := r.push("a", routeBatch(ts, 1)) // a retry where it was taken
	checkReply(t, resp, err)
	if !resp.Duplicate {
		t.Errorf("a retry at the aggregator that took the batch was not a duplicate")
	}
	// A retry at another aggregator, with the same owners: it may find the
	// identity (it owns a part it already took) or split the batch as the
	// first one did, and each owner drops the repeat of its part.
	resp, err = r.push("c", routeBatch(ts, 2))
	checkReply(t, resp, err)
	if q := r.nodes["a"].h.counter(t, "dimsum_aggregator_forwarded_events_total"); q == 0 {
		t.Errorf("a forwarded nothing")
	}
	checkOwned(t, r.counts(), owner, 3)
}

// TestRouterOwnerDown takes batches while their owner is down, across a
// restart of the aggregator that took them, and with deliveries whose reply
// is lost: each is acknowledged at once, waits, and is counted once when the
// owner is back.
func TestRouterOwnerDown(t *testing.T) {
	r := newRing(t, "a", "b")
	owner := byKey("a", "b")
	r.setOwner(owner)
	a, b := r.nodes["a"], r.nodes["b"]
	ts := r.clock.Now().UnixMilli()

	b.crash()
	resp, err := r.push("a", routeBatch(ts, 1))
	checkReply(t, resp, err) // acknowledged: b's part is on a's disk
	poll(t, "a's sender to try b", func() bool {
		return a.h.counter(t, "dimsum_aggregator_forward_errors_total") > 0
	})
	if p := a.agg.Pending(); p["b"] != 1 {
		t.Fatalf("pending with b down: %v, want b's part", p)
	}
	if names, forwards := a.agg.Waiting(0); !slices.Equal(names, []string{"b"}) || !slices.Equal(forwards, []string{"b"}) {
		t.Fatalf("waiting for %v, forwards for %v; want b's part in both", names, forwards)
	}
	// a crashes too; its next incarnation sends b's part from its log.
	a.crash()
	a.restart()
	if p := a.agg.Pending(); p["b"] != 1 {
		t.Fatalf("pending after a's restart: %v, want b's part", p)
	}
	b.restart()
	r.settle()

	// b takes a part but its replies are lost: a sends it again and again,
	// then crashes, and its next incarnation sends it once more. b counts
	// it once.
	partB := 0
	for h := range routeHosts {
		if owner(hostKey(h)) == "b" {
			partB++
		}
	}
	before := b.h.counter(t, "dimsum_aggregator_events_accepted_total")
	a.lossy.Store(true)
	resp, err = r.push("a", routeBatch(ts, 2))
	checkReply(t, resp, err)
	poll(t, "b to count its part of batch 2", func() bool {
		return b.h.counter(t, "dimsum_aggregator_events_accepted_total") == before+float64(partB)
	})
	poll(t, "a to send b's part again", func() bool {
		return b.h.counter(t, "dimsum_aggregator_batches_duplicate_total") > 0
	})
	a.crash()
	a.lossy.Store(false)
	a.restart()
	r.settle()
	// The publisher, never answered, retries at b: b took a part under the
	// identity, so it is a duplicate there.
	resp, err = r.push("b", routeBatch(ts, 2))
	checkReply(t, resp, err)
	if !resp.Duplicate {
		t.Errorf("a retry at the owner of a part was not a duplicate")
	}
	if got := b.h.counter(t, "dimsum_aggregator_events_accepted_total"); got != before+float64(partB) {
		t.Errorf("b counted %v events in all, want %v", got, before+float64(partB))
	}
	checkOwned(t, r.counts(), owner, 2)
}

// TestRouterRetryAfterJoin retries a batch at another aggregator after a
// third one joined and took keys over, as a publisher does when the first
// aggregator crashed after logging the batch and before replying.
//
// With the same owners on both attempts (no member joined or left: a dead
// member keeps its keys), a retry is exact: every owner receives the same
// part twice and counts it once (TestRouterCountsOnce, TestRouterOwnerDown).
// Across a change of owners it is not, and this is the documented limit:
// each owner counts the first part that reaches it under the identity, so
// an event whose owner changed is counted by its first owner if the first
// attempt's part reached that owner first, and by its second owner if the
// second attempt's part reached that one first: once, twice or not at all.
// A joiner took no part of the first attempt, so after a join no event is
// lost, and a moved event may count twice, which is what happens here: the
// first attempt's parts arrive first, every event is counted by its first
// owner, and those that moved to the joiner by the joiner too.
func TestRouterRetryAfterJoin(t *testing.T) {
	r := newRing(t, "a", "b", "c")
	before := byKey("a", "b")
	after := func(key uint64) string {
		if key%3 == 2 {
			return "c"
		}
		return before(key)
	}
	r.setOwner(before)
	ts := r.clock.Now().UnixMilli()
	resp, err := r.push("a", routeBatch(ts, 1)) // its reply "lost"
	checkReply(t, resp, err)
	r.settle()
	r.setOwner(after)
	resp, err = r.push("c", routeBatch(ts, 1))
	checkReply(t, resp, err)
	if resp.Duplicate {
		t.Fatalf("c, which took nothing of the batch, found its identity")
	}

	got := r.counts()
	moved := 0
	for h := range routeHosts {
		first, second := before(hostKey(h)), after(hostKey(h))
		want := map[string]uint64{first: 1}
		if second != first {
			want[second] = 1
			moved++
		}
		for name, hosts := range got {
			if hosts[h] != want[name] {
				t.Errorf("host %d (owner %s, then %s): %s holds %d events, want %d", h, first, second, name, hosts[h], want[name])
			}
		}
	}
	if moved == 0 {
		t.Fatalf("no host moved to the joiner: the test shows nothing")
	}
}

// TestPushForwardedBounds checks the bounds of a forwarded part: the
// lateness and skew of the moment the receiver took the batch, so that a
// part delivered late (its owner was down) is taken as its publisher's batch
// was, and never an event stamped far from that moment, nor one older than
// the finest retention.
func TestPushForwardedBounds(t *testing.T) {
	h := start(t, aggregator.Options{})
	retention := schema.Default().Resolutions[0].Retention
	received := h.clock.Now().Add(-2 * time.Hour)
	at := func(d time.Duration) int64 { return received.Add(d).UnixMilli() }
	var b wire.Batch
	b.Identify("pub", 1)
	addGood(&b, at(-30*time.Minute), 1, 1, 0, 0)        // within MaxLateness of the reception, 2.5h ago: taken
	addGood(&b, at(30*time.Second), 1, 1, 0, 0)         // within MaxFutureSkew of the reception: taken
	addGood(&b, at(2*time.Minute), 1, 1, 0, 0)          // past MaxFutureSkew (1m) of the reception
	addGood(&b, at(-2*time.Hour), 1, 1, 0, 0)           // past MaxLateness (1h) of the reception
	addGood(&b, h.ms(-retention-time.Hour), 1, 1, 0, 0) // past the retention
	req := b.Request()
	req.ReceivedMs = received.UnixMilli()
	resp, err := h.agg.PushForwarded(req)
	if err != nil {
		t.Fatal(err)
	}
	want := []wirepb.RejectReason{2: wirepb.RejectReason_REJECT_REASON_TOO_NEW, 3: wirepb.RejectReason_REJECT_REASON_TOO_OLD, 4: wirepb.RejectReason_REJECT_REASON_TOO_OLD}
	if resp.Accepted != 2 || len(resp.Rejects) != 3 {
		t.Fatalf("forwarded: accepted %d, rejects %v; want 2 accepted, events 2 to 4 rejected", resp.Accepted, resp.Rejects)
	}
	for _, r := range resp.Rejects {
		if r.Reason != want[r.Index] {
			t.Errorf("event %d: %v (%s), want %v", r.Index, r.Reason, r.Detail, want[r.Index])
		}
	}

	// A part that says it was received a year from now is held to this
	// node's clock plus the skew; one with no reception time to now.
	for _, received := range []int64{h.ms(365 * 24 * time.Hour), 0} {
		var b wire.Batch
		addGood(&b, h.ms(-24*time.Hour), 1, 1, 0, 0)
		addGood(&b, h.ms(365*24*time.Hour), 1, 1, 0, 0)
		addGood(&b, math.MaxInt64, 1, 1, 0, 0)
		req := b.Request()
		req.ReceivedMs = received
		resp, err := h.agg.PushForwarded(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Accepted != 0 || len(resp.Rejects) != 3 {
			t.Errorf("a part received at %d: accepted %d, rejects %v; want all three rejected", received, resp.Accepted, resp.Rejects)
		}
	}

	resp, err = h.agg.Push(b.Request())
	if err != nil || !resp.Duplicate {
		t.Fatalf("the same identity pushed by a publisher: %v, %v; want a duplicate", resp, err)
	}
	if _, err := h.agg.PushRouted(b.Request(), func(*schema.Family, []string) string { return "x" }); !errors.Is(err, aggregator.ErrOptions) {
		t.Errorf("PushRouted without Peers: %v, want ErrOptions", err)
	}
	if _, err := aggregator.NewRouter(aggregator.RouterOptions{Local: h.agg, Self: "a", Owner: byKey("a")}); !errors.Is(err, aggregator.ErrOptions) {
		t.Errorf("NewRouter over an aggregator without Peers: %v, want ErrOptions", err)
	}
}

// TestRouterForwardWithoutIdentity forwards the parts of a batch that came
// without an identity while every reply of b's is lost: a re-sends b's part
// until the replies come back, and b counts it once, under the identity a
// gave the part.
func TestRouterForwardWithoutIdentity(t *testing.T) {
	r := newRing(t, "a", "b")
	owner := byKey("a", "b")
	r.setOwner(owner)
	a, b := r.nodes["a"], r.nodes["b"]
	req := routeBatch(r.clock.Now().UnixMilli(), 1)
	req.Source, req.BatchSeq = "", 0
	a.lossy.Store(true)
	resp, err := r.push("a", req)
	checkReply(t, resp, err)
	poll(t, "a to send b's part again", func() bool {
		return b.h.counter(t, "dimsum_aggregator_batches_duplicate_total") > 0
	})
	a.lossy.Store(false)
	checkOwned(t, r.counts(), owner, 1)
}

// TestRouterCloseWaitsForPushes closes a receiver while batches whose
// events b owns are being pushed to it from 16 goroutines: every batch it
// acknowledged must reach b before Close returns. (Close waits for the
// pushes in flight to queue their parts before it drains the outbox; the
// moment when a push would queue its part after the drain is narrow, so
// this checks the property more than it catches that moment.)
func TestRouterCloseWaitsForPushes(t *testing.T) {
	r := newRing(t, "a", "b")
	r.setOwner(func(uint64) string { return "b" })
	a, b := r.nodes["a"], r.nodes["b"]
	ts := r.clock.Now().UnixMilli()
	var acked atomic.Int64
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			for i := range 1_000 {
				var bt wire.Batch
				bt.Identify(fmt.Sprint("pub", g), uint64(i+1))
				addGood(&bt, ts, 1, i%routeHosts, 0, 0)
				if _, err := a.agg.PushRouted(bt.Request(), func(*schema.Family, []string) string { return "b" }); err != nil {
					return // closed
				}
				acked.Add(1)
			}
		})
	}
	poll(t, "some batches to be taken", func() bool { return acked.Load() > 100 })
	if err := a.agg.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if p := a.agg.Pending(); len(p) > 0 {
		t.Fatalf("a closed with %v undelivered", p)
	}
	if got := b.h.counter(t, "dimsum_aggregator_events_accepted_total"); got != float64(acked.Load()) {
		t.Fatalf("b counted %v events, a acknowledged %d", got, acked.Load())
	}
}

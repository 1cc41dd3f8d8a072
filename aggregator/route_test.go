package aggregator_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
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
	conn, err := grpc.NewClient("passthrough:///"+p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
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
	srv := grpc.NewServer()
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

// TestRouter routes batches between two aggregators, each over its own
// store: every event is counted once, by the aggregator that owns its host,
// through retries and an owner that was down.
func TestRouter(t *testing.T) {
	a := start(t, aggregator.Options{Name: "a"})
	b := start(t, aggregator.Options{Name: "b", Now: a.clock.Now})
	// b serves through a router that believes a owns everything: a batch
	// forwarded to it must be counted there, not bounced back.
	rb, err := aggregator.NewRouter(aggregator.RouterOptions{
		Local: b.agg, Self: "b", Owner: func(uint64) string { return "a" },
		Peer: func(name string) (wirepb.IngestClient, error) {
			t.Errorf("b forwarded a batch to %q", name)
			return nil, status.Error(codes.Internal, "no forwarding from b")
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	pb := newPeer(t, rb.Register)
	f := schema.Default().Families[0]
	owner := func(key uint64) string {
		if key%2 == 0 {
			return "a"
		}
		return "b"
	}
	hostOwner := func(h int) string {
		l := labels(h, 0, 0)
		return owner(schema.PartitionKey(f.Name, []string{l[1], l[3], l[5]}))
	}
	r, err := aggregator.NewRouter(aggregator.RouterOptions{
		Local: a.agg, Self: "a", Owner: owner,
		Peer: func(name string) (wirepb.IngestClient, error) {
			if name != "b" {
				t.Errorf("forward to unknown aggregator %q", name)
			}
			return wirepb.NewIngestClient(pb.conn), nil
		},
		Registerer: a.reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	const hosts = 40
	batch := func(seq uint64) *wirepb.PushRequest {
		var bt wire.Batch
		bt.Identify("pub", seq)
		for h := range hosts {
			addGood(&bt, a.ms(0), float64(seq), h, h%5, 0)
		}
		addGood(&bt, a.ms(0), -1, 1, 0, 0)               // rejected by its owner
		bt.Add("nosuch", a.ms(0), 1, labels(2, 0, 0)...) // malformed: stays local, rejected there
		return bt.Request()
	}
	check := func(resp *wirepb.PushResponse, err error, wantDup bool) {
		t.Helper()
		if err != nil {
			t.Fatalf("Push: %v", err)
		}
		if resp.Accepted != hosts || resp.Duplicate != wantDup || len(resp.Rejects) != 2 ||
			resp.Rejects[0].Index != hosts || resp.Rejects[0].Reason != wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA ||
			resp.Rejects[1].Index != hosts+1 || resp.Rejects[1].Reason != wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY {
			t.Fatalf("reply: accepted %d, duplicate %v, rejects %v; want %d accepted, duplicate %v, events %d and %d rejected",
				resp.Accepted, resp.Duplicate, resp.Rejects, hosts, wantDup, hosts, hosts+1)
		}
	}

	resp, err := r.Push(ctx, batch(1))
	check(resp, err, false)
	resp, err = r.Push(ctx, batch(1)) // a retry: every part is a duplicate
	check(resp, err, true)

	// The owner is down: the batch is not acknowledged, the local part is
	// counted, and the retry once the owner is back counts only the rest.
	pb.down()
	if _, err := r.Push(ctx, batch(2)); status.Code(err) != codes.Unavailable {
		t.Fatalf("push with the owner down: %v, want Unavailable", err)
	}
	pb.up()
	// The publisher retries until the batch is acknowledged; the client
	// connection may take a moment to reconnect.
	poll(t, "the owner to take the batch", func() bool {
		resp, err = r.Push(ctx, batch(2))
		return err == nil
	})
	check(resp, err, false)

	a.close(t)
	b.close(t)
	finest := f.Finest().ID
	stored := map[string]map[string]float64{"a": {}, "b": {}}
	for name, h := range map[string]*harness{"a": a, "b": b} {
		for cell, s := range h.read(t, 0, finest) {
			stored[name][cell] += s.Sum
		}
	}
	for h := range hosts {
		cell := cellOf(labels(h, h%5, 0))
		own, other := hostOwner(h), map[string]string{"a": "b", "b": "a"}[hostOwner(h)]
		if got := stored[own][cell]; got != 1+2 {
			t.Errorf("host %d: its owner %s holds %v, want 3 (batches 1 and 2, once each)", h, own, got)
		}
		if got, ok := stored[other][cell]; ok {
			t.Errorf("host %d: aggregator %s, which does not own it, holds %v", h, other, got)
		}
	}
	if len(stored["a"]) == 0 || len(stored["b"]) == 0 {
		t.Fatalf("one aggregator owns every host: %v", stored)
	}
}

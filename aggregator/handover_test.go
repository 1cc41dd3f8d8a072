package aggregator_test

import (
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// TestRouterHandOver declares an owner dead while parts of batches wait
// for it at two other aggregators, and hands its keys over: the parts that
// cannot have reached it go to the new owners and are counted once, across
// a restart of the aggregator that held them; the one whose delivery may
// have reached it (it took the part, the reply was lost) waits for it,
// across that restart too; and when it comes back it counts only that one,
// once.
func TestRouterHandOver(t *testing.T) {
	r := newRing(t, "a", "b", "c")
	before := byKey("a", "b", "c")
	after := func(key uint64) string {
		if o := before(key); o != "c" {
			return o
		}
		return byKey("a", "b")(key)
	}
	r.setOwner(before)
	a, b, c := r.nodes["a"], r.nodes["b"], r.nodes["c"]
	ts := r.clock.Now().UnixMilli()

	// c takes its part of batch 1 from a, but the reply is lost, and c
	// dies: the part may be in c's log, and waits for c. Every reply to a
	// is lost from now on, which its owners' dedupe makes harmless.
	lostReply(t, r, a, c, before, ts)
	c.crash()

	// Batches 2 and 3 come while c is down: their parts for c never leave.
	resp, err := r.push("a", routeBatch(ts, 2))
	checkReply(t, resp, err)
	resp, err = r.push("b", routeBatch(ts, 3))
	checkReply(t, resp, err)
	if p := a.agg.Pending(); p["c"] != 2 {
		t.Fatalf("a holds %v, want two parts for c", p)
	}
	// a restarts on its log before the hand-over: what it knew of the
	// first part's delivery survives. It comes back with a log over its
	// bound, as a long backlog for c would make it: it refuses batches,
	// but hands over all the same.
	a.walMax = 1
	a.crash()
	a.restart()
	if _, err := wirepb.NewIngestClient(a.srv.conn).Push(t.Context(), routeBatch(ts, 4), grpc.WaitForReady(true)); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a push to a with its log over its bound: %v, want ResourceExhausted", err)
	}

	// c is declared dead: its keys move to a and b, which hand over what
	// they hold for it.
	r.setOwner(after)
	handOver(t, a, 1, 1) // the part that may have reached c stays
	handOver(t, b, 1, 0)
	if n := a.h.counter(t, "dimsum_aggregator_forwarded_events_total"); n == 0 {
		t.Errorf("a counted no forwarded events")
	}
	// After a restart, a second hand-over moves nothing, and a repeat of a
	// moved part under its new identity, as a crash between the hand-over
	// and its confirmation would make, counts nothing.
	a.walMax = 0
	a.crash()
	a.restart()
	if n, err := a.router.HandOver("c"); err != nil || n != 0 {
		t.Errorf("a second hand-over moved %d parts (%v), want none", n, err)
	}
	repeat := routeBatch(ts, 2)
	repeat.Source = "pub via c"
	for range 5 {
		// The first call may go out on the connection to a's server
		// before the restart, and find it closing.
		resp, err = wirepb.NewIngestClient(a.srv.conn).Push(t.Context(), repeat, grpc.WaitForReady(true))
		if status.Code(err) != codes.Unavailable {
			break
		}
	}
	if err != nil || !resp.Duplicate {
		t.Errorf("batch 2 under the identity of its part handed over from c: %v, %v; want a duplicate", resp, err)
	}

	// c comes back: it takes the part that waited for it as a repeat, and
	// counts nothing else of batches 2 and 3. (a's replies were lost until
	// now: each of its deliveries was taken, and retried until this.)
	a.lossy.Store(false)
	c.restart()
	got := r.counts()
	moved := 0
	for h := range routeHosts {
		first, now := before(hostKey(h)), after(hostKey(h))
		want := map[string]uint64{first: 1}
		want[now] += 2
		if first != now {
			moved++
		}
		for name, hosts := range got {
			if hosts[h] != want[name] {
				t.Errorf("host %d (owner %s, then %s): %s holds %d events, want %d", h, first, now, name, hosts[h], want[name])
			}
		}
	}
	if moved == 0 {
		t.Fatal("c owned no host: the test shows nothing")
	}
}

// handOver hands over, as the node does every half second, until n holds
// keep parts for c, and checks that it moved want in all. A part whose
// delivery is under way when it is looked at stays until the next time.
func handOver(t *testing.T, n *ringNode, want, keep int) {
	t.Helper()
	moved := 0
	poll(t, n.name+" to hand over what it holds for c", func() bool {
		m, err := n.router.HandOver("c")
		if err != nil {
			t.Fatal(err)
		}
		moved += m
		return n.agg.Pending()["c"] == keep
	})
	if moved != want {
		t.Errorf("%s handed over %d parts, want %d", n.name, moved, want)
	}
}

// TestHandOverCarriesReachedPart keeps a part that may have reached a dead
// owner for good: the owner never comes back while the log moves on, and
// the segment the part was logged in, with every one after it, must still
// go once its windows are out; the part waits for its owner across a
// restart all the same, and when the owner does come back it counts it
// once.
func TestHandOverCarriesReachedPart(t *testing.T) {
	r := newRing(t, "a", "b")
	before := byKey("a", "b")
	r.setOwner(before)
	a, b := r.nodes["a"], r.nodes["b"]
	a.segBytes = 4 << 10
	a.crash()
	a.restart()
	ts := r.clock.Now().UnixMilli()

	lostReply(t, r, a, b, before, ts)
	// Replies stay lost until b is back: a retry that reached b just
	// before it died would otherwise count as delivered, and leave the
	// test no part to carry.
	b.crash()
	r.setOwner(byKey("a"))
	if n, err := a.router.HandOver("b"); err != nil || n != 0 {
		t.Fatalf("a hand-over moved %d parts (%v), want none", n, err)
	}

	// a goes on alone: its windows go out to its store, the log moves to
	// new segments, and each hand-over carries the part along.
	for seq := uint64(2); seq < 40; seq++ {
		resp, err := r.push("a", routeBatch(ts, seq))
		checkReply(t, resp, err)
		if seq%8 == 0 {
			r.clock.Set(r.clock.Now().Add(time.Minute))
			aggregator.Flush(a.agg)
			poll(t, "a's flushes to be delivered", func() bool { p := a.agg.Pending(); return len(p) == 1 && p["b"] == 1 })
			if _, err := a.router.HandOver("b"); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.clock.Set(r.clock.Now().Add(time.Minute))
	aggregator.Flush(a.agg)
	poll(t, "a's log to drop the segments behind the part it keeps for b", func() bool {
		if _, err := a.router.HandOver("b"); err != nil {
			t.Fatal(err)
		}
		aggregator.Flush(a.agg)
		return segments(t, a.dir) <= 2
	})
	if p := a.agg.Pending(); p["b"] != 1 {
		t.Fatalf("a holds %v, want the one part for b", p)
	}

	// Across a restart the part still waits for b, never handed over
	// (the hand-overs are those of the node's gossip loop, faster).
	a.crash()
	a.restart()
	for range 20 {
		if n, err := a.router.HandOver("b"); err != nil || n != 0 {
			t.Fatalf("after a restart a hand-over moved %d parts (%v), want none", n, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p := a.agg.Pending(); p["b"] != 1 {
		t.Fatalf("a holds %v after a restart, want the one part for b", p)
	}

	// b comes back: it had counted the part, and counts it no more.
	a.lossy.Store(false)
	b.restart()
	got := r.counts()
	for h := range routeHosts {
		want := map[string]uint64{"a": 38}
		if before(hostKey(h)) == "b" {
			want["b"] = 1
		} else {
			want["a"]++
		}
		for name, hosts := range got {
			if hosts[h] != want[name] {
				t.Errorf("host %d: %s holds %d events, want %d", h, name, hosts[h], want[name])
			}
		}
	}
}

// lostReply pushes batch 1 through from with every reply to from lost, and
// waits until to has counted its part of it (to must own some host, under
// owner) and from has missed the reply, which leaves the part marked as
// possibly reached. Replies to from stay lost.
func lostReply(t *testing.T, r *ring, from, to *ringNode, owner func(uint64) string, ts int64) {
	t.Helper()
	part := 0
	for h := range routeHosts {
		if owner(hostKey(h)) == to.name {
			part++
		}
	}
	if part == 0 {
		t.Fatalf("%s owns no host: the test shows nothing", to.name)
	}
	from.lossy.Store(true)
	resp, err := r.push(from.name, routeBatch(ts, 1))
	checkReply(t, resp, err)
	poll(t, to.name+" to count its part of batch 1", func() bool {
		return to.h.counter(t, "dimsum_aggregator_events_accepted_total") == float64(part)
	})
	poll(t, from.name+" to miss "+to.name+"'s reply", func() bool {
		return from.h.counter(t, "dimsum_aggregator_forward_errors_total") > 0
	})
}

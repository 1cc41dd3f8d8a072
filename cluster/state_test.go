package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestJoinLearnsGone checks that members joining after memberlist has
// forgotten a dead and a left member, a restarted one and a brand-new one,
// list them as the others do, and that the dead one coming back is alive
// everywhere.
func TestJoinLearnsGone(t *testing.T) {
	a, b, c := startThree(t)
	logger := newTestLogger(t)
	e := startNode(t, logger, "e", Meta{Roles: []Role{RoleQuery}, HTTPAddr: "127.0.0.1:9105", Started: time.Now()}, a.Local().Addr)
	waitFor(t, "a sees e", func() bool { return hasState(a, "e", StateAlive) }, a, e)
	bWas := b.Local()
	if err := e.Leave(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Cluster{b, c, e} {
		if err := n.Shutdown(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a sees b and c dead, e left", func() bool {
		return hasState(a, "b", StateDead) && hasState(a, "c", StateDead) && hasState(a, "e", StateLeft)
	}, a)
	// memberlist forgets them GossipToTheDeadTime after they went, at its
	// next gossip round; from then on only a's own table holds them.
	timing := FastTiming()
	time.Sleep(timing.GossipToTheDeadTime + 4*timing.GossipInterval)

	c2 := startNode(t, logger, "c", Meta{Roles: []Role{RoleCombiner}, GRPCAddr: "127.0.0.1:9013", Started: time.Now()}, a.Local().Addr)
	d := startNode(t, logger, "d", aggMeta("127.0.0.1:9004"), c2.Local().Addr) // learns through c2 only
	all := []*Cluster{a, c2, d}
	for _, n := range all {
		waitFor(t, n.Local().Name+" lists b dead and e left, with their records", func() bool {
			bm, _ := member(n, "b")
			em, _ := member(n, "e")
			return bm.State == StateDead && bm.Addr == bWas.Addr && sameMeta(bm.Meta, bWas.Meta) &&
				em.State == StateLeft && em.Meta.HasRole(RoleQuery) && em.Meta.Leaving
		}, all...)
	}
	if got := Names(d.WithRole(RoleCombiner, StateAlive, StateDead)); strings.Join(got, ",") != "b,c" {
		t.Errorf("d: alive or dead combiners %q, want b,c", got)
	}
	stale := (*delegate)(a).LocalState(false)
	if len(stale) == 0 {
		t.Fatal("a sends no table of gone members")
	}

	restarted := time.Now()
	b2 := startNode(t, logger, "b", Meta{Roles: []Role{RoleCombiner}, GRPCAddr: "127.0.0.1:9012", Started: restarted}, d.Local().Addr)
	all = append(all, b2)
	for _, n := range all {
		waitFor(t, n.Local().Name+" lists b alive with its new record", func() bool {
			m, _ := member(n, "b")
			return m.State == StateAlive && m.Meta.Started.Equal(restarted) && m.Meta.GRPCAddr == "127.0.0.1:9012"
		}, all...)
	}
	for _, n := range all {
		(*delegate)(n).MergeRemoteState(stale, false)
		for name, want := range map[string]State{"b": StateAlive, "e": StateLeft} {
			if m, _ := member(n, name); m.State != want {
				t.Errorf("after a stale table, %s lists %s as %s, want %s", n.Local().Name, name, m.State, want)
			}
		}
	}
	if m, _ := member(b2, "e"); m.State != StateLeft {
		t.Errorf("restarted b lists e as %s, want left", m.State)
	}
}

func TestSupersedes(t *testing.T) {
	t0 := time.Unix(1_760_000_000, 0)
	gone := func(s State, started time.Time) *Member {
		return &Member{Name: "n", State: s, Meta: Meta{Started: started}}
	}
	for _, c := range []struct {
		name          string
		remote, local *Member
		want          bool
	}{
		{"unknown", gone(StateDead, t0), nil, true},
		{"alive-same-start", gone(StateDead, t0), gone(StateAlive, t0), false},
		{"alive-older-start", gone(StateDead, t0.Add(time.Hour)), gone(StateAlive, t0), false},
		{"dead-restarted-since", gone(StateDead, t0.Add(time.Second)), gone(StateDead, t0), true},
		{"dead-stale", gone(StateDead, t0), gone(StateDead, t0.Add(time.Second)), false},
		{"dead-same", gone(StateDead, t0), gone(StateDead, t0), false},
		{"left-over-dead", gone(StateLeft, t0), gone(StateDead, t0), true},
		{"left-stays-left", gone(StateDead, t0), gone(StateLeft, t0), false},
		{"left-then-restarted-and-died", gone(StateDead, t0.Add(time.Second)), gone(StateLeft, t0), true},
		{"undecoded-record", gone(StateDead, time.Time{}), gone(StateLeft, t0), false},
	} {
		if got := supersedes(c.remote, c.local); got != c.want {
			t.Errorf("%s: supersedes = %v, want %v", c.name, got, c.want)
		}
	}
}

// goneMember returns a member gone in state s since, with a real record.
func goneMember(t testing.TB, name string, s State, since time.Time) Member {
	m := Member{Name: name, Addr: "127.0.0.1:7946", State: s, Since: since,
		Meta: Meta{Roles: []Role{RoleAggregator}, GRPCAddr: "127.0.0.1:9403", Started: since.Add(-time.Hour)}}
	var err error
	if m.record, err = AppendMeta(nil, &m.Meta); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestStateRoundTrip(t *testing.T) {
	since := time.Unix(1_760_000_000, 7)
	in := []Member{goneMember(t, "agg-1", StateDead, since), goneMember(t, "agg-2", StateLeft, since), {Name: "x", State: StateDead}}
	b, n := appendState(nil, in, stateMaxSize)
	if n != len(in) {
		t.Fatalf("wrote %d of %d entries", n, len(in))
	}
	out, err := decodeState(b)
	if err != nil {
		t.Fatalf("decodeState(%x): %v", b, err)
	}
	if len(out) != len(in) {
		t.Fatalf("decoded %d entries, want %d", len(out), len(in))
	}
	for i := range in {
		if !sameGone(in[i], out[i]) {
			t.Errorf("entry %d: %+v, want %+v", i, out[i], in[i])
		}
	}
	// A later version's appended fields are skipped; this version's are not.
	later := append([]byte{stateVersion + 1}, b[1:]...)
	if _, err := decodeState(append(later, 0xff)); err != nil {
		t.Errorf("a later version with a field appended: %v", err)
	}
	if _, err := decodeState(append(b, 0xff)); !errors.Is(err, errCorruptState) {
		t.Errorf("version %d with a byte appended: %v, want errCorruptState", stateVersion, err)
	}
}

func sameGone(a, b Member) bool {
	return a.Name == b.Name && a.Addr == b.Addr && a.State == b.State && a.Since.Equal(b.Since) && bytes.Equal(a.record, b.record)
}

// TestStateBound checks that the table sent stays within stateMaxSize and
// that what it leaves out are left members, then those gone longest.
func TestStateBound(t *testing.T) {
	n := startNode(t, newTestLogger(t), "solo", aggMeta("127.0.0.1:9001"))
	base := time.Unix(1_760_000_000, 0)
	n.mu.Lock()
	for i := range 1000 {
		s := StateDead
		if i%2 == 0 {
			s = StateLeft
		}
		m := goneMember(t, fmt.Sprintf("aggregator-%04d", i), s, base.Add(time.Duration(i)*time.Second))
		m.Addr = strings.Repeat("a", 40) // bigger, so that the bound bites
		n.mu.members[m.Name] = &m
	}
	n.mu.Unlock()
	b := (*delegate)(n).LocalState(false)
	if len(b) > stateMaxSize {
		t.Fatalf("table of %d bytes, over the bound of %d", len(b), stateMaxSize)
	}
	gone, err := decodeState(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(gone) < 500 || len(gone) == 1000 {
		t.Fatalf("sent %d of 1000 gone members, want every dead one and not every left one", len(gone))
	}
	for i, m := range gone[:500] {
		if want := fmt.Sprintf("aggregator-%04d", 999-2*i); m.Name != want || m.State != StateDead {
			t.Fatalf("entry %d is %s %s, want %s dead: the dead, last gone first", i, m.Name, m.State, want)
		}
	}
	if m := gone[500]; m.Name != "aggregator-0998" || m.State != StateLeft {
		t.Errorf("first left entry is %s %s, want aggregator-0998, the last to leave", m.Name, m.State)
	}
}

// TestMergeBadRecord checks that a gone member whose record does not
// decode is listed with no role and logged, and that a table that does not
// decode changes nothing.
func TestMergeBadRecord(t *testing.T) {
	logs := &testLog{}
	n := startNode(t, slog.New(slog.NewTextHandler(logs, nil)), "solo", aggMeta("127.0.0.1:9001"))
	changes, cancel := n.Subscribe()
	defer cancel()
	bad := Member{Name: "bad", Addr: "127.0.0.1:1", State: StateDead, Since: time.Now(), record: []byte{0}}
	self := goneMember(t, "solo", StateDead, time.Now())
	b, _ := appendState(nil, []Member{bad, self}, stateMaxSize)
	(*delegate)(n).MergeRemoteState(b[:len(b)-1], false)
	if _, ok := member(n, "bad"); ok {
		t.Fatal("a truncated table was merged")
	}
	(*delegate)(n).MergeRemoteState(b, true)
	m, ok := member(n, "bad")
	if !ok || m.State != StateDead || len(m.Meta.Roles) != 0 || m.Addr != bad.Addr || !m.Since.Equal(bad.Since) {
		t.Errorf("member with a bad record listed as %+v (%v), want dead with no role", m, ok)
	}
	if s := n.Local().State; s != StateAlive {
		t.Errorf("a table listing this node dead made it %s", s)
	}
	select {
	case <-changes:
	default:
		t.Error("learning a member did not notify")
	}
	logs.mu.Lock()
	defer logs.mu.Unlock()
	for _, want := range []string{"member table from push/pull does not decode", "member's meta does not decode"} {
		if !strings.Contains(logs.buf.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.buf.String())
		}
	}
}

// FuzzDecodeState feeds decodeState arbitrary bytes: it must never panic,
// and whatever it accepts must encode again to bytes that decode to the
// same entries.
func FuzzDecodeState(f *testing.F) {
	since := time.Unix(1_760_000_000, 5)
	b, _ := appendState(nil, []Member{goneMember(f, "a", StateDead, since), goneMember(f, "bb", StateLeft, since)}, stateMaxSize)
	f.Add(b)
	f.Add([]byte{stateVersion, 0})
	f.Add([]byte{stateVersion + 1, 1, 1, 'n', 0, byte(StateLeft), 0, 0, 0xff})
	f.Add([]byte{stateVersion, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, b []byte) {
		gone, err := decodeState(b)
		if !decoded(t, b, err, errCorruptState) {
			return
		}
		again, n := appendState(nil, gone, len(b)+stateMaxSize)
		if n != len(gone) {
			t.Fatalf("%x: re-encoded %d of %d entries", b, n, len(gone))
		}
		gone2, err := decodeState(again)
		if err != nil || len(gone2) != len(gone) {
			t.Fatalf("%x re-encoded to %x decodes to %d entries, %v", b, again, len(gone2), err)
		}
		for i := range gone {
			if !sameGone(gone[i], gone2[i]) {
				t.Fatalf("entry %d re-encoded as %+v, was %+v", i, gone2[i], gone[i])
			}
		}
	})
}

// decoded reports whether a fuzzed decoder accepted b, and fails t when it
// refused b with an error not marked corrupt.
func decoded(t *testing.T, b []byte, err, corrupt error) bool {
	t.Helper()
	if err != nil && !errors.Is(err, corrupt) {
		t.Fatalf("decoding %x: %v, not %v", b, err, corrupt)
	}
	return err == nil
}

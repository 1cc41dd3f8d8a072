package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// testLog collects a test's logs and prints them only when it fails:
// memberlist's goroutines may still log after the test has returned.
type testLog struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func newTestLogger(t *testing.T) *slog.Logger {
	l := &testLog{}
	t.Cleanup(func() {
		if t.Failed() {
			l.mu.Lock()
			t.Log("logs:\n" + l.buf.String())
			l.mu.Unlock()
		}
	})
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startNode starts a member on 127.0.0.1 at a free port with FastTiming,
// and shuts it down when the test ends.
func startNode(t *testing.T, logger *slog.Logger, name string, meta Meta, join ...string) *Cluster {
	t.Helper()
	return startConfig(t, logger, Config{Name: name, BindAddr: "127.0.0.1:0", Join: join, Meta: meta, Timing: FastTiming()})
}

func startConfig(t *testing.T, logger *slog.Logger, cfg Config) *Cluster {
	t.Helper()
	cfg.JoinTimeout = 20 * time.Second
	cfg.Logger = logger.With("node", cfg.Name)
	c, err := Start(cfg)
	if err != nil {
		t.Fatalf("start %s: %v", cfg.Name, err)
	}
	t.Cleanup(func() { _ = c.Shutdown() })
	return c
}

// waitFor polls cond until it holds or 20 seconds pass; only the deadline
// fails the test, so a slow machine makes the test slower, not red.
func waitFor(t *testing.T, what string, cond func() bool, nodes ...*Cluster) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			var views []string
			for _, n := range nodes {
				views = append(views, fmt.Sprintf("%s sees %s", n.Local().Name, describe(n.Members())))
			}
			t.Fatalf("after 20s, still not %s:\n%s", what, strings.Join(views, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func describe(ms []Member) string {
	var parts []string
	for _, m := range ms {
		parts = append(parts, fmt.Sprintf("%s@%s:%s{%v}", m.Name, m.Addr, m.State, m.Meta))
	}
	return strings.Join(parts, " ")
}

// member returns name as c sees it.
func member(c *Cluster, name string) (Member, bool) {
	for _, m := range c.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return Member{}, false
}

func hasState(c *Cluster, name string, s State) bool {
	m, ok := member(c, name)
	return ok && m.State == s
}

func aggMeta(grpc string) Meta {
	return Meta{Roles: []Role{RoleAggregator}, GRPCAddr: grpc, HTTPAddr: "127.0.0.1:9091", Started: time.Now()}
}

// startThree starts a seed, then two nodes that join through it.
func startThree(t *testing.T) (a, b, c *Cluster) {
	logger := newTestLogger(t)
	a = startNode(t, logger, "a", Meta{Roles: []Role{RoleAggregator, RoleQuery}, GRPCAddr: "127.0.0.1:9001", Started: time.Now()})
	seed := a.Local().Addr
	b = startNode(t, logger, "b", Meta{Roles: []Role{RoleCombiner}, GRPCAddr: "127.0.0.1:9002", Started: time.Now()}, seed)
	c = startNode(t, logger, "c", Meta{Roles: []Role{RoleCombiner}, GRPCAddr: "127.0.0.1:9003", Started: time.Now()}, seed)
	all := []*Cluster{a, b, c}
	waitFor(t, "three alive members everywhere", func() bool {
		for _, n := range all {
			if len(n.WithRole(RoleAggregator, StateAlive))+len(n.WithRole(RoleCombiner, StateAlive)) != 3 {
				return false
			}
		}
		return true
	}, all...)
	return a, b, c
}

func TestJoinSeesMeta(t *testing.T) {
	a, b, c := startThree(t)
	local := a.Local()
	if _, port, err := net.SplitHostPort(local.Addr); err != nil || port == "0" {
		t.Errorf("local address %q does not report the chosen port", local.Addr)
	}
	if local.Name != "a" || local.State != StateAlive || local.Meta.GRPCAddr != "127.0.0.1:9001" {
		t.Errorf("Local() = %+v", local)
	}
	for _, n := range []*Cluster{a, b, c} {
		ms := n.Members()
		if got := strings.Join(Names(ms), ","); got != "a,b,c" {
			t.Fatalf("%s lists %s, want a,b,c in order", n.Local().Name, got)
		}
		for i, want := range []struct {
			grpc  string
			roles string
		}{{"127.0.0.1:9001", "aggregator,query"}, {"127.0.0.1:9002", "combiner"}, {"127.0.0.1:9003", "combiner"}} {
			m := ms[i]
			var roles []string
			for _, r := range m.Meta.Roles {
				roles = append(roles, string(r))
			}
			if m.State != StateAlive || m.Meta.GRPCAddr != want.grpc || strings.Join(roles, ",") != want.roles || m.Meta.Started.IsZero() {
				t.Errorf("%s sees %s as %s %v, want alive with grpc %s, roles %s and a start time", n.Local().Name, m.Name, m.State, m.Meta, want.grpc, want.roles)
			}
			if m.Since.IsZero() || m.Addr == "" {
				t.Errorf("%s sees %s with address %q since %v", n.Local().Name, m.Name, m.Addr, m.Since)
			}
		}
		if got := Names(n.WithRole(RoleCombiner, StateAlive)); strings.Join(got, ",") != "b,c" {
			t.Errorf("%s: alive combiners %q, want b,c", n.Local().Name, got)
		}
		if got := Names(n.WithRole(RoleQuery)); strings.Join(got, ",") != "a" {
			t.Errorf("%s: query nodes %q, want a", n.Local().Name, got)
		}
		if got := n.WithRole(RoleCombiner, StateDead, StateLeft); len(got) != 0 {
			t.Errorf("%s: dead or left combiners %v, want none", n.Local().Name, got)
		}
	}
}

func TestUpdateMetaPropagates(t *testing.T) {
	a, b, c := startThree(t)
	changes, cancel := a.Subscribe()
	defer cancel()
	for len(changes) > 0 { // drop what the joins left pending
		<-changes
	}
	if err := b.UpdateMeta(func(m *Meta) {
		m.PendingHandoff = append(m.PendingHandoff, "c")
		m.Leaving = true
	}); err != nil {
		t.Fatal(err)
	}
	if got := b.Local().Meta; !got.Leaving || len(got.PendingHandoff) != 1 {
		t.Errorf("b's own meta after the update: %v", got)
	}
	for _, n := range []*Cluster{a, c} {
		waitFor(t, n.Local().Name+" sees b's update", func() bool {
			m, _ := member(n, "b")
			return m.Meta.Leaving && strings.Join(m.Meta.PendingHandoff, ",") == "c" && m.Meta.GRPCAddr == "127.0.0.1:9002"
		}, a, b, c)
	}
	select {
	case <-changes:
	default:
		t.Error("a's subscription did not fire on b's update")
	}

	// An update that does not fit is refused whole.
	err := b.UpdateMeta(func(m *Meta) {
		for i := range 100 {
			m.PendingHandoff = append(m.PendingHandoff, fmt.Sprintf("combiner-%03d", i))
		}
	})
	if !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("oversized update: %v, want ErrMetaTooLarge", err)
	}
	if got := b.Local().Meta.PendingHandoff; strings.Join(got, ",") != "c" {
		t.Errorf("refused update changed the meta: pending handoff %q", got)
	}
}

func TestLeaveShowsLeft(t *testing.T) {
	a, b, c := startThree(t)
	if err := c.Leave(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.UpdateMeta(func(m *Meta) { m.Leaving = true }); !errors.Is(err, ErrLeft) {
		t.Errorf("UpdateMeta after Leave: %v, want ErrLeft", err)
	}
	if err := c.Leave(time.Second); err != nil {
		t.Errorf("second Leave: %v", err)
	}
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Cluster{a, b} {
		waitFor(t, n.Local().Name+" sees c left", func() bool { return hasState(n, "c", StateLeft) }, a, b)
	}
	for _, n := range []*Cluster{a, b} {
		if got := Names(n.WithRole(RoleCombiner, StateLeft)); strings.Join(got, ",") != "c" {
			t.Errorf("%s: left combiners %q, want c", n.Local().Name, got)
		}
		if got := Names(n.WithRole(RoleCombiner, StateAlive)); strings.Join(got, ",") != "b" {
			t.Errorf("%s: alive combiners %q, want b", n.Local().Name, got)
		}
	}
	if err := c.Leave(time.Second); !errors.Is(err, ErrClosed) {
		t.Errorf("Leave after Shutdown: %v, want ErrClosed", err)
	}
	if err := c.UpdateMeta(func(*Meta) {}); !errors.Is(err, ErrClosed) {
		t.Errorf("UpdateMeta after Shutdown: %v, want ErrClosed", err)
	}
}

// TestCrashShowsDeadAndRejoin shuts a node down without a Leave, as a crash
// would, then restarts it under its name: at a new port, which FastTiming's
// DeadNodeReclaimTime lets it take at once, and at its old address, which
// memberlist always lets back.
func TestCrashShowsDeadAndRejoin(t *testing.T) {
	for _, samePort := range []bool{false, true} {
		t.Run(fmt.Sprintf("same-port=%v", samePort), func(t *testing.T) {
			a, b, c := startThree(t)
			oldAddr := c.Local().Addr
			if err := c.Shutdown(); err != nil {
				t.Fatal(err)
			}
			for _, n := range []*Cluster{a, b} {
				waitFor(t, n.Local().Name+" sees c dead", func() bool { return hasState(n, "c", StateDead) }, a, b)
			}
			if got := Names(a.WithRole(RoleCombiner, StateAlive, StateDead)); strings.Join(got, ",") != "b,c" {
				t.Errorf("alive or dead combiners %q, want b,c", got)
			}

			restarted := time.Now()
			cfg := Config{
				Name: "c", BindAddr: "127.0.0.1:0", Join: []string{b.Local().Addr}, Timing: FastTiming(),
				Meta: Meta{Roles: []Role{RoleCombiner}, GRPCAddr: "127.0.0.1:9013", Started: restarted, Leaving: true},
			}
			if samePort {
				cfg.BindAddr = oldAddr
				cfg.Timing.DeadNodeReclaimTime = 0 // as in LANTiming
			}
			c2 := startConfig(t, newTestLogger(t), cfg)
			if samePort && c2.Local().Addr != oldAddr {
				t.Fatalf("restarted at %s, want %s", c2.Local().Addr, oldAddr)
			}
			for _, n := range []*Cluster{a, b, c2} {
				waitFor(t, n.Local().Name+" sees c alive again with its new meta", func() bool {
					m, ok := member(n, "c")
					return ok && m.State == StateAlive && m.Meta.GRPCAddr == "127.0.0.1:9013" && m.Meta.Leaving &&
						m.Meta.Started.Equal(restarted) && m.Addr == c2.Local().Addr
				}, a, b, c2)
			}
			waitFor(t, "c sees a and b alive", func() bool {
				return hasState(c2, "a", StateAlive) && hasState(c2, "b", StateAlive)
			}, c2)
		})
	}
}

func TestJoinUnreachable(t *testing.T) {
	// A port that was free a moment ago: nothing answers there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()
	logs := &testLog{}
	_, err = Start(Config{
		Name: "lonely", BindAddr: "127.0.0.1:0", Join: []string{dead}, JoinTimeout: 500 * time.Millisecond,
		Timing: FastTiming(), Logger: slog.New(slog.NewTextHandler(logs, nil)),
	})
	if !errors.Is(err, ErrJoin) || !strings.Contains(err.Error(), "none of "+dead+" answered in") {
		t.Fatalf("Start joining %s: %v, want ErrJoin naming it", dead, err)
	}
	logs.mu.Lock()
	defer logs.mu.Unlock()
	if n := strings.Count(logs.buf.String(), `msg="join failed"`); n < 2 {
		t.Errorf("logged %d failed join attempts, want one per attempt (at least 2):\n%s", n, logs.buf.String())
	}
}

func TestStartRefusesBadConfig(t *testing.T) {
	big := Meta{Roles: []Role{RoleAggregator}}
	for i := range 60 {
		big.PendingHandoff = append(big.PendingHandoff, fmt.Sprintf("combiner-%03d", i))
	}
	_, err := Start(Config{Name: "n", BindAddr: "127.0.0.1:0", Meta: big, Timing: FastTiming()})
	if !errors.Is(err, ErrConfig) || !errors.Is(err, ErrMetaTooLarge) || !strings.Contains(err.Error(), "memberlist allows 512") {
		t.Errorf("Start with a %d-name handoff list: %v, want ErrConfig and ErrMetaTooLarge", len(big.PendingHandoff), err)
	}
	_, err = Start(Config{Name: "n", BindAddr: "127.0.0.1:0", Join: []string{"seed"}})
	if !errors.Is(err, ErrConfig) {
		t.Errorf("Start joining %q: %v, want ErrConfig", "seed", err)
	}
}

// TestSubscribe checks coalescing, cancel and Shutdown on one node, whose
// own meta updates notify it synchronously.
func TestSubscribe(t *testing.T) {
	n := startNode(t, newTestLogger(t), "solo", aggMeta("127.0.0.1:9001"))
	ch, cancel := n.Subscribe()
	other, _ := n.Subscribe()
	for i := range 3 {
		if err := n.UpdateMeta(func(m *Meta) { m.PendingHandoff = []string{fmt.Sprint("x", i)} }); err != nil {
			t.Fatal(err)
		}
	}
	if len(ch) != 1 || len(other) != 1 {
		t.Fatalf("after three updates %d and %d pending notifications, want one each", len(ch), len(other))
	}
	<-ch
	cancel()
	if _, ok := <-ch; ok {
		t.Error("cancelled subscription still open")
	}
	cancel() // twice is harmless
	if err := n.Shutdown(); err != nil {
		t.Fatal(err)
	}
	<-other // the pending notification
	if _, ok := <-other; ok {
		t.Error("subscription open after Shutdown")
	}
	late, _ := n.Subscribe()
	if _, ok := <-late; ok {
		t.Error("subscription made after Shutdown is open")
	}
	if err := n.Shutdown(); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
}

// TestLeaveAlone checks that a node with no peers leaves at once and lists
// itself as left.
func TestLeaveAlone(t *testing.T) {
	n := startNode(t, newTestLogger(t), "solo", aggMeta("127.0.0.1:9001"))
	if err := n.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	if s := n.Local().State; s != StateLeft {
		t.Errorf("after Leave, Local().State = %s, want left", s)
	}
}

// TestJoinSharedList checks that every node may be given one list of
// addresses, its own included: the first node to start joins itself, the
// next ones join through it.
func TestJoinSharedList(t *testing.T) {
	logger := newTestLogger(t)
	var addrs []string
	for range 2 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, l.Addr().String())
		l.Close()
	}
	cfg := func(name, bind string) Config {
		return Config{Name: name, BindAddr: bind, Join: addrs, Timing: FastTiming(), Meta: aggMeta("127.0.0.1:9001")}
	}
	a := startConfig(t, logger, cfg("a", addrs[0]))
	b := startConfig(t, logger, cfg("b", addrs[1]))
	for _, n := range []*Cluster{a, b} {
		waitFor(t, n.Local().Name+" sees both", func() bool {
			return len(n.WithRole(RoleAggregator, StateAlive)) == 2
		}, a, b)
	}
}

// TestConcurrentUpdates checks that concurrent UpdateMeta calls each apply
// to the result of the one before, and that Leave and Shutdown racing them
// neither panic nor lose the updates made before.
func TestConcurrentUpdates(t *testing.T) {
	a, b, _ := startThree(t)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			if err := b.UpdateMeta(func(m *Meta) { m.PendingHandoff = append(m.PendingHandoff, fmt.Sprint("r", i)) }); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := b.Local().Meta.PendingHandoff; len(got) != 8 {
		t.Fatalf("after 8 concurrent appends, pending handoff is %q", got)
	}
	waitFor(t, "a sees all 8 appends", func() bool {
		m, _ := member(a, "b")
		return len(m.Meta.PendingHandoff) == 8
	}, a, b)

	for range 4 {
		wg.Go(func() { _ = b.UpdateMeta(func(m *Meta) { m.Leaving = !m.Leaving }) })
	}
	wg.Go(func() { _ = b.Leave(time.Second) })
	wg.Go(func() { _ = b.Shutdown() })
	wg.Wait()
	if err := b.Leave(time.Second); !errors.Is(err, ErrClosed) {
		t.Errorf("Leave after Shutdown: %v, want ErrClosed", err)
	}
}

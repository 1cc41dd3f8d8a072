package node

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/loadtest"
)

// member starts a cluster node with the given roles, joining seed (none for
// the first), with memberlist's fast timings and 8 shards held twice by the
// combiners c1 and c2.
func member(t *testing.T, name string, seed *Node, roles ...cluster.Role) *Node {
	t.Helper()
	return startMember(t, memberConfig(t, name, seed, roles...))
}

// memberConfig is the config member starts a node with.
func memberConfig(t *testing.T, name string, seed *Node, roles ...cluster.Role) Config {
	t.Helper()
	cfg := testConfig(t.TempDir())
	cfg.Name = name
	for _, r := range roles {
		cfg.Roles = append(cfg.Roles, string(r))
	}
	cfg.Cluster = ClusterConfig{GossipListen: "127.0.0.1:0", InternalListen: "127.0.0.1:0", Insecure: true, Timing: "fast", Shards: 8, Replication: 2, Combiners: []string{"c1", "c2"}}
	if seed != nil {
		cfg.Cluster.Join = []string{seed.GossipAddr()}
	}
	return cfg
}

// startMember starts a node, stopped at the end of the test, which then
// logs what the node logged if it failed.
func startMember(t *testing.T, cfg Config) *Node {
	t.Helper()
	logs := &syncBuffer{}
	n, err := Start(cfg, "test", slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatalf("starting %s: %v", cfg.Name, err)
	}
	t.Cleanup(func() {
		n.Close()
		if t.Failed() {
			t.Logf("log of %s:\n%s", cfg.Name, logs.String())
		}
	})
	return n
}

// syncBuffer is a log destination that several goroutines write.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// status reads a node's /api/v1/status/cluster.
func status(t *testing.T, n *Node) clusterStatus {
	t.Helper()
	resp, err := http.Get("http://" + n.HTTPAddr() + "/api/v1/status/cluster")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct {
		Status string        `json:"status"`
		Data   clusterStatus `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || st.Status != "success" {
		t.Fatalf("status: %+v, %v", st, err)
	}
	return st.Data
}

// states returns each member's state as n sees it.
func states(t *testing.T, n *Node) map[string]string {
	out := map[string]string{}
	for _, m := range status(t, n).Members {
		out[m.Name] = m.State
	}
	return out
}

// waitFor polls cond until it holds or 30s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// totals asks a query node for the exact sums by datacenter over the last
// hour, and the number of events; warnings are returned too.
func totals(t *testing.T, n *Node, partial bool) (map[string]float64, float64, []string, int) {
	t.Helper()
	q := url.Values{"family": {"requests"}, "by": {"datacenter"}, "since": {"1h"}, "measures": {"sum,count"}}
	if !partial {
		q.Set("partial_response", "false")
	}
	code, r := get(t, n.HTTPAddr(), "/api/v1/cube/slice", q)
	if code != http.StatusOK {
		return nil, 0, nil, code
	}
	var s struct {
		Groups []struct {
			Labels map[string]string  `json:"labels"`
			Values map[string]float64 `json:"values"`
		} `json:"groups"`
		Warnings []string `json:"warnings"`
	}
	if err := json.Unmarshal(r.Data, &s); err != nil {
		t.Fatal(err)
	}
	sums := map[string]float64{}
	count := 0.0
	for _, g := range s.Groups {
		sums[g.Labels["datacenter"]] = g.Values["sum"]
		count += g.Values["count"]
	}
	return sums, count, s.Warnings, code
}

// TestClusterStatus checks /api/v1/status/cluster on a node outside a
// cluster and on the members of a small one.
func TestClusterStatus(t *testing.T) {
	alone, err := Start(testConfig(t.TempDir()), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer alone.Close()
	st := status(t, alone)
	if st.Clustered || len(st.Members) != 1 || st.Members[0].Name != "test" || len(st.Members[0].Roles) != 3 ||
		len(st.Shards) != 1 || st.Shards[0].Replicas[0].Name != "test" {
		t.Errorf("a node alone: %+v", st)
	}

	c1 := member(t, "c1", nil, cluster.RoleCombiner)
	c2 := member(t, "c2", c1, cluster.RoleCombiner)
	q := member(t, "q", c1, cluster.RoleQuery, cluster.RoleAggregator)
	waitFor(t, "q to see three members", func() bool { return len(states(t, q)) == 3 })
	st = status(t, q)
	if !st.Clustered || st.ShardCount != 8 || st.Replication != 2 || len(st.Shards) != 8 {
		t.Fatalf("cluster status: %+v", st)
	}
	for _, s := range st.Shards {
		if len(s.Replicas) != 2 || s.Replicas[0].Name == s.Replicas[1].Name {
			t.Errorf("shard %d: replicas %+v, want c1 and c2", s.Shard, s.Replicas)
		}
	}
	c2.Close()
	waitFor(t, "c2 to be dead", func() bool { return states(t, q)["c2"] == "dead" })
	for _, s := range status(t, q).Shards {
		if len(s.Replicas) != 2 {
			t.Errorf("shard %d lost a replica when c2 died: %+v; a dead combiner keeps its shards", s.Shard, s.Replicas)
		}
	}
}

// TestClusterJoinLeave drives a load through two aggregators while a third
// joins and one of the first leaves, then checks that the totals read back
// through a query node equal every acknowledged event, exactly. It also
// reads while one combiner is down (complete: replication 2) and while both
// are (partial, with a warning, or refused), then after they return.
func TestClusterJoinLeave(t *testing.T) {
	c1 := member(t, "c1", nil, cluster.RoleCombiner)
	c2 := member(t, "c2", c1, cluster.RoleCombiner)
	a1 := member(t, "a1", c1, cluster.RoleAggregator)
	a2 := member(t, "a2", c1, cluster.RoleAggregator)
	q := member(t, "q", c1, cluster.RoleQuery)
	waitFor(t, "q to see five members", func() bool { return len(states(t, q)) == 5 })

	type result struct {
		rep loadtest.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := loadtest.Run(context.Background(), loadtest.Options{
			Addrs: []string{a1.GRPCAddr(), a2.GRPCAddr()}, HTTPAddrs: []string{q.HTTPAddr()},
			Events: 40_000, Rate: 8_000, Diurnal: -1, BatchSize: 200, Seed: 5, LateFraction: -1,
		})
		done <- result{rep, err}
	}()
	time.Sleep(time.Second)
	a3 := member(t, "a3", c1, cluster.RoleAggregator)
	waitFor(t, "a3 to join", func() bool { return states(t, q)["a3"] == "alive" })
	time.Sleep(time.Second)
	if err := a1.Close(); err != nil {
		t.Fatalf("a1 leaving: %v", err)
	}
	waitFor(t, "a1 to be seen as left", func() bool { return states(t, q)["a1"] == "left" })
	r := <-done
	if r.err != nil {
		t.Fatalf("load: %v", r.err)
	}
	want := r.rep.ByDatacenter["requests"]
	readBack := func(what string) {
		t.Helper()
		var got map[string]float64
		var count float64
		deadline := time.Now().Add(30 * time.Second)
		for {
			var warnings []string
			var code int
			got, count, warnings, code = totals(t, q, false)
			if code == http.StatusOK && len(warnings) == 0 && maps.Equal(got, want) && count == float64(r.rep.Accepted) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: read back %v with %v events (HTTP %d, warnings %v); acknowledged %v with %d events",
					what, got, count, code, warnings, want, r.rep.Accepted)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	readBack("after the load")
	if a3.agg == nil {
		t.Fatal("a3 runs no aggregator")
	}

	// Once every flush has reached both combiners (what was read back may
	// have come from one), one combiner down leaves every shard whole on
	// the other.
	waitFor(t, "every flush to reach both combiners", func() bool {
		return len(a2.agg.Pending()) == 0 && len(a3.agg.Pending()) == 0
	})
	c2.Close()
	if got, count, warnings, code := totals(t, q, false); code != http.StatusOK || len(warnings) > 0 || !maps.Equal(got, want) || count != float64(r.rep.Accepted) {
		t.Fatalf("with c2 down: %v, %v events, warnings %v, HTTP %d", got, count, warnings, code)
	}
	// Both down: partial with a warning, or refused when asked for
	// complete answers only.
	c1.Close()
	if _, _, _, code := totals(t, q, false); code != http.StatusServiceUnavailable {
		t.Fatalf("with every combiner down and partial_response=false: HTTP %d, want 503", code)
	}
	if _, _, warnings, code := totals(t, q, true); code != http.StatusOK || len(warnings) == 0 {
		t.Fatalf("with every combiner down: HTTP %d, warnings %v; want a partial answer with a warning", code, warnings)
	}
	// c1 comes back on its store: complete again.
	cfg := c1.cfg
	cfg.Cluster.Join = []string{q.GossipAddr()}
	c1, err := Start(cfg, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	readBack("once c1 is back")
}

package node

import (
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/loadtest"
)

// TestReplicasCompare runs two combiners holding every shard twice and an
// aggregator, on real gossip and gRPC. Once the events are past what the
// aggregators take, the combiners compare their shards and find them the
// same. Then c2 loses its data directory and comes back empty under its
// name: it catches up on nothing (no flush waited for it), and the
// comparison finds the shards it lacks. c2 gossips them: answers come
// from c1, and once c1 is down, from c2 with a warning.
func TestReplicasCompare(t *testing.T) {
	config := func(name string, seed *Node, roles ...cluster.Role) Config {
		cfg := memberConfig(t, name, seed, roles...)
		cfg.Aggregator.MaxLateness = model.Duration(2 * time.Second)
		cfg.Cluster.CompareInterval = model.Duration(300 * time.Millisecond)
		return cfg
	}
	c1 := startMember(t, config("c1", nil, cluster.RoleCombiner))
	c2cfg := config("c2", c1, cluster.RoleCombiner)
	c2 := startMember(t, c2cfg)
	a1 := startMember(t, config("a1", c1, cluster.RoleAggregator, cluster.RoleQuery))
	waitFor(t, "a1 to see both combiners", func() bool {
		st := states(t, a1)
		return st["c1"] == "alive" && st["c2"] == "alive"
	})
	rep, err := loadtest.Run(context.Background(), loadtest.Options{
		Addrs: []string{a1.GRPCAddr()}, HTTPAddrs: []string{a1.HTTPAddr()},
		Events: 5_000, BatchSize: 500, Seed: 3, LateFraction: -1, Diurnal: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the events to be read back and every flush to reach both combiners", func() bool {
		_, count, warnings, code := totals(t, a1, false)
		return code == http.StatusOK && len(warnings) == 0 && count == float64(rep.Accepted) && len(a1.agg.Pending()) == 0
	})
	// Once the events are past what the aggregators take, a comparison
	// covers them.
	time.Sleep(5 * time.Second)
	same := metricValue(t, c1.HTTPAddr(), `dimsum_cluster_replica_comparisons_total{outcome="same"}`)
	waitFor(t, "c1 to compare its shards with c2's again", func() bool {
		return metricValue(t, c1.HTTPAddr(), `dimsum_cluster_replica_comparisons_total{outcome="same"}`) > same
	})
	if got := metricValue(t, c1.HTTPAddr(), `dimsum_cluster_replica_divergent_shards{replica="c2"}`); got != 0 {
		t.Fatalf("c1 found %v shards different from c2's before c2 lost anything", got)
	}
	if got := metricValue(t, c1.HTTPAddr(), `dimsum_cluster_replica_comparisons_total{outcome="different"}`); got > 0 {
		t.Fatalf("c1 found %v comparisons different before c2 lost anything", got)
	}

	c2.Close()
	if err := os.RemoveAll(c2cfg.DataDir); err != nil {
		t.Fatal(err)
	}
	c2 = startMember(t, c2cfg)
	waitFor(t, "c1 to find the shards c2 lost", func() bool {
		return metricValue(t, c1.HTTPAddr(), `dimsum_cluster_replica_divergent_shards{replica="c2"}`) > 0
	})
	// c2 finds it lacks them too, and says so: the query node then reads
	// them from c1, and warns when only c2 can answer.
	waitFor(t, "a1 to learn the shards c2 lacks", func() bool {
		for s := range a1.topo.Shards() {
			if a1.topo.Behind("c2", s) {
				return true
			}
		}
		return false
	})
	lackingInStatus := false
	for _, sh := range status(t, a1).Shards {
		for _, r := range sh.Replicas {
			lackingInStatus = lackingInStatus || r.Name == "c2" && r.Lacking
		}
	}
	if !lackingInStatus {
		t.Error("the cluster status shows no shard c2 lacks")
	}
	for range 5 {
		if _, count, warnings, code := totals(t, a1, false); code != http.StatusOK || len(warnings) > 0 || count != float64(rep.Accepted) {
			t.Fatalf("with c2 lacking shards: %v events, warnings %v, HTTP %d; want %d events", count, warnings, code, rep.Accepted)
		}
	}
	// A restart keeps what c2 found: it gossips it from its start, well
	// before its first comparison (30 s after it starts).
	c2.Close()
	waitFor(t, "a1 to see c2 down", func() bool { return states(t, a1)["c2"] == "dead" })
	c2cfg.Cluster.CompareInterval = model.Duration(time.Hour)
	c2 = startMember(t, c2cfg)
	waitFor(t, "a1 to see c2 back", func() bool { return states(t, a1)["c2"] == "alive" })
	if len(a1.topo.view.Load().lacking["c2"]) == 0 {
		t.Fatal("c2, restarted, gossips no shard it lacks")
	}
	c1.Close()
	waitFor(t, "a1 to see c1 down", func() bool { return states(t, a1)["c1"] == "dead" })
	if _, _, _, code := totals(t, a1, false); code != http.StatusServiceUnavailable {
		t.Fatalf("with only c2, which lacks shards, and partial_response=false: HTTP %d, want 503", code)
	}
	if _, _, warnings, code := totals(t, a1, true); code != http.StatusOK || len(warnings) == 0 || !strings.Contains(strings.Join(warnings, " "), "may lack") {
		t.Fatalf("with only c2, which lacks shards: HTTP %d, warnings %v; want a warning that the answer may lack data", code, warnings)
	}
}

package cluster

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/dimsum/dimsum/schema"
)

// TestWeightContract pins Weight: every node of every version must compute
// it alike, so a change here reassigns keys across a running cluster. The
// values were checked against an independent implementation of
// fmix64(FNV-1a-64(name) XOR key).
func TestWeightContract(t *testing.T) {
	for _, c := range []struct {
		node string
		key  uint64
		want uint64
	}{
		{"", 0x0, 0xefd01f60ba992926},
		{"agg-1", 0x0, 0xec8fe48d333371c6},
		{"agg-1", 0x1, 0xaaa9c73ebefc5aac},
		{"combiner-2", 0xdeadbeefcafef00d, 0x62d12f385a3a52ef},
		{"q", 0x8000000000000000, 0x261a1c6551f6dd4},
	} {
		if got := Weight(c.node, c.key); got != c.want {
			t.Errorf("Weight(%q, %#x) = %#x, want %#x", c.node, c.key, got, c.want)
		}
	}
}

func nodeNames(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("node-%d", i+1)
	}
	return names
}

// partitionKeys returns n partition keys of the default schema's shape:
// one per host, across datacenters and clusters.
func partitionKeys(n int) []uint64 {
	keys := make([]uint64, n)
	for i := range keys {
		keys[i] = schema.PartitionKey("requests", []string{
			fmt.Sprint("dc", i%4), fmt.Sprint("c", i/4%50), fmt.Sprint("h", i),
		})
	}
	return keys
}

func TestOwnerEmptyAndSingle(t *testing.T) {
	if got := Owner(42, nil); got != "" {
		t.Errorf("Owner over no nodes = %q, want empty", got)
	}
	if got := Owner(42, []string{"a"}); got != "a" {
		t.Errorf("Owner over one node = %q, want a", got)
	}
	if got := Replicas(7, nil, 3); len(got) != 0 {
		t.Errorf("Replicas over no nodes = %q, want none", got)
	}
	for _, r := range []int{0, -1} {
		if got := Replicas(7, []string{"a", "b"}, r); len(got) != 0 {
			t.Errorf("Replicas with r=%d = %q, want none", r, got)
		}
	}
}

func TestOwnerOrderIndependent(t *testing.T) {
	nodes := nodeNames(5)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, key := range partitionKeys(10_000) {
		want := Owner(key, nodes)
		shuffled := slices.Clone(nodes)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if got := Owner(key, shuffled); got != want {
			t.Fatalf("key %#x: Owner over %q = %s, over %q = %s", key, nodes, want, shuffled, got)
		}
		// A name listed twice changes nothing.
		if got := Owner(key, append(shuffled, shuffled[0])); got != want {
			t.Fatalf("key %#x: Owner with a duplicate name = %s, want %s", key, got, want)
		}
	}
}

// TestOwnerBalance checks that each of n nodes owns 1/n of the keys within
// 3%, for realistic partition keys and for consecutive integers (keys that
// differ in low bits only). The expected deviation is about 0.5%.
func TestOwnerBalance(t *testing.T) {
	const nkeys = 100_000
	seq := make([]uint64, nkeys)
	for i := range seq {
		seq[i] = uint64(i)
	}
	for _, keys := range []struct {
		name string
		keys []uint64
	}{{"partition-keys", partitionKeys(nkeys)}, {"consecutive", seq}} {
		for n := 3; n <= 5; n++ {
			t.Run(fmt.Sprintf("%s/%d-nodes", keys.name, n), func(t *testing.T) {
				nodes := nodeNames(n)
				counts := map[string]int{}
				for _, k := range keys.keys {
					counts[Owner(k, nodes)]++
				}
				want := float64(nkeys) / float64(n)
				for _, node := range nodes {
					if dev := float64(counts[node])/want - 1; dev < -0.03 || dev > 0.03 {
						t.Errorf("%s owns %d keys, want %.0f ± 3%% (off by %+.2f%%)", node, counts[node], want, 100*dev)
					}
				}
			})
		}
	}
}

// TestOwnerMinimalMovement checks that adding a node moves keys only to it,
// about 1/n of them, and that removing one moves only its own keys.
func TestOwnerMinimalMovement(t *testing.T) {
	keys := partitionKeys(100_000)
	for n := 3; n <= 5; n++ {
		before := nodeNames(n)
		after := nodeNames(n + 1)
		added := after[n]
		moved := 0
		for _, k := range keys {
			was, is := Owner(k, before), Owner(k, after)
			if was == is {
				continue
			}
			moved++
			if is != added {
				t.Fatalf("adding %s moved key %#x from %s to %s", added, k, was, is)
			}
		}
		want := float64(len(keys)) / float64(n+1)
		if dev := float64(moved)/want - 1; dev < -0.03 || dev > 0.03 {
			t.Errorf("adding a node to %d moved %d keys, want %.0f ± 3%%", n, moved, want)
		}

		// Removing node-2 moves its keys and nothing else.
		removed := before[1]
		rest := slices.Delete(slices.Clone(before), 1, 2)
		for _, k := range keys {
			was, is := Owner(k, before), Owner(k, rest)
			if was != removed && was != is {
				t.Fatalf("removing %s moved key %#x from %s to %s", removed, k, was, is)
			}
		}
	}
}

func TestReplicas(t *testing.T) {
	nodes := nodeNames(5)
	rng := rand.New(rand.NewPCG(3, 4))
	primaries := map[string]int{}
	const shards = 4096
	for shard := range uint32(shards) {
		got := Replicas(shard, nodes, 3)
		if len(got) != 3 {
			t.Fatalf("shard %d: %d replicas, want 3", shard, len(got))
		}
		if got[0] != Owner(uint64(shard), nodes) {
			t.Fatalf("shard %d: first replica %s, Owner says %s", shard, got[0], Owner(uint64(shard), nodes))
		}
		for i := 1; i < len(got); i++ {
			if slices.Contains(got[:i], got[i]) {
				t.Fatalf("shard %d: replica %s listed twice in %q", shard, got[i], got)
			}
			if Weight(got[i], uint64(shard)) > Weight(got[i-1], uint64(shard)) {
				t.Fatalf("shard %d: replicas %q are not in weight order", shard, got)
			}
		}
		primaries[got[0]]++

		shuffled := slices.Clone(nodes)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if again := Replicas(shard, append(shuffled, shuffled[2]), 3); !slices.Equal(again, got) {
			t.Fatalf("shard %d: replicas %q over %q, %q over shuffled %q with a duplicate", shard, got, nodes, again, shuffled)
		}
		// Asking for more keeps the first ones: a larger replication
		// factor adds replicas without moving the existing ones.
		if more := Replicas(shard, nodes, 4); !slices.Equal(more[:3], got) {
			t.Fatalf("shard %d: Replicas(4) = %q does not start with Replicas(3) = %q", shard, more, got)
		}
		// Losing a node promotes the next one in line and keeps the order
		// of the others.
		lost := got[0]
		rest := slices.DeleteFunc(slices.Clone(nodes), func(s string) bool { return s == lost })
		if after := Replicas(shard, rest, 2); !slices.Equal(after, got[1:3]) {
			t.Fatalf("shard %d: without %s replicas are %q, want %q", shard, lost, after, got[1:3])
		}
	}
	for _, n := range nodes {
		if c := primaries[n]; c < shards/5*85/100 || c > shards/5*115/100 {
			t.Errorf("%s is primary for %d of %d shards, want about %d", n, c, shards, shards/5)
		}
	}
	if got := Replicas(1, []string{"b", "a", "b"}, 5); len(got) != 2 || !slices.Contains(got, "a") || !slices.Contains(got, "b") {
		t.Errorf("Replicas over two distinct names = %q, want both once", got)
	}
}

func BenchmarkOwner(b *testing.B) {
	for _, n := range []int{3, 5, 16} {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			nodes := nodeNames(n)
			keys := partitionKeys(1024)
			b.ReportAllocs()
			var sink string
			i := 0
			for b.Loop() {
				sink = Owner(keys[i&1023], nodes)
				i++
			}
			_ = sink
		})
	}
}

func BenchmarkReplicas(b *testing.B) {
	nodes := nodeNames(5)
	b.ReportAllocs()
	var shard uint32
	for b.Loop() {
		_ = Replicas(shard, nodes, 2)
		shard++
	}
}

// TestOwnerAllocs pins Owner, which an aggregator may call for every event,
// at zero allocations.
func TestOwnerAllocs(t *testing.T) {
	nodes := nodeNames(5)
	keys := partitionKeys(64)
	i := 0
	if n := testing.AllocsPerRun(1000, func() {
		_ = Owner(keys[i%len(keys)], nodes)
		i++
	}); n != 0 {
		t.Errorf("Owner allocates %.1f times a call, want 0", n)
	}
}

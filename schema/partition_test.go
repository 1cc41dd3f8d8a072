package schema

import (
	"fmt"
	"testing"
)

func TestPartitionKeySeparatesValues(t *testing.T) {
	// The terminating zero byte keeps ["ab", "c"] and ["a", "bc"] apart.
	if PartitionKey("f", []string{"ab", "c"}) == PartitionKey("f", []string{"a", "bc"}) {
		t.Fatal("value boundaries do not change the key")
	}
	if PartitionKey("f", []string{"a"}) != PartitionKey("f", []string{"a"}) {
		t.Fatal("the key is not deterministic")
	}
	// Fixed values: the hash is part of the cluster's contract, so a
	// change to it must be deliberate.
	if got := PartitionKey("requests", []string{"dc1", "c1", "h1"}); got != 0x27869d21f6c20bc8 {
		t.Errorf("PartitionKey = %#x", got)
	}
}

func TestShardSpread(t *testing.T) {
	const shards = 16
	counts := make([]int, shards)
	for i := range 16_000 {
		s := Shard("requests", CuboidID(i%16), []string{fmt.Sprint("h", i)}, shards)
		if s >= shards {
			t.Fatalf("shard %d out of range", s)
		}
		counts[s]++
	}
	for s, n := range counts {
		if n < 800 || n > 1200 {
			t.Errorf("shard %d holds %d of 16,000 cells, want about 1,000", s, n)
		}
	}
	if Shard("requests", 3, []string{"a"}, 1) != 0 || Shard("requests", 3, []string{"a"}, 0) != 0 {
		t.Error("one shard (or none) must be shard 0")
	}
	if Shard("requests", 1, []string{"a"}, 1<<20) == Shard("requests", 2, []string{"a"}, 1<<20) {
		t.Error("the cuboid does not change the shard")
	}
}

func TestPartitionLevels(t *testing.T) {
	if got := Default().Families[0].PartitionLevels(); got != 3 {
		t.Fatalf("PartitionLevels = %d, want 3 (datacenter/cluster/host)", got)
	}
}

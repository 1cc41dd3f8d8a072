package schema

// How the cube is split across a cluster. Both hashes are FNV-1a over the
// family name and label values, each followed by a zero byte, so that no two
// different lists of strings hash the same bytes. They are part of the
// cluster's contract: every node must compute them alike.

const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

func fnvString(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime
	}
	h *= fnvPrime // the zero byte that ends s
	return h
}

// PartitionLevels is the number of leading family labels that decide which
// aggregator owns an event: every level of the family's first dimension
// (datacenter/cluster/host in the default schema), so that all of one host's
// events meet in one aggregator.
func (f *Family) PartitionLevels() int { return len(f.Dimensions[0].Levels) }

// PartitionKey hashes an event's family and the values of its first
// PartitionLevels labels. Aggregators own keys by rendezvous hashing.
func PartitionKey(family string, values []string) uint64 {
	h := fnvString(fnvOffset, family)
	for _, v := range values {
		h = fnvString(h, v)
	}
	return h
}

// Shard returns the shard, in [0, shards), that holds a cell of the global
// cube: a hash of its family, cuboid and label values. Every cell lives in
// exactly one shard, so reading each shard once reads every cell once.
func Shard(family string, cuboid CuboidID, values []string, shards int) uint32 {
	if shards <= 1 {
		return 0
	}
	h := fnvString(fnvOffset, family)
	h ^= uint64(cuboid)
	h *= fnvPrime
	for _, v := range values {
		h = fnvString(h, v)
	}
	return uint32(h % uint64(shards))
}

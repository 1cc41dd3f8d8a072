package cluster

import (
	"cmp"
	"slices"
)

// Rendezvous (highest random weight) hashing, after Thaler and Ravishankar,
// "A Name-Based Mapping Scheme for Rendezvous" (1996). Every node of a list
// gets a weight for a key; the key belongs to the node of highest weight.
// Adding a node takes from each other node only the keys the new one wins,
// about 1/n of all; removing one gives away only its own keys. No ring state
// is kept, so two nodes with the same list of names always agree.
//
// The weight is part of the cluster's contract: every node of every version
// must compute it alike. For node name s and key k:
//
//	Weight(s, k) = fmix64(FNV-1a-64(s) XOR k)
//
// where fmix64 is MurmurHash3's 64-bit finalizer. FNV alone mixes its last
// bytes poorly and XOR with a key keeps nearby keys close; the finalizer
// spreads every input bit over the whole weight. Ties (equal weights, which
// in practice only a name listed twice gives) go to the smaller name.

const (
	fnv64Offset = 14695981039346656037
	fnv64Prime  = 1099511628211
)

// Weight returns node's weight for key.
func Weight(node string, key uint64) uint64 {
	h := uint64(fnv64Offset)
	for i := 0; i < len(node); i++ {
		h ^= uint64(node[i])
		h *= fnv64Prime
	}
	return fmix64(h ^ key)
}

// fmix64 is MurmurHash3's 64-bit finalizer.
func fmix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// Owner returns the node of highest weight for key, or "" when nodes is
// empty. It depends on the set of names only, not on their order.
func Owner(key uint64, nodes []string) string {
	var best string
	var bestW uint64
	for i, n := range nodes {
		w := Weight(n, key)
		if i == 0 || w > bestW || (w == bestW && n < best) {
			best, bestW = n, w
		}
	}
	return best
}

// Replicas returns the r distinct nodes of highest weight for shard, the
// highest first: the first is the shard's primary, the rest its replicas in
// the order they take over. It returns fewer when there are fewer distinct
// nodes. Replicas(s, nodes, 1)[0] == Owner(uint64(s), nodes).
func Replicas(shard uint32, nodes []string, r int) []string {
	if r <= 0 {
		return nil
	}
	type weighted struct {
		name string
		w    uint64
	}
	ws := make([]weighted, len(nodes))
	for i, n := range nodes {
		ws[i] = weighted{n, Weight(n, uint64(shard))}
	}
	slices.SortFunc(ws, func(a, b weighted) int {
		if c := cmp.Compare(b.w, a.w); c != 0 {
			return c
		}
		return cmp.Compare(a.name, b.name)
	})
	out := make([]string, 0, min(r, len(ws)))
	for i, w := range ws {
		if len(out) == r {
			break
		}
		if i > 0 && w.name == ws[i-1].name {
			continue
		}
		out = append(out, w.name)
	}
	return out
}

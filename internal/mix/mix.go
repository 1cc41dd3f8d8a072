// Package mix hashes short keys of 32-bit words in a few multiplies, for the
// hash tables of the write path (the aggregator's registry, the store's
// memory of numbered cells), where a general-purpose hash of the key's
// bytes cost more than the lookup it served.
package mix

// Words mixes the words of v into h, two at a time: a multiply and two
// shifts a pair. h carries what else the key holds (its family and cuboid)
// and, for a table that must not be steered by its keys, a random seed.
func Words(h uint64, v []uint32) uint64 {
	h *= 0x9e3779b97f4a7c15
	for j := 0; j < len(v); j += 2 {
		w := uint64(v[j])
		if j+1 < len(v) {
			w |= uint64(v[j+1]) << 32
		}
		h = (h ^ h>>29 ^ w) * 0xbf58476d1ce4e5b9
	}
	return h ^ h>>32
}

// Package schema describes what dimsum counts: metric families, their
// dimensions and hierarchies, the cuboid lattice each family rolls up into,
// and the resolutions the cube is kept at.
//
// A schema is read from YAML (or taken from Default) and validated once; every
// other component works from the resulting *Schema, which is immutable.
//
//	s, err := schema.Parse(yamlBytes)
//	if err != nil { ... }
//	f := s.Family("requests")
//	for _, c := range f.Cuboids() { ... } // every materialized cuboid, finest first
//
// Cuboids. A hierarchy dimension of n levels contributes its n+1 prefixes
// (none, datacenter, datacenter/cluster, ...); a flat dimension contributes
// absent and present. A cuboid picks one prefix per dimension, and the
// family's lattice is the cross product. A cuboid is identified by a CuboidID:
// the mixed-radix number of its per-dimension depths, so the finest cuboid is
// the largest ID and the apex (nothing grouped) is 0. IDs are stable as long as
// the family's dimensions are unchanged.
package schema

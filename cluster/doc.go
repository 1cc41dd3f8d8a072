// Package cluster is dimsum's membership: which nodes are in the cluster,
// what roles they play and where to reach them, and which of them owns a
// key. Nodes find each other and detect failures through memberlist's
// SWIM gossip; each gossips a small Meta (roles, gRPC and HTTP addresses,
// start time, pending hinted handoff, whether it is leaving for good).
//
//	c, err := cluster.Start(cluster.Config{
//		Name:     "agg-1",
//		BindAddr: "0.0.0.0:7946",
//		Join:     []string{"10.0.0.5:7946"},
//		Meta:     cluster.Meta{Roles: []cluster.Role{cluster.RoleAggregator}, GRPCAddr: "10.0.0.7:9090"},
//	})
//	if err != nil { ... }
//	defer c.Shutdown()
//	defer c.Leave(5 * time.Second)
//	changes, cancel := c.Subscribe()
//	defer cancel()
//	for range changes {
//		aggs := c.WithRole(cluster.RoleAggregator, cluster.StateAlive)
//		owner := cluster.Owner(key, cluster.Names(aggs))
//		...
//	}
//
// Members keeps every node it has seen, with its state: alive, dead (it
// stopped answering and may come back under its name) or left (it said
// goodbye); a node that joins learns the dead and left ones from the others
// (state.go). Owner and Replicas are pure functions of a key and a list of
// names (rendezvous hashing, see ring.go), so nodes that agree on the list
// agree on owners without talking to each other.
//
// docs/operations.md describes the protocol's knobs for operators.
package cluster

// Package loadtest drives a dimsum node with a synthetic, log-derived
// workload over gRPC and reports what it sent and what was accepted.
//
// The workload is what access logs of a fleet look like once counted:
// datacenters, clusters and hosts in a hierarchy, transaction names with a
// Zipf popularity, a small share of error statuses, and a few late events.
// Everything derives from the seed, so two runs with the same options send
// the same events (timestamps aside).
//
//	rep, err := loadtest.Run(ctx, loadtest.Options{Addrs: []string{"127.0.0.1:9400"}, Events: 1e6, Seed: 1})
//	fmt.Println(rep.Accepted, rep.Totals["requests"])
package loadtest

// Package node wires dimsum's components into one process: it reads the YAML
// config, opens the store, starts the aggregator, combiner and query roles,
// and serves gRPC and HTTP.
//
//	cfg, err := node.LoadConfig("dimsum.yaml") // or node.Config{} for the defaults
//	n, err := node.Start(cfg, version, logger)
//	defer n.Close() // flushes every open window first
package node

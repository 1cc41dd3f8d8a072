package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/dimsum/dimsum/loadtest"
)

// runLoad pushes a synthetic workload and prints what was accepted.
func runLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	var o loadtest.Options
	fs.StringVar(&o.Addr, "addr", "127.0.0.1:9400", "gRPC `address` of the node")
	fs.IntVar(&o.Events, "events", 1_000_000, "number of events to send")
	fs.Uint64Var(&o.Seed, "seed", 1, "workload seed")
	fs.IntVar(&o.BatchSize, "batch", 5_000, "events per batch")
	fs.IntVar(&o.Concurrency, "concurrency", 4, "batches in flight")
	fs.StringVar(&o.Family, "family", "requests", "counter `family` with dimensions datacenter/cluster/host, transaction, status")
	fs.IntVar(&o.Datacenters, "datacenters", 3, "datacenters in the fleet")
	fs.IntVar(&o.ClustersPerDC, "clusters", 4, "clusters per datacenter")
	fs.IntVar(&o.HostsPerCluster, "hosts", 25, "hosts per cluster")
	fs.IntVar(&o.Transactions, "transactions", 50, "distinct transaction names")
	fs.Float64Var(&o.LateFraction, "late", 0.01, "share of events stamped up to a minute late (negative: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.Progress = os.Stderr
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep, err := loadtest.Run(ctx, o)
	fmt.Print(rep)
	return err
}

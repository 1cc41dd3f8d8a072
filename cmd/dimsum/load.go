package main

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	grpcgzip "google.golang.org/grpc/encoding/gzip"

	"github.com/dimsum/dimsum/loadtest"
	"github.com/dimsum/dimsum/publisher"
)

// runLoad pushes a synthetic workload through the publisher client, prints
// what was acknowledged and, with -verify, fails unless the nodes read back
// exactly that.
func runLoad(args []string) error {
	fs := newFlags("load")
	var o loadtest.Options
	addrs := fs.String("addr", "127.0.0.1:9400", "gRPC `addresses` of the destination's nodes, comma-separated; the publisher fails over among them")
	httpAddrs := fs.String("http", "127.0.0.1:9401", "HTTP `addresses` of the nodes, comma-separated, for /metrics and -verify")
	policy := fs.String("policy", "block", "what to do when the buffer is full: block, drop-head or drop-tail")
	reportFile := fs.String("report", "", "write the figures as JSON to `file`")
	fs.IntVar(&o.Events, "events", 0, "number of events to send (default 1000000; with -series, every step of -backfill, or 30 steps live)")
	fs.Float64Var(&o.Rate, "rate", 0, "open loop: mean `events/s`, shaped by -diurnal (0: closed loop, as fast as acknowledged)")
	fs.Float64Var(&o.Diurnal, "diurnal", 0.5, "open loop: how far the rate swings around -rate over the simulated day (negative: flat)")
	fs.DurationVar(&o.Day, "day", loadtest.DefaultDay, "real `duration` of one simulated day")
	fs.Float64Var(&o.StartHour, "start-hour", 9, "simulated `hour` the run starts at")
	fs.Uint64Var(&o.Seed, "seed", 1, "workload seed")
	fs.IntVar(&o.BatchSize, "batch", 5_000, "events per batch")
	fs.IntVar(&o.Concurrency, "concurrency", 4, "batches in flight")
	fs.IntVar(&o.Buffer, "buffer", 100_000, "publisher ring buffer, in events")
	fs.StringVar(&o.Compression, "compression", publisher.Gzip, "gzip or none")
	gzipLevel := fs.Int("gzip-level", gzip.BestSpeed, "gzip `level`, 1 (fastest) to 9 (smallest)")
	fs.StringVar(&o.Family, "family", "requests", "counter `family` with dimensions datacenter/cluster/host, transaction, status")
	fs.IntVar(&o.Datacenters, "datacenters", 0, "datacenters in the fleet (default 3, or 4 with -series)")
	fs.IntVar(&o.ClustersPerDC, "clusters", 0, "clusters per datacenter (default 4, or 5 with -series)")
	fs.IntVar(&o.HostsPerCluster, "hosts", 25, "hosts per cluster")
	fs.IntVar(&o.Transactions, "transactions", 0, "distinct transaction names (default 50, or 10 with -series)")
	fs.Float64Var(&o.LateFraction, "late", 0.01, "share of events stamped up to -late-bound in the past (negative: none)")
	fs.DurationVar(&o.LateBound, "late-bound", loadtest.DefaultLateBound, "how far in the past a late event may be stamped; keep it below the node's max_lateness")
	fs.IntVar(&o.Series, "series", 0, "send one event a -step for each of this many finest series (hosts x -transactions), as a log-to-metrics pipeline does; live unless -backfill")
	fs.DurationVar(&o.Step, "step", time.Minute, "with -series: the `interval` between a series' events")
	fs.DurationVar(&o.Backfill, "backfill", 0, "with -series: cover this `span` before now, as fast as acknowledged, instead of sending live")
	fs.StringVar(&o.Target, "target", loadtest.TargetDimsum, "what receives the events: dimsum, or victoriametrics (the first -http address; the same samples as cumulative counters, for comparison)")
	fs.BoolVar(&o.Verify, "verify", false, "read the totals back through PromQL and the slice API and fail unless they equal what was acknowledged")
	fs.DurationVar(&o.Window, "window", loadtest.DefaultWindow, "the node's window (finest resolution step), for -verify")
	fs.DurationVar(&o.VerifyTimeout, "verify-timeout", loadtest.DefaultVerifyTimeout, "how long -verify waits for the data to become queryable")
	var cf clientFlags
	cf.register(fs)
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	// The level is a process-wide setting of gRPC's gzip codec; nothing
	// is sending yet.
	if err := grpcgzip.SetLevel(*gzipLevel); err != nil {
		return fmt.Errorf("load: -gzip-level: %w", err)
	}
	var err error
	if o.Policy, err = publisher.ParsePolicy(*policy); err != nil {
		return err
	}
	o.Addrs, o.HTTPAddrs = split(*addrs), split(*httpAddrs)
	if o.DialOptions, o.Credentials, err = cf.grpcOptions(); err != nil {
		return fmt.Errorf("load: %w", err)
	}
	// The load test reads /metrics and the API with the default client:
	// this process does nothing else.
	if http.DefaultClient.Transport, err = cf.httpTransport(); err != nil {
		return fmt.Errorf("load: %w", err)
	}
	o.Progress = os.Stderr
	if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		o.ProgressTerminal = true
	}
	o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep, err := loadtest.Run(ctx, o)
	if errors.Is(err, loadtest.ErrOptions) || errors.Is(err, loadtest.ErrUnreachable) {
		// Nothing was sent: no report.
		return err
	}
	fmt.Print(rep)
	if *reportFile != "" {
		if werr := rep.WriteFile(*reportFile); werr != nil {
			return errors.Join(err, werr)
		}
	}
	return err
}

// split reads a comma-separated list, dropping empty entries.
func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

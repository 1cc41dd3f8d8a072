package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/dimsum/dimsum/internal/node"
)

// runNode runs a node until SIGINT or SIGTERM. cmd is the subcommand: "all"
// runs every role, "aggregator", "combiner" and "query" one each.
func runNode(cmd string, args []string) error {
	fs := newFlags(cmd)
	configFile := fs.String("config", "", "YAML config `file` (default: the embedded defaults)")
	dataDir := fs.String("data", "", "data `directory` (overrides data_dir; default ./data)")
	grpcListen := fs.String("grpc", "", "gRPC listen `address` (overrides grpc_listen; default 127.0.0.1:9400)")
	httpListen := fs.String("http", "", "HTTP listen `address` (overrides http_listen; default 127.0.0.1:9401)")
	name := fs.String("name", "", "node `name`, unique in the cluster (overrides name; default the host name)")
	join := fs.String("join", "", "gossip `addresses` of cluster members to meet, comma-separated (overrides cluster.join)")
	gossip := fs.String("gossip", "", "gossip listen `address` (overrides cluster.gossip_listen; default the gRPC host, port 9402)")
	internal := fs.String("internal", "", "internal gRPC listen `address` of a cluster member, where members send flushes, forwarded batches and reads (overrides cluster.internal_listen; default the gRPC host, port 9403)")
	logLevel := fs.String("log-level", "info", "log `level`: debug, info, warn or error")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("bad -log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	var cfg node.Config
	if *configFile != "" {
		var err error
		if cfg, err = node.LoadConfig(*configFile); err != nil {
			return err
		}
		log.Info("config loaded", "file", *configFile)
	}
	for _, o := range []struct{ flag, field *string }{
		{dataDir, &cfg.DataDir}, {grpcListen, &cfg.GRPCListen}, {httpListen, &cfg.HTTPListen},
		{name, &cfg.Name}, {gossip, &cfg.Cluster.GossipListen}, {internal, &cfg.Cluster.InternalListen},
	} {
		if *o.flag != "" {
			*o.field = *o.flag
		}
	}
	if *join != "" {
		if cfg.Cluster.Join = split(*join); len(cfg.Cluster.Join) == 0 {
			return fmt.Errorf("-join %q names no address", *join)
		}
	}
	if cmd != "all" {
		cfg.Roles = []string{cmd}
	}
	// /api/v1/status/flags reports them, as Prometheus reports its own.
	cfg.Flags = map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { cfg.Flags[f.Name] = f.Value.String() })

	// The runtime's memory limit is the process's, so the binary sets it.
	cfg.EnsureDefaults()
	if cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(cfg.MemoryLimit)
	}

	// Signals are caught before the node serves, so a SIGTERM sent as soon
	// as it answers still stops it cleanly.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	n, err := node.Start(cfg, buildVersion(), log)
	if err != nil {
		return err
	}
	for {
		select {
		case s := <-sig:
			if s == syscall.SIGHUP {
				// Credentials, certificates and gossip keys, read again;
				// what fails to load stays as it was, and is logged.
				n.Reload()
				continue
			}
			log.Info("stopping: flushing open windows", "signal", s.String())
		case err = <-n.Err():
			log.Error("a server stopped", "err", err)
		}
		break
	}
	if cerr := n.Close(); err == nil {
		err = cerr
	}
	return err
}

package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/dimsum/dimsum/internal/node"
)

// runAll runs an all-in-one node until SIGINT or SIGTERM.
func runAll(args []string) error {
	fs := flag.NewFlagSet("all", flag.ContinueOnError)
	configFile := fs.String("config", "", "YAML config `file` (default: the embedded defaults)")
	dataDir := fs.String("data", "", "data `directory` (overrides data_dir; default ./data)")
	grpcListen := fs.String("grpc", "", "gRPC listen `address` (overrides grpc_listen; default 127.0.0.1:9400)")
	httpListen := fs.String("http", "", "HTTP listen `address` (overrides http_listen; default 127.0.0.1:9401)")
	logLevel := fs.String("log-level", "info", "log `level`: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
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
	if *dataDir != "" {
		cfg.DataDir = *dataDir
	}
	if *grpcListen != "" {
		cfg.GRPCListen = *grpcListen
	}
	if *httpListen != "" {
		cfg.HTTPListen = *httpListen
	}

	// Signals are caught before the node serves, so a SIGTERM sent as soon
	// as it answers still stops it cleanly.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	n, err := node.Start(cfg, buildVersion(), log)
	if err != nil {
		return err
	}
	select {
	case s := <-sig:
		log.Info("stopping: flushing open windows", "signal", s.String())
	case err = <-n.Err():
		log.Error("a server stopped", "err", err)
	}
	if cerr := n.Close(); err == nil {
		err = cerr
	}
	return err
}

package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/query"
	"github.com/dimsum/dimsum/tsdb"
)

// Node is an all-in-one dimsum process: aggregator, combiner and query roles
// over one store, serving gRPC and HTTP.
type Node struct {
	log    *slog.Logger
	db     *tsdb.DB
	agg    *aggregator.Aggregator
	conn   *grpc.ClientConn
	grpc   *grpc.Server
	http   *http.Server
	grpcLn net.Listener
	httpLn net.Listener
	errc   chan error
}

// Start opens the store, starts every role and begins serving. version is
// what /api/v1/status/buildinfo reports.
func Start(cfg Config, version string, log *slog.Logger) (n *Node, err error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s, err := cfg.BuildSchema()
	if err != nil {
		return nil, err
	}
	n = &Node{log: log, errc: make(chan error, 2)}
	// Every failure below returns a nil node, so the cleanup keeps its own
	// reference to what was built.
	built := n
	defer func() {
		if err != nil {
			built.Close()
		}
	}()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	n.db, err = tsdb.Open(tsdb.Options{
		Dir:        filepath.Join(cfg.DataDir, "cube"),
		Schema:     s,
		Logger:     log.With("component", "tsdb"),
		Registerer: reg,
	})
	if err != nil {
		return nil, fmt.Errorf("node: cannot open the store in %s: %w", cfg.DataDir, err)
	}
	comb, err := combiner.New(combiner.Options{Store: n.db, Logger: log.With("component", "combiner"), Registerer: reg})
	if err != nil {
		return nil, err
	}

	if n.grpcLn, err = net.Listen("tcp", cfg.GRPCListen); err != nil {
		return nil, fmt.Errorf("node: cannot listen for gRPC: %w", err)
	}
	if n.httpLn, err = net.Listen("tcp", cfg.HTTPListen); err != nil {
		return nil, fmt.Errorf("node: cannot listen for HTTP: %w", err)
	}
	n.grpc = grpc.NewServer(grpc.MaxRecvMsgSize(cfg.MaxRecvBytes))
	comb.Register(n.grpc)

	// The aggregator flushes to the combiner over gRPC even in one process,
	// so the path is the one a cluster takes.
	n.conn, err = grpc.NewClient("passthrough:///"+n.grpcLn.Addr().String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(cfg.MaxRecvBytes)))
	if err != nil {
		return nil, fmt.Errorf("node: cannot dial the combiner: %w", err)
	}
	ac := cfg.Aggregator
	walDir := filepath.Join(cfg.DataDir, "wal")
	if ac.WALDisabled {
		walDir = ""
	}
	n.agg, err = aggregator.New(aggregator.Options{
		Schema:            s,
		Sink:              combiner.NewClient(cfg.Name, n.conn),
		Name:              cfg.Name,
		Grace:             time.Duration(ac.Grace),
		MaxLateness:       time.Duration(ac.MaxLateness),
		MaxFutureSkew:     time.Duration(ac.MaxFutureSkew),
		MaxBatchEvents:    ac.MaxBatchEvents,
		MaxCellsPerWindow: ac.MaxCellsPerWindow,
		FlushInterval:     time.Duration(ac.FlushInterval),
		WALDir:            walDir,
		WALMaxBytes:       ac.WALMaxBytes,
		Logger:            log.With("component", "aggregator"),
		Registerer:        reg,
	})
	if err != nil {
		return nil, err
	}
	n.agg.Register(n.grpc)

	api, err := query.NewAPI(query.Options{
		Schema:        s,
		Reader:        n.db,
		Timeout:       time.Duration(cfg.Query.Timeout),
		MaxSamples:    cfg.Query.MaxSamples,
		MaxSeries:     cfg.Query.MaxSeries,
		MaxGroups:     cfg.Query.MaxGroups,
		LookbackDelta: time.Duration(cfg.Query.LookbackDelta),
		Version:       version,
		Logger:        log.With("component", "query"),
		Registerer:    reg,
	})
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	api.Register(mux)
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/-/healthy", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "dimsum is healthy.") })
	n.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	go func() { n.errc <- n.grpc.Serve(n.grpcLn) }()
	go func() {
		if err := n.http.Serve(n.httpLn); !errors.Is(err, http.ErrServerClosed) {
			n.errc <- err
		}
	}()

	families := make([]string, len(s.Families))
	for i, f := range s.Families {
		families[i] = fmt.Sprintf("%s%v", f.Name, f.Labels)
	}
	resolutions := make([]string, len(s.Resolutions))
	for i, r := range s.Resolutions {
		resolutions[i] = r.String()
	}
	log.Info("schema loaded", "families", families, "resolutions", resolutions, "window", s.Window())
	log.Info("dimsum is serving", "grpc", n.GRPCAddr(), "http", n.HTTPAddr(), "data", cfg.DataDir,
		"roles", "aggregator,combiner,query")
	return n, nil
}

// GRPCAddr is the address the gRPC server listens on.
func (n *Node) GRPCAddr() string { return n.grpcLn.Addr().String() }

// HTTPAddr is the address the HTTP server listens on.
func (n *Node) HTTPAddr() string { return n.httpLn.Addr().String() }

// Err delivers the first error that stopped a server.
func (n *Node) Err() <-chan error { return n.errc }

// Close flushes every open window, then stops serving and closes the store.
func (n *Node) Close() error {
	var errs []error
	if n.agg != nil {
		errs = append(errs, n.agg.Close())
	}
	if n.conn != nil {
		errs = append(errs, n.conn.Close())
	}
	if n.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		errs = append(errs, n.http.Shutdown(ctx))
		cancel()
	}
	if n.grpc != nil {
		n.grpc.GracefulStop()
	}
	for _, ln := range []net.Listener{n.grpcLn, n.httpLn} {
		if ln != nil {
			ln.Close()
		}
	}
	if n.db != nil {
		errs = append(errs, n.db.Close())
	}
	n.log.Info("dimsum stopped")
	return errors.Join(errs...)
}

package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/aggregator/otlp"
	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/internal/disk"
	"github.com/dimsum/dimsum/query"
	"github.com/dimsum/dimsum/query/fanout"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire"
)

// Node is a dimsum process: some or all of the aggregator, combiner and
// query roles, alone or as a member of a cluster, serving gRPC and HTTP.
type Node struct {
	cfg  Config
	log  *slog.Logger
	db   *tsdb.DB             // the combiner role's store
	comb *combiner.Combiner   // the combiner role
	read *combiner.ReadServer // the combiner role's reads, in a cluster
	// lacking are the shards the combiner found it lacks, as kept from its
	// last run (loadLacking).
	lacking []uint32
	agg     *aggregator.Aggregator // the aggregator role
	otlp    *otlp.Receiver         // the aggregator role's OTLP ingest
	member  *cluster.Cluster       // in a cluster
	topo    *topology              // in a cluster
	// grpc serves the public calls (pushes), internal those of the
	// cluster (flushes, forwarded batches, reads): on a port of its own in
	// a cluster, in this process alone.
	grpc       *grpc.Server
	internal   *grpc.Server
	http       *http.Server
	grpcLn     net.Listener
	internalLn net.Listener
	httpLn     net.Listener
	// trust holds what proves callers and this node: certificates,
	// credentials, gossip keys, read again by Reload.
	trust *trust
	// health is what stops the node taking work when its store cannot go
	// on.
	health  health
	metrics *serverMetrics
	// dirLock holds the data directory for this process.
	dirLock *os.File
	stop    chan struct{} // ends the background loops
	loops   sync.WaitGroup
	errc    chan error

	closeOnce sync.Once
	closeErr  error
}

// Start opens what the node's roles need, joins the cluster if the config
// names one, and begins serving. version is what
// /api/v1/status/buildinfo reports.
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
	n = &Node{cfg: cfg, log: log, stop: make(chan struct{}), errc: make(chan error, 3)}
	// Every failure below returns a nil node, so the cleanup keeps its own
	// reference to what was built.
	built := n
	defer func() {
		if err != nil {
			built.Close()
		}
	}()

	if n.dirLock, err = lockDataDir(cfg.DataDir); err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	n.metrics = newServerMetrics(reg, version)
	if n.trust, err = loadTrust(cfg, log, reg); err != nil {
		return nil, err
	}
	if err := n.listen(); err != nil {
		return nil, err
	}

	if cfg.HasRole(cluster.RoleCombiner) {
		cube := filepath.Join(cfg.DataDir, "cube")
		n.db, err = tsdb.Open(tsdb.Options{
			Dir:          cube,
			Schema:       s,
			Logger:       slog.New(tsdb.FailureHandler(log.With("component", "tsdb").Handler(), n.health.storeFailed)),
			Registerer:   reg,
			HeadMaxBytes: cfg.Store.HeadMaxBytes,
			HeadHold:     time.Duration(cfg.Store.HeadHold),
		})
		if err != nil {
			return nil, fmt.Errorf("node: cannot open the store in %s: %w", cfg.DataDir, err)
		}
		n.health.floor = &disk.Floor{Dir: cube, Min: uint64(cfg.MinFreeBytes), Logger: log.With("component", "combiner"), What: "flushes"}
		n.comb, err = combiner.New(combiner.Options{Store: n.db, Schema: s, Ready: n.health.storeReady, Logger: log.With("component", "combiner"), Registerer: reg})
		if err != nil {
			return nil, err
		}
		if n.internal != nil {
			n.comb.Register(n.internal)
			n.read = combiner.NewReadServer(s, n.db)
			n.read.Register(n.internal)
		}
	}
	if cfg.Clustered() {
		if err := n.join(reg); err != nil {
			return nil, err
		}
		if n.read != nil {
			// No flush changes a step once its events are older than the
			// aggregators take, and their window is flushed.
			ao := aggregator.Options{Grace: time.Duration(cfg.Aggregator.Grace), MaxLateness: time.Duration(cfg.Aggregator.MaxLateness)}
			ao.EnsureDefaults()
			settle := ao.MaxLateness + ao.Grace + 2*s.Resolutions[0].Step
			c := newComparer(n.topo, n.read, s, cfg.Name, settle, time.Duration(cfg.Cluster.CompareInterval), n.lackingFile(), n.lacking, reg, n.log.With("component", "cluster"))
			n.loops.Go(func() { c.run(n.stop) })
		}
	}
	if cfg.HasRole(cluster.RoleAggregator) {
		if err := n.startAggregator(s, reg); err != nil {
			return nil, err
		}
	}

	mux := http.NewServeMux()
	if cfg.HasRole(cluster.RoleQuery) {
		if err := n.startQuery(s, reg, version, mux); err != nil {
			return nil, err
		}
	}
	if n.otlp != nil {
		mux.Handle("POST "+otlp.Path, n.otlp)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/-/healthy", n.serveHealth)
	mux.HandleFunc("POST /-/reload", n.serveReload)
	mux.HandleFunc("GET /api/v1/status/cluster", n.serveClusterStatus)
	if cfg.DebugPprof {
		// net/http/pprof's handlers, on this mux rather than the default
		// one; the admin right guards them.
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	n.http = &http.Server{Handler: n.metrics.instrumentHTTP(mux, n.trust.guardHTTP(mux)), ReadHeaderTimeout: 10 * time.Second, TLSConfig: n.trust.publicTLS(),
		// Refused TLS handshakes and the like, which net/http logs.
		ErrorLog: slog.NewLogLogger(log.With("component", "http").Handler(), slog.LevelWarn)}

	go func() { n.errc <- n.grpc.Serve(n.grpcLn) }()
	if n.internal != nil {
		go func() { n.errc <- n.internal.Serve(n.internalLn) }()
	}
	go func() {
		serve := n.http.Serve
		if n.http.TLSConfig != nil {
			serve = func(ln net.Listener) error { return n.http.ServeTLS(ln, "", "") }
		}
		if err := serve(n.httpLn); !errors.Is(err, http.ErrServerClosed) {
			n.errc <- err
		}
	}()
	if cfg.ReloadInterval > 0 {
		n.loops.Go(func() { n.reloadLoop(time.Duration(cfg.ReloadInterval)) })
	}

	families := make([]string, len(s.Families))
	for i, f := range s.Families {
		families[i] = fmt.Sprintf("%s%v", f.Name, f.Labels)
	}
	resolutions := make([]string, len(s.Resolutions))
	for i, r := range s.Resolutions {
		resolutions[i] = r.String()
	}
	log.Info("schema loaded", "families", families, "resolutions", resolutions, "window", s.Window())
	log.Info("dimsum is serving", "grpc", n.GRPCAddr(), "http", n.HTTPAddr(), "internal", n.InternalAddr(), "data", cfg.DataDir,
		"roles", cfg.Roles, "cluster", cfg.Clustered(), "tls", cfg.TLS.enabled(), "auth", cfg.Auth.CredentialsFile != "")
	return n, nil
}

// listen opens the listeners and builds the gRPC servers on them: the
// public one with the node's TLS and credentials, the internal one on its
// own port with the cluster's mutual TLS, or alone on a listener in this
// process that no other can reach.
func (n *Node) listen() error {
	cfg := n.cfg
	var err error
	if n.grpcLn, err = net.Listen("tcp", cfg.GRPCListen); err != nil {
		return fmt.Errorf("node: cannot listen for gRPC: %w", err)
	}
	if n.httpLn, err = net.Listen("tcp", cfg.HTTPListen); err != nil {
		return fmt.Errorf("node: cannot listen for HTTP: %w", err)
	}
	// OTLP's codec answers an export that does not decode with
	// InvalidArgument; it is gRPC's own for every other call.
	n.grpc = grpc.NewServer(append(append(n.trust.publicServerOptions(), grpc.MaxRecvMsgSize(cfg.MaxBatchBytes), otlp.ServerOption()), n.metrics.grpcOptions("public")...)...)
	// Alone, a node has no internal listener: its aggregator flushes to
	// its combiner in process and its queries read its store.
	if cfg.Clustered() {
		if n.internalLn, err = net.Listen("tcp", cfg.Cluster.InternalListen); err != nil {
			return fmt.Errorf("node: cannot listen for the cluster's internal gRPC: %w", err)
		}
		n.internal = grpc.NewServer(append(n.metrics.grpcOptions("internal"), n.trust.internalServerOption(), grpc.MaxRecvMsgSize(cfg.MaxRecvBytes), grpc.ForceServerCodecV2(wire.ServerCodec()))...)
	}
	return nil
}

// dialInternal returns the options that reach another member's internal
// listener.
func (n *Node) dialInternal() []grpc.DialOption {
	return []grpc.DialOption{n.trust.internalDialOption(),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(n.cfg.MaxRecvBytes), grpc.MaxCallRecvMsgSize(n.cfg.MaxRecvBytes))}
}

// join starts memberlist and the topology over it.
func (n *Node) join(reg prometheus.Registerer) error {
	cfg := n.cfg
	var meta cluster.Meta
	for _, r := range cfg.Roles {
		meta.Roles = append(meta.Roles, cluster.Role(r)) // Validate has checked each
	}
	var err error
	// Members reach each other's internal listener; publishers are
	// given the public one.
	if meta.GRPCAddr, err = reachable(n.InternalAddr(), cfg.Cluster.Advertise); err != nil {
		return err
	}
	if meta.HTTPAddr, err = reachable(n.HTTPAddr(), cfg.Cluster.Advertise); err != nil {
		return err
	}
	meta.Started = time.Now()
	if n.read != nil {
		// What the combiner found it lacks before a restart is gossiped
		// from the start, not once it has compared itself again.
		if n.lacking, err = loadLacking(n.lackingFile(), cfg.Cluster.Shards); err != nil {
			n.log.Warn("cannot read the shards this combiner found it lacks: it is read as whole until it compares itself again", "err", err)
		}
		meta.Lacking = n.lacking
	}
	timing := cluster.LANTiming()
	if cfg.Cluster.Timing == "fast" {
		timing = cluster.FastTiming()
	}
	n.member, err = cluster.Start(cluster.Config{
		Name:          cfg.Name,
		BindAddr:      cfg.Cluster.GossipListen,
		AdvertiseAddr: cfg.Cluster.Advertise,
		Join:          cfg.Cluster.Join,
		Meta:          meta,
		Timing:        timing,
		SecretKeys:    n.trust.gossipKeys,
		Logger:        n.log.With("component", "cluster"),
	})
	if err != nil {
		return fmt.Errorf("node: cannot join the cluster: %w", err)
	}
	if n.trust.gossipKeys != nil {
		n.trust.setKeys = n.member.SetKeys
	}
	n.topo = newTopology(cfg.Name, n.member, cfg.Cluster, n.dialInternal(), reg)
	return nil
}

// lackingFile is the file that keeps the shards the combiner lacks.
func (n *Node) lackingFile() string { return filepath.Join(n.cfg.DataDir, lackingFile) }

// reachable is the address other members reach a listener at: the listen
// address, or its port on the advertised host when it listens on every
// interface.
func reachable(listen, advertise string) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("%w: listen address %q: %v", ErrConfig, listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		return listen, nil
	}
	ahost, _, err := net.SplitHostPort(advertise)
	if err != nil || ahost == "" {
		return "", fmt.Errorf("%w: %s listens on every interface, so other members need cluster.advertise to know which address to use", ErrConfig, listen)
	}
	return net.JoinHostPort(ahost, port), nil
}

func (n *Node) startAggregator(s *schema.Schema, reg prometheus.Registerer) error {
	cfg := n.cfg
	// The aggregator hands the flushes for this node's own combiner to it
	// in process, and sends the others over gRPC. A node alone runs every
	// role (Config.Validate).
	var local *combiner.Local
	if n.comb != nil {
		local = n.comb.Local(cfg.Name)
	}
	var sink aggregator.Sink = local
	if n.topo != nil {
		sink = flushSink{t: n.topo, s: s, self: cfg.Name, local: local}
	}
	ac := cfg.Aggregator
	walDir := filepath.Join(cfg.DataDir, "wal")
	if ac.WALDisabled {
		walDir = ""
	}
	var peers aggregator.Peers
	if n.topo != nil {
		peers = aggregator.PeerClients(n.topo.Peer)
	}
	var err error
	n.agg, err = aggregator.New(aggregator.Options{
		Schema:             s,
		Sink:               sink,
		Peers:              peers,
		Name:               cfg.Name,
		Grace:              time.Duration(ac.Grace),
		MaxLateness:        time.Duration(ac.MaxLateness),
		MaxFutureSkew:      time.Duration(ac.MaxFutureSkew),
		MaxBatchEvents:     ac.MaxBatchEvents,
		MaxCellsPerWindow:  ac.MaxCellsPerWindow,
		MaxLabelNameBytes:  ac.MaxLabelNameBytes,
		MaxLabelValueBytes: ac.MaxLabelValueBytes,
		FlushInterval:      time.Duration(ac.FlushInterval),
		WALDir:             walDir,
		WALMaxBytes:        ac.WALMaxBytes,
		WALSegmentBytes:    ac.WALSegmentBytes,
		MaxPendingBytes:    ac.MaxPendingBytes,
		MinFreeBytes:       cfg.MinFreeBytes,
		Ready:              n.health.ready,
		Logger:             n.log.With("component", "aggregator"),
		Registerer:         reg,
	})
	if err != nil {
		return err
	}
	n.health.log = n.agg.LogErr
	if n.topo == nil {
		n.agg.Register(n.grpc)
		return n.startOTLP(s, n.agg, reg)
	}
	router, err := aggregator.NewRouter(aggregator.RouterOptions{
		Local: n.agg, Self: cfg.Name, Owner: n.topo.Owner,
	})
	if err != nil {
		return err
	}
	router.Register(n.grpc)
	router.RegisterInternal(n.internal)
	if err := n.startOTLP(s, router, reg); err != nil {
		return err
	}
	retry := n.agg.RetryNow
	n.topo.returned.Store(&retry)
	n.loops.Go(func() { gossipHandoff(n.member, n.topo, n.agg, router, n.stop, n.log.With("component", "cluster")) })
	return nil
}

// startOTLP serves OTLP metrics into push, the aggregator alone or the
// router in a cluster, on the public gRPC listener; ServeHTTP's mux takes
// OTLP/HTTP.
func (n *Node) startOTLP(s *schema.Schema, push otlp.Pusher, reg prometheus.Registerer) error {
	var err error
	n.otlp, err = otlp.New(otlp.Options{Schema: s, Push: push, MaxBodyBytes: n.cfg.MaxBatchBytes,
		Logger: n.log.With("component", "otlp"), Registerer: reg})
	if err != nil {
		return err
	}
	n.otlp.Register(n.grpc)
	return nil
}

func (n *Node) startQuery(s *schema.Schema, reg prometheus.Registerer, version string, mux *http.ServeMux) error {
	qc := n.cfg.Query
	opts := query.Options{
		Schema:          s,
		Reader:          n.db,
		Timeout:         time.Duration(qc.Timeout),
		MaxSamples:      qc.MaxSamples,
		MaxSeries:       qc.MaxSeries,
		MaxGroups:       qc.MaxGroups,
		MaxQueryLength:  qc.MaxQueryLength,
		MaxQueryDepth:   qc.MaxQueryDepth,
		LookbackDelta:   time.Duration(qc.LookbackDelta),
		PartialResponse: qc.PartialResponse,
		Version:         version,
		Flags:           n.cfg.Flags,
		Logger:          n.log.With("component", "query"),
		Registerer:      reg,
	}
	if n.topo != nil {
		// In a cluster the query role reads every shard from the combiners,
		// its own store included, so every answer is read the same way.
		fo, err := fanout.New(fanout.Options{Schema: s, Topology: n.topo, Logger: opts.Logger, Registerer: reg})
		if err != nil {
			return err
		}
		opts.Reader, opts.Source = nil, fo
	}
	api, err := query.NewAPI(opts)
	if err != nil {
		return err
	}
	api.Register(mux)
	return nil
}

// GRPCAddr is the address the gRPC server listens on.
func (n *Node) GRPCAddr() string { return n.grpcLn.Addr().String() }

// HTTPAddr is the address the HTTP server listens on.
func (n *Node) HTTPAddr() string { return n.httpLn.Addr().String() }

// InternalAddr is the address of the internal gRPC server in a cluster;
// alone, "" (it has none).
func (n *Node) InternalAddr() string {
	if n.internalLn == nil {
		return ""
	}
	return n.internalLn.Addr().String()
}

// announceLeave tells the others that this aggregator is leaving, so that
// they route no more events to it, and waits (at most 10s) until none of
// them holds batches for it: those arrive before it stops taking them. A
// batch shows in the others' gossip once it has waited behindAfter, so the
// wait lasts until that long and a gossip round have passed with none.
func (n *Node) announceLeave() {
	if err := n.member.UpdateMeta(func(m *cluster.Meta) { m.Leaving = true }); err != nil {
		n.log.Warn("cannot announce the leave", "err", err)
		return
	}
	deadline := time.Now().Add(10 * time.Second)
	quietFor := time.Duration(0)
	for quietFor <= behindAfter+handoffGossipInterval && time.Now().Before(deadline) {
		time.Sleep(handoffGossipInterval)
		quietFor += handoffGossipInterval
		if n.topo.view.Load().behind[n.cfg.Name] {
			quietFor = 0
		}
	}
	if quietFor <= behindAfter+handoffGossipInterval {
		n.log.Warn("leaving while other aggregators still hold batches for this node; they wait for a node of this name to return")
	}
}

// GossipAddr is the address the node gossips at; empty outside a cluster.
func (n *Node) GossipAddr() string {
	if n.member == nil {
		return ""
	}
	return n.member.Local().Addr
}

// Err delivers the first error that stopped a server.
func (n *Node) Err() <-chan error { return n.errc }

// grpcStopTimeout bounds how long Close waits for calls in flight: a call
// stuck in a store that failed (Pebble parks the goroutine of a fatal error)
// would otherwise hold the stop forever.
const grpcStopTimeout = 10 * time.Second

// stopGRPC stops s gracefully, and at once when calls are still running
// after timeout.
func stopGRPC(s *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		s.Stop()
		<-done
	}
}

// Close flushes every open window, then stops serving, leaves the cluster
// and closes the store. A node with the combiner role does not announce a
// leave: the others list it as dead, so its shards wait for it to return
// rather than move. Calling Close again returns the first call's error.
func (n *Node) Close() error {
	n.closeOnce.Do(func() { n.closeErr = n.close() })
	return n.closeErr
}

func (n *Node) close() error {
	var errs []error
	if n.member != nil && n.agg != nil && !n.cfg.HasRole(cluster.RoleCombiner) {
		n.announceLeave()
	}
	if n.agg != nil {
		errs = append(errs, n.agg.Close())
	}
	close(n.stop)
	n.loops.Wait()
	if n.member != nil && !n.cfg.HasRole(cluster.RoleCombiner) {
		if err := n.member.Leave(5 * time.Second); err != nil {
			n.log.Warn("leave not confirmed; the others will find this node dead", "err", err)
		}
	}
	// The servers stop side by side: HTTP requests still running must not
	// keep the gRPC ports open, where pushes would find only a closed
	// aggregator instead of a refused connection that sends them elsewhere.
	var stopping sync.WaitGroup
	var httpErr error
	if n.http != nil {
		stopping.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			httpErr = n.http.Shutdown(ctx)
			cancel()
		})
	}
	for _, s := range []*grpc.Server{n.grpc, n.internal} {
		if s != nil {
			stopping.Go(func() { stopGRPC(s, grpcStopTimeout) })
		}
	}
	stopping.Wait()
	errs = append(errs, httpErr)
	for _, ln := range []net.Listener{n.grpcLn, n.internalLn, n.httpLn} {
		if ln != nil {
			ln.Close()
		}
	}
	if n.topo != nil {
		n.topo.close()
	}
	if n.member != nil {
		errs = append(errs, n.member.Shutdown())
	}
	if err := n.health.failed(); n.db != nil && err == nil {
		errs = append(errs, n.db.Close())
	} else if err != nil {
		// A store that failed may never finish closing: what it
		// committed is in its log, read again at the next start.
		n.log.Error("the store failed; not closing it", "err", err)
		errs = append(errs, err)
	}
	if n.dirLock != nil {
		errs = append(errs, n.dirLock.Close())
	}
	n.log.Info("dimsum stopped")
	return errors.Join(errs...)
}

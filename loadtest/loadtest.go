package loadtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/dimsum/dimsum/publisher"
)

// Defaults of the options that flags show.
const (
	DefaultDay           = 10 * time.Minute
	DefaultLateBound     = time.Minute
	DefaultWindow        = 10 * time.Second
	DefaultVerifyTimeout = 2 * time.Minute
)

// Options configure a run. Zero fields take their defaults.
type Options struct {
	// Addrs are the gRPC addresses of the destination's nodes; the
	// publisher fails over among them. The default is 127.0.0.1:9400.
	Addrs []string
	// HTTPAddrs are the HTTP addresses of the nodes whose /metrics the
	// report scrapes and whose API Verify reads; each node's store is
	// summed. The default is 127.0.0.1:9401. Scraping is best effort
	// unless Verify is set.
	HTTPAddrs []string
	// Events is how many events to send. The default is 1,000,000.
	Events int
	// Rate is the mean events per second of an open-loop run, shaped by
	// Diurnal; 0, the default, runs closed-loop: as fast as the node
	// acknowledges.
	Rate float64
	// Diurnal is how far the open-loop rate swings around Rate over the
	// simulated day (0.5: from half to one and a half times Rate). The
	// default is 0.5; a negative value keeps the rate flat.
	Diurnal float64
	// Day is how long one simulated day lasts, and StartHour the simulated
	// hour the run begins at. The defaults are 10m and 9 (the rate then is
	// Rate, rising toward its peak at 15:00).
	Day       time.Duration
	StartHour float64
	// Seed makes the workload reproducible. The default is 1.
	Seed uint64
	// BatchSize is the number of events per Push. The default is 5,000.
	BatchSize int
	// Concurrency is the number of batches in flight. The default is 4.
	Concurrency int
	// Buffer is the publisher's ring buffer, in events, and Policy what it
	// does when the buffer is full. The defaults are 100,000 and Block.
	Buffer int
	Policy publisher.Policy
	// Compression is publisher.Gzip (the default) or publisher.None.
	Compression string
	// DialOptions and Credentials are the publisher's (TLS, a bearer
	// token): see publisher.Options. The defaults are plain text and no
	// credential.
	DialOptions []grpc.DialOption
	Credentials credentials.PerRPCCredentials
	// Logger receives the publisher's logs: retries, failovers, batches
	// lost and why. nil discards them.
	Logger *slog.Logger
	// Family is the counter family the events belong to; it must have the
	// dimensions datacenter/cluster/host, transaction and status, as the
	// embedded default schema's requests family does. The default is
	// "requests".
	Family string
	// Datacenters, ClustersPerDC, HostsPerCluster and Transactions shape
	// the fleet. The defaults are 3, 4, 25 and 50: 300 hosts; with Series,
	// 4, 5 and 10, and the hosts follow from Series.
	Datacenters, ClustersPerDC, HostsPerCluster, Transactions int
	// Series, when set, sends what a log-to-metrics pipeline does: one
	// event a Step for each of Series finest series (Series/Transactions
	// hosts spread over the clusters, each with every transaction and
	// one status), its value the count of the step, a Poisson number. With
	// Backfill the events cover the Backfill before the run's start and go
	// out as fast as they are acknowledged; without it the run is live,
	// each step's events paced over the step and stamped with the time they
	// are sent. Events must then be a whole number of steps (a multiple of
	// Series); its default is every step of Backfill, or 30 steps live.
	// Rate, Diurnal and LateFraction do not apply. Step defaults to 1m.
	Series   int
	Step     time.Duration
	Backfill time.Duration
	// Target is what receives the events: TargetDimsum (the default), the
	// nodes of Addrs, or TargetVictoriaMetrics, a VictoriaMetrics server at
	// HTTPAddrs[0] that imports the same events of a Series run as
	// cumulative counters, so that both stores are measured on the same
	// samples.
	Target string
	// LateFraction is the share of events stamped up to LateBound in the
	// past, so some arrive after their window closed. The default is 0.01;
	// a negative value sends none. LateBound must stay below the node's
	// max_lateness (1h by default); the default is 1m.
	LateFraction float64
	LateBound    time.Duration
	// CloseTimeout bounds sending what is buffered at the end. The default
	// is 1m.
	CloseTimeout time.Duration
	// Verify reads the totals back through each node's PromQL API once the
	// data is queryable, and fails the run unless they equal what was
	// acknowledged. Window must then be the node's window (its finest
	// resolution's step) or a multiple of it; the default is 10s.
	// VerifyTimeout bounds the wait; the default is 2m.
	Verify        bool
	Window        time.Duration
	VerifyTimeout time.Duration
	// Progress receives a progress line every ProgressInterval (default
	// 1s): the share of the events acknowledged, the rate, the time left
	// at that rate, and what -verify waits for. nil prints nothing.
	Progress         io.Writer
	ProgressInterval time.Duration
	// ProgressTerminal says Progress is a terminal: each line replaces the
	// last one in place, rather than adding a line, as for a log or a pipe.
	ProgressTerminal bool
	// ConnectTimeout bounds the check, before anything is sent, that the
	// gRPC addresses accept connections: a run fails when none does,
	// naming each address and why. The default is 3s.
	ConnectTimeout time.Duration
	// Now is the clock that stamps events. The default is time.Now.
	Now func() time.Time
}

func (o *Options) ensureDefaults() {
	if len(o.Addrs) == 0 {
		o.Addrs = []string{"127.0.0.1:9400"}
	}
	if len(o.HTTPAddrs) == 0 {
		o.HTTPAddrs = []string{"127.0.0.1:9401"}
	}
	if o.Series > 0 {
		o.seriesDefaults()
	}
	if o.Events == 0 {
		o.Events = 1_000_000
	}
	if o.Target == "" {
		o.Target = TargetDimsum
	}
	if o.Diurnal == 0 {
		o.Diurnal = 0.5
	}
	if o.Day == 0 {
		o.Day = DefaultDay
	}
	if o.StartHour == 0 {
		o.StartHour = 9
	}
	if o.Seed == 0 {
		o.Seed = 1
	}
	if o.BatchSize == 0 {
		o.BatchSize = 5_000
	}
	if o.Concurrency == 0 {
		o.Concurrency = 4
	}
	if o.Buffer == 0 {
		o.Buffer = max(100_000, 2*o.BatchSize)
	}
	if o.Family == "" {
		o.Family = "requests"
	}
	if o.Datacenters == 0 {
		o.Datacenters = 3
	}
	if o.ClustersPerDC == 0 {
		o.ClustersPerDC = 4
	}
	if o.HostsPerCluster == 0 {
		o.HostsPerCluster = 25
	}
	if o.Transactions == 0 {
		o.Transactions = 50
	}
	if o.LateFraction == 0 {
		o.LateFraction = 0.01
	}
	if o.LateBound == 0 {
		o.LateBound = DefaultLateBound
	}
	if o.CloseTimeout == 0 {
		o.CloseTimeout = time.Minute
	}
	if o.Window == 0 {
		o.Window = DefaultWindow
	}
	if o.VerifyTimeout == 0 {
		o.VerifyTimeout = DefaultVerifyTimeout
	}
	if o.ProgressInterval == 0 {
		o.ProgressInterval = time.Second
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = 3 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Targets of a run.
const (
	TargetDimsum          = "dimsum"
	TargetVictoriaMetrics = "victoriametrics"
)

// seriesDefaults fills the defaults that differ for a Series run: a fleet
// of 4 datacenters of 5 clusters, 10 transactions, steps of a minute, and
// every step of the backfill (or 30 steps live).
func (o *Options) seriesDefaults() {
	if o.Datacenters == 0 {
		o.Datacenters = 4
	}
	if o.ClustersPerDC == 0 {
		o.ClustersPerDC = 5
	}
	if o.Transactions == 0 {
		o.Transactions = 10
	}
	if o.Step == 0 {
		o.Step = time.Minute
	}
	if o.Events == 0 {
		steps := 30
		if o.Backfill > 0 && o.Step > 0 {
			steps = int(o.Backfill / o.Step)
		}
		o.Events = steps * o.Series
	}
	if o.Backfill == 0 && o.Step > 0 {
		// Live: one event per series and step, at an even pace.
		o.Rate = float64(o.Series) / o.Step.Seconds()
		o.Diurnal = -1
	}
	o.LateFraction = -1
}

// validateSeries checks the options of a Series run.
func (o *Options) validateSeries() error {
	switch {
	case o.Step < time.Second || o.Step%time.Second != 0:
		return fmt.Errorf("%w: step %s is not a whole number of seconds", ErrOptions, o.Step)
	case o.Backfill < 0:
		return fmt.Errorf("%w: negative backfill %s", ErrOptions, o.Backfill)
	case o.Series%o.Transactions != 0:
		return fmt.Errorf("%w: %d series are not a whole number of hosts of %d transactions", ErrOptions, o.Series, o.Transactions)
	case o.Series/o.Transactions < o.Datacenters*o.ClustersPerDC:
		return fmt.Errorf("%w: %d series make %d hosts, fewer than the %d clusters", ErrOptions, o.Series, o.Series/o.Transactions, o.Datacenters*o.ClustersPerDC)
	case o.Events%o.Series != 0:
		return fmt.Errorf("%w: %d events are not a whole number of steps of %d series", ErrOptions, o.Events, o.Series)
	case o.Backfill > 0 && o.Events/o.Series > int(o.Backfill/o.Step):
		return fmt.Errorf("%w: %d steps of %s do not fit in the backfill of %s", ErrOptions, o.Events/o.Series, o.Step, o.Backfill)
	}
	return nil
}

// ErrOptions marks invalid options.
var ErrOptions = errors.New("loadtest: invalid options")

func (o *Options) validate() error {
	switch {
	case o.Events < 0 || o.BatchSize < 0 || o.Concurrency < 0 || o.Buffer < 0 || o.Datacenters < 0 ||
		o.ClustersPerDC < 0 || o.HostsPerCluster < 0 || o.Transactions < 0 || o.Series < 0:
		return fmt.Errorf("%w: counts must be positive", ErrOptions)
	case o.Rate < 0:
		return fmt.Errorf("%w: negative rate %v", ErrOptions, o.Rate)
	case o.Diurnal > 1:
		return fmt.Errorf("%w: diurnal swing %v above 1 would make the rate negative", ErrOptions, o.Diurnal)
	case o.Day <= 0 || o.StartHour < 0 || o.StartHour >= 24:
		return fmt.Errorf("%w: the simulated day needs a positive length and a start hour in [0, 24)", ErrOptions)
	case o.LateFraction > 1:
		return fmt.Errorf("%w: late fraction must be at most 1", ErrOptions)
	case o.LateBound < 0:
		return fmt.Errorf("%w: negative late bound", ErrOptions)
	case o.Window < time.Second || o.Window%time.Second != 0:
		return fmt.Errorf("%w: window %s is not a whole number of seconds", ErrOptions, o.Window)
	case o.CloseTimeout < 0 || o.VerifyTimeout < 0 || o.ConnectTimeout < 0:
		return fmt.Errorf("%w: negative timeout", ErrOptions)
	}
	switch {
	case o.Target != TargetDimsum && o.Target != TargetVictoriaMetrics:
		return fmt.Errorf("%w: target %q, want %s or %s", ErrOptions, o.Target, TargetDimsum, TargetVictoriaMetrics)
	case o.Target == TargetVictoriaMetrics && o.Series == 0:
		return fmt.Errorf("%w: the %s target takes only a Series run", ErrOptions, TargetVictoriaMetrics)
	case o.Series > 0:
		if err := o.validateSeries(); err != nil {
			return err
		}
	}
	if o.Diurnal < 0 {
		o.Diurnal = 0
	}
	if o.LateFraction < 0 {
		o.LateFraction = 0
	}
	return nil
}

// chunkEvents is how many events the generator hands the publisher at once.
const chunkEvents = 500

// Run sends the workload through a publisher and returns what happened to
// it. It stops early, with what it did so far, when ctx ends; the error then
// says so. With Verify, a mismatch between what was acknowledged and what the
// nodes answer is an error wrapping ErrMismatch.
func Run(ctx context.Context, opts Options) (Report, error) {
	opts.ensureDefaults()
	if err := opts.validate(); err != nil {
		return Report{}, err
	}
	start := time.Now()
	var gen generator = newWorkload(opts)
	earliest := opts.Now().Add(-opts.LateBound).UnixMilli()
	if opts.Series > 0 {
		sw := newSeriesWorkload(opts, opts.Now())
		gen, earliest = sw, sw.first
		if opts.Target == TargetVictoriaMetrics {
			return runVictoria(ctx, opts, sw, start)
		}
	}
	rec := newRecorder(opts.Family)
	rep := Report{TargetRate: opts.Rate}
	out := newProgress(opts)
	if err := reachable(ctx, opts, out); err != nil {
		return rep, err
	}

	if opts.Verify {
		if err := settle(ctx, opts, out); err != nil {
			return rep, fmt.Errorf("loadtest: cannot verify: %w", err)
		}
	}
	before, scrapeErr := scrapeAll(ctx, opts.HTTPAddrs)
	var (
		base readout
		grid verifyGrid
	)
	if opts.Verify {
		if scrapeErr != nil {
			return rep, fmt.Errorf("loadtest: cannot verify: %w", scrapeErr)
		}
		grid = newGrid(opts.Window, earliest)
		var err error
		if base, err = grid.read(ctx, opts, opts.Now()); err != nil {
			return rep, fmt.Errorf("loadtest: cannot read the totals before the run: %w", err)
		}
	}

	// The publisher's warnings carry the error of each failed attempt:
	// progress names the last one while nothing is acknowledged.
	lastErr := newLastError(opts.Logger.Handler())
	pub, err := publisher.New(publisher.Options{
		Addrs:        opts.Addrs,
		BatchEvents:  opts.BatchSize,
		BufferEvents: opts.Buffer,
		Policy:       opts.Policy,
		InFlight:     opts.Concurrency,
		Compression:  opts.Compression,
		DialOptions:  opts.DialOptions,
		Credentials:  opts.Credentials,
		Logger:       slog.New(lastErr),
		OnResult:     rec.result,
	})
	if err != nil {
		return rep, fmt.Errorf("loadtest: %w", err)
	}
	stopProgress := make(chan struct{})
	var progressDone sync.WaitGroup
	if out != nil {
		progressDone.Go(func() { out.run(pub, start, lastErr, stopProgress) })
	}
	genErr := generate(ctx, opts, gen, start, func(evs []publisher.Event) error { return pub.Add(ctx, evs...) })
	cctx, cancel := context.WithTimeout(context.Background(), opts.CloseTimeout)
	closeErr := pub.Close(cctx)
	cancel()
	rep.Duration = time.Since(start)
	close(stopProgress)
	progressDone.Wait()
	rec.fill(&rep, pub.Stats())

	if after, err := scrapeAll(ctx, opts.HTTPAddrs); err == nil && scrapeErr == nil {
		rep.Server = after.minus(before)
	}
	if err := errors.Join(genErr, closeErr); err != nil {
		return rep, fmt.Errorf("loadtest: %w", err)
	}
	if opts.Verify {
		if err := verify(ctx, opts, grid, base, start, &rep, out); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// generator makes the events of a run: n of them from index first on,
// stamped relative to now.
type generator interface {
	chunk(dst []publisher.Event, first uint64, n int, now time.Time) []publisher.Event
}

// generate hands the workload to send, a chunk at a time: as fast as it
// takes it (closed loop), or on the schedule of Rate (open loop).
func generate(ctx context.Context, opts Options, gen generator, start time.Time, send func([]publisher.Event) error) error {
	evs := make([]publisher.Event, 0, chunkEvents)
	for sent := 0; sent < opts.Events; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(chunkEvents, opts.Events-sent)
		if opts.Rate > 0 {
			due := int(opts.due(time.Since(start)))
			if due <= sent {
				time.Sleep(time.Millisecond)
				continue
			}
			n = min(n, due-sent)
		}
		evs = gen.chunk(evs[:0], uint64(sent), n, opts.Now())
		if err := send(evs); err != nil {
			return err
		}
		sent += n
	}
	return nil
}

func sum(m map[string]uint64) uint64 {
	var n uint64
	for _, v := range m {
		n += v
	}
	return n
}

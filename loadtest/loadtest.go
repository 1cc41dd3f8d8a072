package loadtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Options configure a run. Zero fields take their defaults.
type Options struct {
	// Addr is the gRPC address of the node. The default is 127.0.0.1:9400.
	Addr string
	// Events is how many events to send. The default is 1,000,000.
	Events int
	// Seed makes the workload reproducible. The default is 1.
	Seed uint64
	// BatchSize is the number of events per Push. The default is 5,000.
	BatchSize int
	// Concurrency is the number of batches in flight. The default is 4.
	Concurrency int
	// Family is the counter family the events belong to; it must have the
	// dimensions datacenter/cluster/host, transaction and status, as the
	// embedded default schema's requests family does. The default is
	// "requests".
	Family string
	// Datacenters, ClustersPerDC, HostsPerCluster and Transactions shape
	// the fleet. The defaults are 3, 4, 25 and 50: 300 hosts.
	Datacenters, ClustersPerDC, HostsPerCluster, Transactions int
	// LateFraction is the share of events stamped up to a minute in the
	// past, so some arrive after their window closed. The default is 0.01;
	// a negative value sends none.
	LateFraction float64
	// Progress receives a progress line every ProgressInterval (default
	// 1s). nil prints nothing.
	Progress         io.Writer
	ProgressInterval time.Duration
	// Now is the clock that stamps events. The default is time.Now.
	Now func() time.Time
}

func (o *Options) ensureDefaults() {
	if o.Addr == "" {
		o.Addr = "127.0.0.1:9400"
	}
	if o.Events == 0 {
		o.Events = 1_000_000
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
	if o.ProgressInterval == 0 {
		o.ProgressInterval = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

func (o *Options) validate() error {
	if o.Events < 0 || o.BatchSize < 0 || o.Concurrency < 0 || o.Datacenters < 0 ||
		o.ClustersPerDC < 0 || o.HostsPerCluster < 0 || o.Transactions < 0 {
		return errors.New("loadtest: counts must be positive")
	}
	if o.LateFraction > 1 {
		return errors.New("loadtest: late fraction must be at most 1")
	}
	return nil
}

// Report is what a run sent and what the node said of it.
type Report struct {
	Events   uint64 // events sent
	Accepted uint64 // events the node counted
	Rejected uint64 // events the node refused
	// Rejects counts refused events by reason.
	Rejects map[string]uint64
	// Totals is the sum of accepted values per family; ByDatacenter the
	// same per family and datacenter.
	Totals       map[string]float64
	ByDatacenter map[string]map[string]float64
	Duration     time.Duration
}

// Rate is the events sent per second.
func (r Report) Rate() float64 { return float64(r.Events) / r.Duration.Seconds() }

// String renders the report for people.
func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sent %d events in %s: %.0f events/s\n", r.Events, r.Duration.Round(time.Millisecond), r.Rate())
	fmt.Fprintf(&b, "accepted %d, rejected %d\n", r.Accepted, r.Rejected)
	for _, reason := range slices.Sorted(maps.Keys(r.Rejects)) {
		fmt.Fprintf(&b, "  rejected %s: %d\n", reason, r.Rejects[reason])
	}
	for _, fam := range slices.Sorted(maps.Keys(r.Totals)) {
		fmt.Fprintf(&b, "total %s: %s\n", fam, strconv.FormatFloat(r.Totals[fam], 'f', -1, 64))
		for _, dc := range slices.Sorted(maps.Keys(r.ByDatacenter[fam])) {
			fmt.Fprintf(&b, "  datacenter=%s: %s\n", dc, strconv.FormatFloat(r.ByDatacenter[fam][dc], 'f', -1, 64))
		}
	}
	return b.String()
}

// Run sends the workload and returns what was accepted. It stops early, with
// what it sent so far and an error, when a Push fails or ctx ends.
func Run(ctx context.Context, opts Options) (Report, error) {
	opts.ensureDefaults()
	if err := opts.validate(); err != nil {
		return Report{}, err
	}
	conn, err := grpc.NewClient("passthrough:///"+opts.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return Report{}, fmt.Errorf("loadtest: cannot dial %s: %w", opts.Addr, err)
	}
	defer conn.Close()
	client := wirepb.NewIngestClient(conn)
	w := newWorkload(opts)

	batches := (opts.Events + opts.BatchSize - 1) / opts.BatchSize
	var (
		next, sent atomic.Int64
		mu         sync.Mutex
		rep        = Report{Rejects: map[string]uint64{}, Totals: map[string]float64{}, ByDatacenter: map[string]map[string]float64{}}
		firstErr   error
		wg         sync.WaitGroup
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	done := make(chan struct{})
	if opts.Progress != nil {
		go progress(opts, &sent, start, done)
	}
	for range opts.Concurrency {
		wg.Go(func() {
			var b wire.Batch
			var dcs []string
			var vals []float64
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= batches {
					return
				}
				n := min(opts.BatchSize, opts.Events-i*opts.BatchSize)
				b.Reset()
				dcs, vals = w.batch(&b, uint64(i), n, opts.Now(), dcs[:0], vals[:0])
				resp, err := client.Push(ctx, b.Request())
				sent.Add(int64(n))
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("loadtest: push of batch %d failed: %w", i, err)
					}
					mu.Unlock()
					cancel()
					return
				}
				rep.Events += uint64(n)
				rep.Accepted += resp.Accepted
				rejected := make(map[uint32]bool, len(resp.Rejects))
				for _, r := range resp.Rejects {
					rejected[r.Index] = true
					rep.Rejected++
					rep.Rejects[wire.ReasonName(r.Reason)]++
				}
				byDC := rep.ByDatacenter[opts.Family]
				if byDC == nil {
					byDC = map[string]float64{}
					rep.ByDatacenter[opts.Family] = byDC
				}
				for j, v := range vals {
					if !rejected[uint32(j)] {
						rep.Totals[opts.Family] += v
						byDC[dcs[j]] += v
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(done)
	rep.Duration = time.Since(start)
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return rep, firstErr
}

func progress(opts Options, sent *atomic.Int64, start time.Time, done <-chan struct{}) {
	t := time.NewTicker(opts.ProgressInterval)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			n := sent.Load()
			fmt.Fprintf(opts.Progress, "sent %d/%d events (%.0f%%), %.0f events/s\n",
				n, opts.Events, 100*float64(n)/float64(opts.Events), float64(n)/time.Since(start).Seconds())
		}
	}
}

// workload generates the events of batch i from the seed alone.
type workload struct {
	opts    Options
	dcs     []string
	hosts   [][3]string // datacenter, cluster, host
	txns    []string
	weights []float64 // cumulative Zipf weights of txns
}

func newWorkload(opts Options) *workload {
	w := &workload{opts: opts}
	for d := range opts.Datacenters {
		dc := fmt.Sprintf("dc%d", d+1)
		w.dcs = append(w.dcs, dc)
		for c := range opts.ClustersPerDC {
			cl := fmt.Sprintf("%s-c%d", dc, c+1)
			for h := range opts.HostsPerCluster {
				w.hosts = append(w.hosts, [3]string{dc, cl, fmt.Sprintf("%s-h%03d", cl, h+1)})
			}
		}
	}
	verbs := []string{"get", "put", "list", "search", "checkout", "login", "view", "update", "delete", "pay"}
	nouns := []string{"item", "cart", "user", "order", "listing", "offer", "feed", "image", "review", "bid"}
	sum := 0.0
	for t := range opts.Transactions {
		w.txns = append(w.txns, verbs[t%len(verbs)]+"_"+nouns[(t/len(verbs))%len(nouns)]+suffix(t/(len(verbs)*len(nouns))))
		sum += 1 / float64(t+1) // Zipf with exponent 1
		w.weights = append(w.weights, sum)
	}
	return w
}

func suffix(n int) string {
	if n == 0 {
		return ""
	}
	return strconv.Itoa(n + 1)
}

// batch adds n events of batch i to b and returns each event's datacenter
// and value, so the caller can total what is accepted.
func (w *workload) batch(b *wire.Batch, i uint64, n int, now time.Time, dcs []string, vals []float64) ([]string, []float64) {
	r := rand.New(rand.NewPCG(w.opts.Seed, i))
	nowMS := now.UnixMilli()
	total := w.weights[len(w.weights)-1]
	for range n {
		h := w.hosts[r.IntN(len(w.hosts))]
		x := r.Float64() * total
		t, _ := slices.BinarySearch(w.weights, x)
		t = min(t, len(w.txns)-1)
		status := "200"
		switch p := r.Float64(); {
		case p < 0.02:
			status = "500"
		case p < 0.05:
			status = "404"
		}
		ts := nowMS
		if r.Float64() < w.opts.LateFraction {
			ts -= r.Int64N(60_000)
		}
		v := float64(1 + r.IntN(3))
		b.Add(w.opts.Family, ts, v,
			"datacenter", h[0], "cluster", h[1], "host", h[2],
			"transaction", w.txns[t], "status", status)
		dcs = append(dcs, h[0])
		vals = append(vals, v)
	}
	return dcs, vals
}

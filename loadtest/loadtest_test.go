package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	"github.com/dimsum/dimsum/internal/node"
	"github.com/dimsum/dimsum/publisher"
	"github.com/dimsum/dimsum/schema"
)

// TestWorkloadIsSeeded checks that a chunk depends only on the seed and its
// number, and that the fleet has the configured shape.
func TestWorkloadIsSeeded(t *testing.T) {
	opts := Options{Seed: 5}
	opts.ensureDefaults()
	w := newWorkload(opts)
	if len(w.hosts) != 300 || len(w.dcs) != 3 || len(w.txns) != 50 {
		t.Fatalf("fleet of %d hosts in %d datacenters, %d transactions", len(w.hosts), len(w.dcs), len(w.txns))
	}
	now := time.Unix(1_800_000_000, 0)
	c1 := w.chunk(nil, 3, 1000, now)
	c2 := w.chunk(nil, 3, 1000, now)
	c3 := w.chunk(nil, 4, 1000, now)
	same, late, errors := true, 0, 0
	sum := 0.0
	for i := range c1 {
		if c1[i].Value != c2[i].Value || c1[i].TimestampMS != c2[i].TimestampMS || strings.Join(c1[i].Labels, ",") != strings.Join(c2[i].Labels, ",") {
			t.Fatalf("event %d differs between two generations of chunk 3", i)
		}
		same = same && strings.Join(c1[i].Labels, ",") == strings.Join(c3[i].Labels, ",")
		if v := c1[i].Value; v < 1 || v > 3 {
			t.Fatalf("value %v outside 1..3", v)
		}
		sum += c1[i].Value
		if d := now.UnixMilli() - c1[i].TimestampMS; d != 0 {
			late++
			if d < 0 || d > opts.LateBound.Milliseconds() {
				t.Fatalf("event stamped %dms before now, outside (0, %s]", d, opts.LateBound)
			}
		}
		if c1[i].Labels[9] != "200" {
			errors++
		}
	}
	if same {
		t.Error("chunks 3 and 4 are identical")
	}
	if sum < 1500 || sum > 2500 {
		t.Errorf("mean value %v, want about 2", sum/1000)
	}
	if late == 0 || late > 50 {
		t.Errorf("%d late events in 1000, want about 10", late)
	}
	if errors < 20 || errors > 90 {
		t.Errorf("%d error statuses in 1000, want about 50", errors)
	}
}

// TestDiurnal checks the rate shape: mean Rate, peak at 15:00, trough at
// 03:00, and due as its integral.
func TestDiurnal(t *testing.T) {
	o := Options{Rate: 1000, Day: 24 * time.Second, StartHour: 9, Diurnal: 0.5}
	for _, tc := range []struct {
		at   time.Duration // one second is one simulated hour
		want float64
	}{{0, 1}, {6 * time.Second, 1.5}, {18 * time.Second, 0.5}, {24 * time.Second, 1}} {
		if got := o.diurnal(tc.at); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("factor at %s: %v, want %v", tc.at, got, tc.want)
		}
	}
	if got := o.due(o.Day); math.Abs(got-o.Rate*o.Day.Seconds()) > 1e-6 {
		t.Errorf("a whole day is due %v events, want %v", got, o.Rate*o.Day.Seconds())
	}
	// due is the integral of the rate: compare with a Riemann sum.
	const n = 100_000
	sum, end := 0.0, 10*time.Second
	for i := range n {
		sum += o.Rate * o.diurnal(end*time.Duration(2*i+1)/(2*n)) * end.Seconds() / n
	}
	if got := o.due(end); math.Abs(got-sum) > 1e-3 {
		t.Errorf("due(%s) = %v, the integral is %v", end, got, sum)
	}
}

func TestHistogram(t *testing.T) {
	var h histogram
	for i := 1; i <= 100_000; i++ {
		h.add(time.Duration(i) * time.Microsecond)
	}
	for _, q := range []float64{0.5, 0.99, 0.999} {
		want := time.Duration(q*100_000) * time.Microsecond
		if got := h.quantile(q); got < want || float64(got-want) > float64(want)/32 {
			t.Errorf("quantile %v = %s, want %s within 1/32", q, got, want)
		}
	}
	if h.max != 100*time.Millisecond || h.quantile(1) != h.max {
		t.Errorf("max %s, quantile 1 %s", h.max, h.quantile(1))
	}
	for i := range bucketOf(math.MaxInt64) {
		if b := bucketOf(bucketTop(i)); b != i {
			t.Fatalf("the top of bucket %d falls in bucket %d", i, b)
		}
	}
}

// TestRunVerifies runs the load against a real all-in-one node with a 1s
// window, twice: closed loop, then open loop over the same data, and has
// each run read its totals back through PromQL.
func TestRunVerifies(t *testing.T) {
	n, err := node.Start(node.Config{
		DataDir:    t.TempDir(),
		GRPCListen: "127.0.0.1:0",
		HTTPListen: "127.0.0.1:0",
		Name:       "test",
		Aggregator: node.AggregatorConfig{Grace: model.Duration(300 * time.Millisecond), FlushInterval: model.Duration(50 * time.Millisecond)},
		Schema:     schema.File{Resolutions: []string{"1s:1d", "10s:8d", "1m:35d"}},
	}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	base := Options{
		Addrs:        []string{n.GRPCAddr()},
		HTTPAddrs:    []string{n.HTTPAddr()},
		BatchSize:    1_000,
		LateFraction: 0.05,
		LateBound:    3 * time.Second,
		Window:       time.Second,
		Verify:       true,
	}
	for _, tc := range []struct {
		name string
		opts func(*Options)
	}{
		{"closed loop", func(o *Options) { o.Events, o.Seed, o.ProgressTerminal = 30_000, 3, true }},
		{"open loop", func(o *Options) { o.Events, o.Seed, o.Rate = 10_000, 4, 20_000 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := base
			var progress bytes.Buffer
			o.Progress, o.ProgressInterval = &progress, 50*time.Millisecond
			tc.opts(&o)
			rep, err := Run(context.Background(), o)
			if err != nil {
				t.Fatalf("%v\n%s", err, rep)
			}
			// Progress says what -verify waits for (TestProgressLine
			// pins the lines while sending, which a short run may not
			// show); on a terminal each line replaces the last.
			shown := progress.String()
			if !strings.Contains(shown, "verify: ") || !strings.Contains(shown, " events read back after ") {
				t.Errorf("progress does not say what verify waits for:\n%q", shown)
			}
			if o.ProgressTerminal != strings.Contains(shown, "\r\x1b[K") {
				t.Errorf("terminal %v, progress:\n%q", o.ProgressTerminal, shown)
			}
			if rep.Events != uint64(o.Events) || rep.Accepted != rep.Events || rep.Rejected != 0 || len(rep.Dropped) != 0 {
				t.Errorf("report:\n%s", rep)
			}
			if rep.ReadBack == nil || !rep.ReadBack.Verified || rep.ReadBack.Totals["requests"] != rep.Totals["requests"] {
				t.Errorf("not verified:\n%s", rep)
			}
			if s := rep.Server; s == nil || s.Accepted != rep.Accepted || s.Late == 0 {
				t.Errorf("server figures %+v", s)
			}
			if l := rep.Latency; l.P50 <= 0 || l.P50 > l.P99 || l.P99 > l.P999 || l.P999 > l.Max {
				t.Errorf("latency %+v", l)
			}
			file := filepath.Join(t.TempDir(), "report.json")
			if err := rep.WriteFile(file); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			var back map[string]any
			if err := json.Unmarshal(data, &back); err != nil || back["rate"] == nil || back["accepted"] != float64(o.Events) {
				t.Errorf("report file %s: %v", data, err)
			}
		})
	}
}

// TestSeriesWorkload checks the shape of a Series run: one event a step for
// every series, at the series' own offset within the step, a Poisson count
// whose mean follows the transaction's rank, and values that depend on the
// seed and the index alone.
func TestSeriesWorkload(t *testing.T) {
	opts := Options{Series: 400, Backfill: time.Hour, Seed: 3}
	opts.ensureDefaults()
	if err := opts.validate(); err != nil {
		t.Fatal(err)
	}
	if opts.Events != 400*60 || opts.Step != time.Minute || opts.Transactions != 10 {
		t.Fatalf("defaults: %d events, step %s, %d transactions", opts.Events, opts.Step, opts.Transactions)
	}
	start := time.Unix(1_800_000_000, 0)
	w := newSeriesWorkload(opts, start)
	if w.first != start.Add(-time.Hour).UnixMilli() || w.last() != start.UnixMilli() {
		t.Fatalf("steps from %d to %d", w.first, w.last())
	}
	evs := w.chunk(nil, 0, opts.Events, time.Time{})
	again := w.chunk(nil, 123, 10, time.Time{})
	type series struct{ host, txn string }
	seen := map[series][]int64{}
	sums := make([]float64, opts.Transactions)
	dcs, clusters := map[string]bool{}, map[string]bool{}
	for i, e := range evs {
		if i >= 123 && i < 133 && (again[i-123].Value != e.Value || again[i-123].TimestampMS != e.TimestampMS) {
			t.Fatalf("event %d differs when generated again", i)
		}
		s := series{e.Labels[5], e.Labels[7]}
		seen[s] = append(seen[s], e.TimestampMS)
		sums[i%opts.Transactions] += e.Value
		dcs[e.Labels[1]], clusters[e.Labels[3]] = true, true
		if e.Labels[9] != "200" || e.Value < 0 || e.Value != float64(int(e.Value)) {
			t.Fatalf("event %d: %+v", i, e)
		}
	}
	if len(seen) != opts.Series || len(dcs) != 4 || len(clusters) != 20 {
		t.Fatalf("%d series in %d datacenters and %d clusters", len(seen), len(dcs), len(clusters))
	}
	for s, ts := range seen {
		if len(ts) != 60 {
			t.Fatalf("series %v has %d events", s, len(ts))
		}
		for k, t0 := range ts {
			step := w.first + int64(k)*w.stepMS
			if t0 < step || t0 >= step+w.stepMS || t0-step != ts[0]-w.first {
				t.Fatalf("series %v: event %d at %d, not at its offset in step %d", s, k, t0, step)
			}
		}
	}
	// The mean count of transaction t is 10/(t+1) times the host's size,
	// 1.25 on average: the first is about ten times the last.
	if m0, m9 := sums[0]/2400, sums[9]/2400; m0 < 11 || m0 > 14 || m9 < 0.9 || m9 > 1.6 {
		t.Errorf("mean counts %v and %v, want about 12.5 and 1.25", m0, m9)
	}
	for _, bad := range []Options{
		{Series: 405},              // not whole hosts
		{Series: 100},              // fewer hosts than clusters
		{Series: 400, Events: 500}, // not whole steps
		{Series: 400, Backfill: time.Minute, Events: 800},
		{Series: 400, Step: 1500 * time.Millisecond},
		{Target: TargetVictoriaMetrics},     // only for Series runs
		{Series: 400, Target: "prometheus"}, // unknown target
	} {
		bad.ensureDefaults()
		if err := bad.validate(); !errors.Is(err, ErrOptions) {
			t.Errorf("options %+v: %v, want ErrOptions", bad, err)
		}
	}
}

// TestBackfillVerifies backfills two hours of 400 series into a real node
// that takes events that old, and reads them back: once with the default
// bounds, and once with bounds so small that the store is always behind,
// so that the node refuses pushes for back-pressure and the publisher
// retries them when asked: nothing acknowledged may be lost, nothing
// counted twice.
func TestBackfillVerifies(t *testing.T) {
	for _, tc := range []struct {
		name  string
		agg   node.AggregatorConfig
		store node.StoreConfig
	}{
		{"default bounds", node.AggregatorConfig{}, node.StoreConfig{}},
		{"store behind", node.AggregatorConfig{MaxPendingBytes: 16 << 10}, node.StoreConfig{HeadMaxBytes: 64 << 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.agg.MaxLateness, tc.agg.FlushInterval = model.Duration(3*time.Hour), model.Duration(50*time.Millisecond)
			n, err := node.Start(node.Config{
				DataDir:    t.TempDir(),
				GRPCListen: "127.0.0.1:0",
				HTTPListen: "127.0.0.1:0",
				Name:       "test",
				Aggregator: tc.agg,
				Store:      tc.store,
			}, "test", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close()
			rep, err := Run(context.Background(), Options{
				Addrs:     []string{n.GRPCAddr()},
				HTTPAddrs: []string{n.HTTPAddr()},
				Series:    400,
				Backfill:  2 * time.Hour,
				BatchSize: 1000,
				Verify:    true,
			})
			if err != nil {
				t.Fatalf("%v\n%s", err, rep)
			}
			if rep.Accepted != 400*120 || rep.Rejected != 0 || len(rep.Dropped) != 0 || rep.ReadBack == nil || !rep.ReadBack.Verified || rep.SettledRate() <= 0 {
				t.Errorf("report:\n%s", rep)
			}
			if behind := tc.agg.MaxPendingBytes > 0; behind != (rep.Backpressured > 0) {
				t.Errorf("%d retries asked for by the node, want some only when the store is behind:\n%s", rep.Backpressured, rep)
			}
		})
	}
}

// TestRunNamesConnectionErrors checks that a run says why it cannot reach
// a node: at once when no address accepts connections, and in its progress
// while a node that went away leaves everything unacknowledged.
func TestRunNamesConnectionErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	_, err = Run(context.Background(), Options{Addrs: []string{closed}, HTTPAddrs: []string{closed}, Events: 10})
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), closed+": dial tcp "+closed+": connect: connection refused") {
		t.Errorf("a run to %s, where nothing listens: %v; want ErrUnreachable naming the address and the refusal", closed, err)
	}

	n, err := node.Start(node.Config{DataDir: t.TempDir(), GRPCListen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0", Name: "test"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	var progress bytes.Buffer
	opts := Options{Addrs: []string{n.GRPCAddr()}, HTTPAddrs: []string{n.HTTPAddr()}, Events: 4_000, Rate: 2_000, Diurnal: -1, BatchSize: 100,
		Progress: &progress, ProgressInterval: 100 * time.Millisecond, CloseTimeout: 4 * time.Second}
	done := make(chan error, 1)
	go func() {
		_, err := Run(context.Background(), opts)
		done <- err
	}()
	// Stop the node once it has counted some of the run.
	deadline := time.Now().Add(30 * time.Second)
	for s, _ := scrapeAll(context.Background(), opts.HTTPAddrs); s.Accepted == 0; s, _ = scrapeAll(context.Background(), opts.HTTPAddrs) {
		if time.Now().After(deadline) {
			t.Fatal("the node accepted nothing")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Close may time out shutting HTTP down under the run's own requests;
	// what counts here is that the port is gone.
	n.Close()
	if err := <-done; err == nil {
		t.Error("a run whose node went away succeeded")
	}
	if want := "last error: " + n.GRPCAddr() + ": "; !strings.Contains(progress.String(), want) || !strings.Contains(progress.String(), "connection refused") {
		t.Errorf("progress does not name the failure (%q ... connection refused):\n%s", want, progress.String())
	}
}

// TestProgressLine pins a progress line: the share acknowledged, the rate,
// the time left at the run's average rate, and, once nothing has been
// acknowledged for a while, the last error.
func TestProgressLine(t *testing.T) {
	p := newProgress(Options{Progress: io.Discard, Events: 1000})
	s := publisher.Stats{Sent: 250, Buffered: 10, Rejected: map[string]uint64{"too_old": 2}}
	if got, want := p.line(s, 5*time.Second, 48.5, time.Second, "x: refused"), "5s  25.0%  250/1000 events acknowledged  48 events/s  ETA 15s  buffered 10, rejected 2, dropped 0"; got != want {
		t.Errorf("line\n got %q\nwant %q", got, want)
	}
	if got := p.line(publisher.Stats{}, 4*time.Second, 0, 4*time.Second, "127.0.0.1:1: connection refused"); !strings.HasSuffix(got, "ETA unknown  buffered 0, rejected 0, dropped 0; nothing acknowledged for 4s, last error: 127.0.0.1:1: connection refused") {
		t.Errorf("stalled line %q", got)
	}
	if got := p.line(publisher.Stats{Sent: 1000}, 9*time.Second, 0, 0, ""); !strings.Contains(got, "100.0%") || !strings.Contains(got, " done ") {
		t.Errorf("finished line %q", got)
	}
}

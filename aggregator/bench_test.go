package aggregator_test

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/internal/race"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The benchmark workload: 3 datacenters of 5 clusters of 20 hosts, 50
// transactions and 3 statuses, pushed in batches of 5,000 events.
const (
	benchHosts    = 300
	benchTxns     = 50
	benchStatuses = 3
	benchBatch    = 5000
	// benchCells is the number of distinct cells the workload creates in one
	// window over the default lattice: per dimension the distinct prefixes,
	// (1 + 3 + 15 + 300) x (1 + 50) x (1 + 3). The 16 x 45,000 cells a
	// count per finest cell would suggest collapse in the coarser cuboids.
	benchCells = (1 + 3 + 15 + benchHosts) * (1 + benchTxns) * (1 + benchStatuses)
)

// benchLabels returns the labels of one workload event.
func benchLabels(host, txn, st int) []string {
	return []string{
		"datacenter", fmt.Sprintf("dc%d", host/100),
		"cluster", fmt.Sprintf("dc%d-c%d", host/100, host/20),
		"host", fmt.Sprintf("dc%d-c%d-h%03d", host/100, host/20, host),
		"transaction", fmt.Sprintf("txn%02d", txn),
		"status", fmt.Sprint(200 + 100*st),
	}
}

// benchFill returns batches holding every finest cell of the workload once.
func benchFill(ts int64) []*wirepb.PushRequest {
	var out []*wirepb.PushRequest
	var b *wire.Batch
	for host := range benchHosts {
		for txn := range benchTxns {
			for st := range benchStatuses {
				if b == nil || b.Len() == benchBatch {
					if b != nil {
						out = append(out, b.Request())
					}
					b = new(wire.Batch)
				}
				b.Add(family, ts, 1, benchLabels(host, txn, st)...)
			}
		}
	}
	return append(out, b.Request())
}

// benchRandom returns n batches of size events drawn at random from the
// workload.
func benchRandom(ts int64, n, size int) []*wirepb.PushRequest {
	rng := rand.New(rand.NewPCG(7, 8))
	out := make([]*wirepb.PushRequest, n)
	for i := range out {
		b := new(wire.Batch)
		for range size {
			b.Add(family, ts, float64(1+rng.IntN(10)), benchLabels(rng.IntN(benchHosts), rng.IntN(benchTxns), rng.IntN(benchStatuses))...)
		}
		out[i] = b.Request()
	}
	return out
}

// BenchmarkCubeUpdate measures Push into cells that already exist: the
// steady state of a window, 16 cuboids updated per event. The clock stands
// still, so no window is flushed while the benchmark runs. It also reports
// the heap the aggregator holds per live cell, measured while filling the
// window with every cell of the workload.
//
// An op is one batch of 5,000 events.
func BenchmarkCubeUpdate(b *testing.B) {
	s := schema.Default()
	if n := len(s.Family(family).Cuboids()); n != 16 {
		b.Fatalf("default family has %d cuboids, want 16", n)
	}
	clk := newClock(testWindow().Add(5 * time.Second))
	ts := clk.Now().UnixMilli()
	fill := benchFill(ts)
	batches := benchRandom(ts, 16, benchBatch)
	db, comb := openStore(b, s)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	a, err := aggregator.New(aggregator.Options{
		Schema:        s,
		Sink:          &combinerSink{c: comb},
		Now:           clk.Now,
		FlushInterval: time.Hour,
	})
	if err != nil {
		b.Fatal(err)
	}
	for _, req := range fill {
		if resp, err := a.Push(req); err != nil || resp.Accepted != uint64(len(req.Events)) {
			b.Fatalf("fill: %v, %v", resp, err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(fill) // built before the first reading, so not counted
	heapPerCell := float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / benchCells

	b.ReportAllocs()
	runtime.ReadMemStats(&before)
	n := 0
	for b.Loop() {
		req := batches[n%len(batches)]
		if resp, err := a.Push(req); err != nil || resp.Accepted != benchBatch {
			b.Fatalf("Push: %v, %v", resp, err)
		}
		n++
	}
	runtime.ReadMemStats(&after)
	events := float64(n * benchBatch)
	b.ReportMetric(events/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/events, "allocs/event")
	b.ReportMetric(heapPerCell, "B/cell")

	if err := a.Close(); err != nil {
		b.Fatal(err)
	}
	// The window's cells, now in the store, are the ones the heap figure
	// was divided by.
	cells := 0
	for _, c := range s.Family(family).Cuboids() {
		cs, err := db.Cells(family, c.ID, nil)
		if err != nil {
			b.Fatal(err)
		}
		cells += len(cs)
	}
	if cells != benchCells {
		b.Fatalf("the store holds %d cells, want %d", cells, benchCells)
	}
}

// BenchmarkPush measures Push of 5,000-event batches into existing cells
// from 8 goroutines at once, without and with the write-ahead log: with it,
// every Push waits for its record to be fsynced, and the concurrent pushers
// share fsyncs (group commit). An op is one batch.
func BenchmarkPush(b *testing.B) {
	for _, wal := range []bool{false, true} {
		b.Run(fmt.Sprintf("wal=%v", wal), func(b *testing.B) {
			s := schema.Default()
			clk := newClock(testWindow().Add(5 * time.Second))
			ts := clk.Now().UnixMilli()
			batches := benchRandom(ts, 16, benchBatch)
			_, comb := openStore(b, s)
			opts := aggregator.Options{Schema: s, Sink: &combinerSink{c: comb}, Now: clk.Now, FlushInterval: time.Hour}
			if wal {
				opts.WALDir = b.TempDir()
			}
			a, err := aggregator.New(opts)
			if err != nil {
				b.Fatal(err)
			}
			for _, req := range benchFill(ts) {
				if _, err := a.Push(req); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				n := 0
				for pb.Next() {
					if resp, err := a.Push(batches[n%len(batches)]); err != nil || resp.Accepted != benchBatch {
						b.Errorf("Push: %v, %v", resp, err)
						return
					}
					n++
				}
			})
			b.ReportMetric(float64(b.N*benchBatch)/b.Elapsed().Seconds(), "events/s")
			b.StopTimer()
			if err := a.Close(); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// TestPushAllocs pins the hot loop: pushing a batch whose cells all exist
// allocates a few objects per batch (the response, per-batch lookup tables),
// none per event, so 10,000 events cost what 1,000 do.
func TestPushAllocs(t *testing.T) {
	if race.Enabled {
		t.Skip("the race detector makes sync.Pool drop items at random")
	}
	h := start(t, aggregator.Options{FlushInterval: time.Hour})
	const maxAllocs = 8
	var got []float64
	for _, n := range []int{1000, 10_000} {
		req := benchRandom(h.ms(0), 1, n)[0]
		h.push(t, req) // creates the cells and grows pooled buffers
		allocs := testing.AllocsPerRun(20, func() {
			if resp, err := h.agg.Push(req); err != nil || resp.Accepted != uint64(n) {
				t.Fatalf("Push: %v, %v", resp, err)
			}
		})
		if allocs > maxAllocs {
			t.Errorf("Push of %d events into existing cells: %v allocations, want at most %d a batch", n, allocs, maxAllocs)
		}
		got = append(got, allocs)
	}
	if got[1] > got[0] {
		t.Errorf("allocations grow with the batch: %v for 1,000 events, %v for 10,000", got[0], got[1])
	}
}

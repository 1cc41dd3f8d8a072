package node

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/tsdb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

const benchBatch = 5_000

// benchEvent is one event of the benchmark workload: 300 hosts, 50
// transactions, three statuses.
type benchEvent struct {
	dc, cluster, host, txn, status string
	value                          float64
}

func benchEvents(n int) []benchEvent {
	r := rand.New(rand.NewPCG(1, 1))
	statuses := []string{"200", "200", "200", "200", "404", "500"}
	out := make([]benchEvent, n)
	for i := range out {
		h := r.IntN(300)
		out[i] = benchEvent{
			dc:      fmt.Sprintf("dc%d", h/100),
			cluster: fmt.Sprintf("c%d", h/25),
			host:    fmt.Sprintf("h%d", h),
			txn:     fmt.Sprintf("t%d", r.IntN(50)),
			status:  statuses[r.IntN(len(statuses))],
			value:   float64(1 + r.IntN(3)),
		}
	}
	return out
}

// BenchmarkIngest pushes prebuilt batches over real gRPC on loopback into an
// all-in-one node with the default schema (16 cuboids an event), four
// batches in flight, with the aggregator's write-ahead log on (the default)
// and off. One op is one batch of 5,000 events.
func BenchmarkIngest(b *testing.B) {
	for _, wal := range []bool{true, false} {
		b.Run(fmt.Sprintf("wal=%v", wal), func(b *testing.B) { benchIngest(b, wal) })
	}
}

func benchIngest(b *testing.B, wal bool) {
	cfg := testConfig(b.TempDir())
	cfg.Schema.Resolutions = nil // the default 10s:8d, 1m:35d, 1h:400d
	cfg.Aggregator = AggregatorConfig{WALDisabled: !wal}
	n, err := Start(cfg, "bench", nil)
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	conn, err := grpc.NewClient("passthrough:///"+n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	client := wirepb.NewIngestClient(conn)

	events := benchEvents(16 * benchBatch)
	now := time.Now().UnixMilli()
	reqs := make([]*wirepb.PushRequest, 16)
	for i := range reqs {
		var batch wire.Batch
		for _, e := range events[i*benchBatch : (i+1)*benchBatch] {
			batch.Add("requests", now, e.value, "datacenter", e.dc, "cluster", e.cluster, "host", e.host, "transaction", e.txn, "status", e.status)
		}
		reqs[i] = batch.Request()
	}
	var next atomic.Int64
	b.ReportAllocs()
	b.SetParallelism(2) // 2 x GOMAXPROCS batches in flight
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Push(context.Background(), reqs[next.Add(1)%int64(len(reqs))])
			if err != nil || resp.Accepted != benchBatch {
				b.Errorf("push: %v, accepted %d", err, resp.GetAccepted())
				return
			}
		}
	})
	b.ReportMetric(float64(b.N*benchBatch)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkPrometheusHeadAppend is the peer of BenchmarkIngest: the same
// events appended in-process to a Prometheus TSDB head, each as one sample
// of its finest series (no roll-up, no gRPC). One op is 5,000 events.
func BenchmarkPrometheusHeadAppend(b *testing.B) {
	opts := tsdb.DefaultOptions()
	db, err := tsdb.Open(b.TempDir(), nil, nil, opts, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	events := benchEvents(16 * benchBatch)
	lsets := make([]labels.Labels, len(events))
	for i, e := range events {
		lsets[i] = labels.FromStrings("__name__", "requests_total", "datacenter", e.dc, "cluster", e.cluster, "host", e.host, "transaction", e.txn, "status", e.status)
	}
	ts := time.Now().UnixMilli()
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		app := db.Appender(context.Background())
		off := (i % 16) * benchBatch
		ts++
		for j := range benchBatch {
			if _, err := app.Append(0, lsets[off+j], ts, float64(i)); err != nil {
				b.Fatal(err)
			}
		}
		if err := app.Commit(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*benchBatch)/b.Elapsed().Seconds(), "events/s")
}

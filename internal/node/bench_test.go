package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/tsdb"
	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/internal/testcert"
	"github.com/dimsum/dimsum/publisher"
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
// and off, and with the log on over TLS with a bearer token checked on
// every push. One op is one batch of 5,000 events.
func BenchmarkIngest(b *testing.B) {
	for _, c := range []struct{ wal, tls bool }{{true, false}, {false, false}, {true, true}} {
		b.Run(fmt.Sprintf("wal=%v/tls=%v", c.wal, c.tls), func(b *testing.B) { benchIngest(b, c.wal, c.tls) })
	}
}

// benchSecure gives cfg TLS and a credentials file on its public
// listeners, and returns the client's TLS config and a token with every
// right.
func benchSecure(b *testing.B, cfg *Config) (*tls.Config, string) {
	dir := b.TempDir()
	ca := testcert.NewCA(b, dir, "bench")
	pair := ca.Issue(b, "node")
	const token = "bench-token"
	sum := sha256.Sum256([]byte(token))
	creds := filepath.Join(dir, "credentials.yaml")
	if err := os.WriteFile(creds, []byte("credentials: [{name: bench, token_sha256: "+hex.EncodeToString(sum[:])+", rights: [push, query, admin]}]\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	cfg.TLS = TLSConfig{CertFile: pair.Cert, KeyFile: pair.Key}
	cfg.Auth = AuthConfig{CredentialsFile: creds}
	return &tls.Config{RootCAs: ca.Pool}, token
}

func benchIngest(b *testing.B, wal, secure bool) {
	cfg := testConfig(b.TempDir())
	cfg.Schema.Resolutions = nil // the default 10s:8d, 1m:35d, 1h:400d
	cfg.Aggregator = AggregatorConfig{WALDisabled: !wal}
	dial := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if secure {
		tc, token := benchSecure(b, &cfg)
		dial = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc)), grpc.WithPerRPCCredentials(publisher.BearerToken(token))}
	}
	n, err := Start(cfg, "bench", nil)
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	conn, err := grpc.NewClient("passthrough:///"+n.GRPCAddr(), dial...)
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

// BenchmarkQueryHTTP asks an all-in-one node over HTTP on loopback for
// sum by (datacenter) (rate(requests_total[1m])) over its last 15 minutes
// at 15s steps, as a Grafana panel does, with 60,000 events of 300 hosts
// and 50 transactions in the store: in plain text, and over TLS with a
// bearer token, once on kept-alive connections (Grafana's case) and once
// on a new connection, with its handshake, for every query. One op is one
// query.
func BenchmarkQueryHTTP(b *testing.B) {
	for _, c := range []struct {
		name          string
		secure, fresh bool
	}{{"tls=false", false, false}, {"tls=true", true, false}, {"tls=true/new-connection", true, true}} {
		b.Run(c.name, func(b *testing.B) { benchQueryHTTP(b, c.secure, c.fresh) })
	}
}

func benchQueryHTTP(b *testing.B, secure, fresh bool) {
	cfg := testConfig(b.TempDir())
	transport := &http.Transport{}
	scheme, authorization := "http", ""
	var dial []grpc.DialOption
	if secure {
		tc, token := benchSecure(b, &cfg)
		transport.TLSClientConfig = tc
		scheme, authorization = "https", "Bearer "+token
		dial = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc)), grpc.WithPerRPCCredentials(publisher.BearerToken(token))}
	}
	transport.DisableKeepAlives = fresh
	n, err := Start(cfg, "bench", nil)
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	now := time.Now()
	var total float64
	for i := range 12 {
		var batch wire.Batch
		for _, e := range benchEvents(benchBatch) {
			batch.Add("requests", now.Add(-time.Duration(i)*time.Minute).UnixMilli(), e.value, "datacenter", e.dc, "cluster", e.cluster, "host", e.host, "transaction", e.txn, "status", e.status)
			total += e.value
		}
		if resp, err := pushBenchBatch(n, batch.Request(), dial); err != nil || resp.Accepted != benchBatch {
			b.Fatalf("push: %v, %v", resp, err)
		}
	}
	client := &http.Client{Transport: transport}
	get := func(q url.Values) string {
		code, body, err := fetch(client, scheme+"://"+n.HTTPAddr()+"/api/v1/query_range?"+q.Encode(), authorization)
		if err != nil || code != http.StatusOK {
			b.Fatalf("HTTP %d %s: %v", code, body, err)
		}
		return body
	}
	end := now.Truncate(time.Minute).Add(time.Minute)
	sumQuery := url.Values{"query": {"sum(sum_over_time(requests_delta[20m]))"}, "start": {strconv.FormatInt(end.Unix(), 10)}, "end": {strconv.FormatInt(end.Unix(), 10)}, "step": {"15"}}
	want := `"` + strconv.FormatFloat(total, 'f', -1, 64) + `"`
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(get(sumQuery), want) {
		if time.Now().After(deadline) {
			b.Fatalf("the store never held the %v events pushed", total)
		}
		time.Sleep(100 * time.Millisecond)
	}
	q := url.Values{"query": {"sum by (datacenter) (rate(requests_total[1m]))"},
		"start": {strconv.FormatInt(end.Add(-15*time.Minute).Unix(), 10)}, "end": {strconv.FormatInt(end.Unix(), 10)}, "step": {"15"}}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		get(q)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
}

// pushBenchBatch pushes one batch to n's public port.
func pushBenchBatch(n *Node, req *wirepb.PushRequest, dial []grpc.DialOption) (*wirepb.PushResponse, error) {
	if dial == nil {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	conn, err := grpc.NewClient("passthrough:///"+n.GRPCAddr(), dial...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return wirepb.NewIngestClient(conn).Push(context.Background(), req)
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

// BenchmarkOTLPIngest takes the events of BenchmarkIngest into an
// all-in-one node with its write-ahead log (the default), four requests in
// flight over loopback: natively (Push of a dictionary-encoded batch), as
// OTLP over gRPC, and as OTLP/HTTP (protobuf, marshalled per request as an
// exporter does). An OTLP request holds the same 5,000 events as a batch,
// as an SDK would send them: one resource a host (datacenter, cluster,
// host.name), each with a delta sum of data points with http.route and
// http.response.status_code. One op is one request; allocs/point counts
// the whole process's, client and node.
func BenchmarkOTLPIngest(b *testing.B) {
	events := benchEvents(16 * benchBatch)
	now := time.Now()
	for _, mode := range []string{"push", "otlp-grpc", "otlp-http"} {
		b.Run(mode, func(b *testing.B) {
			cfg := testConfig(b.TempDir())
			cfg.Schema.Resolutions = nil
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
			var send func(i int) error
			switch mode {
			case "push":
				reqs := make([]*wirepb.PushRequest, 16)
				for i := range reqs {
					var batch wire.Batch
					for _, e := range events[i*benchBatch : (i+1)*benchBatch] {
						batch.Add("requests", now.UnixMilli(), e.value, "datacenter", e.dc, "cluster", e.cluster, "host", e.host, "transaction", e.txn, "status", e.status)
					}
					reqs[i] = batch.Request()
				}
				client := wirepb.NewIngestClient(conn)
				send = func(i int) error {
					resp, err := client.Push(context.Background(), reqs[i%len(reqs)])
					if err == nil && resp.Accepted != benchBatch {
						err = fmt.Errorf("accepted %d of %d", resp.Accepted, benchBatch)
					}
					return err
				}
			case "otlp-grpc":
				reqs := otlpRequests(events, now)
				client := colmetricspb.NewMetricsServiceClient(conn)
				send = func(i int) error {
					resp, err := client.Export(context.Background(), reqs[i%len(reqs)])
					if err == nil && resp.PartialSuccess != nil {
						err = fmt.Errorf("partial success: %v", resp.PartialSuccess)
					}
					return err
				}
			case "otlp-http":
				reqs := otlpRequests(events, now)
				url := "http://" + n.HTTPAddr() + "/v1/metrics"
				send = func(i int) error {
					body, err := proto.Marshal(reqs[i%len(reqs)])
					if err != nil {
						return err
					}
					resp, err := http.Post(url, "application/x-protobuf", bytes.NewReader(body))
					if err != nil {
						return err
					}
					defer resp.Body.Close()
					data, err := io.ReadAll(resp.Body)
					var out colmetricspb.ExportMetricsServiceResponse
					if err == nil {
						err = proto.Unmarshal(data, &out)
					}
					if err == nil && (resp.StatusCode != http.StatusOK || out.PartialSuccess != nil) {
						err = fmt.Errorf("HTTP %d: %v", resp.StatusCode, out.PartialSuccess)
					}
					return err
				}
			}
			var next atomic.Int64
			var before, after runtime.MemStats
			b.ReportAllocs()
			b.SetParallelism(2) // 2 x GOMAXPROCS requests in flight
			runtime.ReadMemStats(&before)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := send(int(next.Add(1))); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			runtime.ReadMemStats(&after)
			points := float64(b.N * benchBatch)
			b.ReportMetric(points/b.Elapsed().Seconds(), "points/s")
			b.ReportMetric(float64(after.Mallocs-before.Mallocs)/points, "allocs/point")
		})
	}
}

// otlpRequests turns events into 16 export requests of benchBatch data
// points each, every host's points under a resource of its own.
func otlpRequests(events []benchEvent, at time.Time) []*colmetricspb.ExportMetricsServiceRequest {
	str := func(k, v string) *commonpb.KeyValue {
		return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: v}}}
	}
	out := make([]*colmetricspb.ExportMetricsServiceRequest, 16)
	for i := range out {
		byHost := map[string]*metricspb.Sum{}
		req := &colmetricspb.ExportMetricsServiceRequest{}
		for _, e := range events[i*benchBatch : (i+1)*benchBatch] {
			s := byHost[e.host]
			if s == nil {
				s = &metricspb.Sum{AggregationTemporality: metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA, IsMonotonic: true}
				byHost[e.host] = s
				req.ResourceMetrics = append(req.ResourceMetrics, &metricspb.ResourceMetrics{
					Resource: &resourcepb.Resource{Attributes: []*commonpb.KeyValue{str("service.name", "checkout"), str("datacenter", e.dc), str("cluster", e.cluster), str("host.name", e.host)}},
					ScopeMetrics: []*metricspb.ScopeMetrics{{Scope: &commonpb.InstrumentationScope{Name: "bench"},
						Metrics: []*metricspb.Metric{{Name: "requests", Unit: "{request}", Data: &metricspb.Metric_Sum{Sum: s}}}}},
				})
			}
			status, _ := strconv.ParseInt(e.status, 10, 64)
			s.DataPoints = append(s.DataPoints, &metricspb.NumberDataPoint{
				StartTimeUnixNano: uint64(at.Add(-10 * time.Second).UnixNano()), TimeUnixNano: uint64(at.UnixNano()),
				Value: &metricspb.NumberDataPoint_AsInt{AsInt: int64(e.value)},
				Attributes: []*commonpb.KeyValue{str("http.route", e.txn),
					{Key: "http.response.status_code", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: status}}}},
			})
		}
		out[i] = req
	}
	return out
}

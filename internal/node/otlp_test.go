package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/resource"
	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// deltaTemporality is the temporality selector that OTLP into dimsum
// needs: delta for every instrument.
func deltaTemporality(sdkmetric.InstrumentKind) metricdata.Temporality {
	return metricdata.DeltaTemporality
}

// producer is a program instrumented with the OpenTelemetry SDK: a meter
// provider on a resource, exporting through exp when flushed.
type producer struct {
	mp       *sdkmetric.MeterProvider
	requests metric.Int64Counter
}

func newProducer(t *testing.T, exp sdkmetric.Exporter, res ...attribute.KeyValue) *producer {
	t.Helper()
	mp := sdkmetric.NewMeterProvider(
		sdkmetric.WithResource(resource.NewSchemaless(append(res, attribute.String("service.name", "checkout"))...)),
		// Exports only when flushed: the test decides when.
		sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp, sdkmetric.WithInterval(time.Hour))))
	t.Cleanup(func() { mp.Shutdown(context.Background()) })
	c, err := mp.Meter("dimsum.test").Int64Counter("requests", metric.WithUnit("{request}"))
	if err != nil {
		t.Fatal(err)
	}
	return &producer{mp: mp, requests: c}
}

// add counts n requests of route answered with status.
func (p *producer) add(n int64, route string, status int) {
	p.requests.Add(context.Background(), n, metric.WithAttributes(attribute.String("http.route", route), attribute.Int("http.response.status_code", status)))
}

func (p *producer) flush(t *testing.T) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return p.mp.ForceFlush(ctx)
}

// sliceSums asks for the exact sums of requests over the last hour by
// host, transaction and status, keyed "host route status".
func sliceSums(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	code, r := get(t, addr, "/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"host,transaction,status"}, "since": {"1h"}})
	if code != http.StatusOK {
		t.Fatalf("slice: HTTP %d %s", code, r.Error)
	}
	var s struct {
		Groups []struct {
			Labels map[string]string  `json:"labels"`
			Values map[string]float64 `json:"values"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(r.Data, &s); err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, g := range s.Groups {
		out[g.Labels["host"]+" "+g.Labels["transaction"]+" "+g.Labels["status"]] = g.Values["sum"]
	}
	return out
}

// TestOTLPFromTheSDK runs two programs instrumented with the OpenTelemetry
// Go SDK against a real node, one exporting over gRPC, one over HTTP with
// gzip, both with delta temporality; each records counters with
// attributes and exports twice. The totals per host, route and status
// read back exactly through PromQL and the slice API. A third program,
// left at the SDK's default cumulative temporality, is refused with the
// reason, and so are a metric the schema lacks and a data point without
// a dimension; none of them counts.
func TestOTLPFromTheSDK(t *testing.T) {
	n, err := Start(testConfig(t.TempDir()), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last first: the producers shut down before the node.
	t.Cleanup(func() { n.Close() })
	ctx := context.Background()

	grpcExp, err := otlpmetricgrpc.New(ctx, otlpmetricgrpc.WithEndpoint(n.GRPCAddr()), otlpmetricgrpc.WithInsecure(),
		otlpmetricgrpc.WithTemporalitySelector(deltaTemporality))
	if err != nil {
		t.Fatal(err)
	}
	httpExp, err := otlpmetrichttp.New(ctx, otlpmetrichttp.WithEndpoint(n.HTTPAddr()), otlpmetrichttp.WithInsecure(),
		otlpmetrichttp.WithTemporalitySelector(deltaTemporality), otlpmetrichttp.WithCompression(otlpmetrichttp.GzipCompression))
	if err != nil {
		t.Fatal(err)
	}
	site := func(cluster, host string) []attribute.KeyValue {
		return []attribute.KeyValue{attribute.String("datacenter", "dc1"), attribute.String("k8s.cluster.name", "ignored"),
			attribute.String("cluster", cluster), attribute.String("host.name", host)}
	}
	overGRPC := newProducer(t, grpcExp, site("dc1-c1", "dc1-c1-h1")...)
	overHTTP := newProducer(t, httpExp, site("dc1-c2", "dc1-c2-h7")...)

	want := map[string]float64{}
	record := func(p *producer, host string, n int64, route string, status int) {
		p.add(n, route, status)
		want[fmt.Sprintf("%s %s %d", host, route, status)] += float64(n)
	}
	for round := range 2 {
		for i := range 5 {
			record(overGRPC, "dc1-c1-h1", int64(i+round+1), "/checkout", 200)
			record(overGRPC, "dc1-c1-h1", 2, "/search", 500)
			record(overHTTP, "dc1-c2-h7", int64(3*i+round), "/checkout", 200)
			record(overHTTP, "dc1-c2-h7", 1, "/cart", 404)
		}
		if err := overGRPC.flush(t); err != nil {
			t.Fatalf("gRPC export %d: %v", round, err)
		}
		if err := overHTTP.flush(t); err != nil {
			t.Fatalf("HTTP export %d: %v", round, err)
		}
	}

	// Refused: cumulative temporality, an unknown metric, a missing
	// dimension. Each export says why, and counts nothing.
	cumExp, err := otlpmetricgrpc.New(ctx, otlpmetricgrpc.WithEndpoint(n.GRPCAddr()), otlpmetricgrpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	cumulative := newProducer(t, cumExp, site("dc1-c1", "dc1-c1-h2")...)
	cumulative.add(100, "/checkout", 200)
	if err := cumulative.flush(t); err == nil || !strings.Contains(err.Error(), `1 of 1 data points rejected: 1 cumulative (metric "requests": temporality CUMULATIVE is not taken, only delta`) {
		t.Errorf("a cumulative export: %v", err)
	}
	unknown, err := overHTTP.mp.Meter("dimsum.test").Float64Counter("queue.wait", metric.WithUnit("s"))
	if err != nil {
		t.Fatal(err)
	}
	unknown.Add(ctx, 1.5)
	overHTTP.requests.Add(ctx, 7, metric.WithAttributes(attribute.String("http.route", "/checkout")))
	err = overHTTP.flush(t)
	for _, msg := range []string{"2 of 2 data points rejected", `1 unknown_family (metric "queue.wait": unknown family "queue_wait_seconds")`,
		`1 missing_dimension (metric "requests": label "status" of family "requests" is missing)`} {
		if err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("an export of an unknown metric and a missing dimension: %v, want it to say %q", err, msg)
		}
	}

	var total float64
	for _, v := range want {
		total += v
	}
	at := time.Now().Truncate(time.Minute).Add(time.Minute)
	const sumQuery = "sum(sum_over_time(requests_delta[1h]))"
	waitFor(t, "the exports to be queryable", func() bool { return vector(t, n.HTTPAddr(), sumQuery, at, "")[""] == total })
	// One series a cell, labelled "host transaction status" as want is.
	byCell := vector(t, n.HTTPAddr(), `label_join(sum by (host, transaction, status) (sum_over_time(requests_delta[1h])), "cell", " ", "host", "transaction", "status")`, at, "cell")
	if fmt.Sprint(byCell) != fmt.Sprint(want) {
		t.Errorf("PromQL by host, transaction and status:\n%v\nwant\n%v", byCell, want)
	}
	if got := sliceSums(t, n.HTTPAddr()); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("slice by host, transaction and status:\n%v\nwant\n%v", got, want)
	}
	// The family's cumulative view is named as Prometheus names the
	// metric: requests_total.
	if got := vector(t, n.HTTPAddr(), `count(requests_total)`, at, "")[""]; got != float64(len(want)) {
		t.Errorf("count(requests_total) = %v, want %d series", got, len(want))
	}
}

// TestOTLPBadInput sends a real node what no SDK would: a request that
// does not decode, over gRPC and HTTP, and a NaN; each gets its precise
// error and none changes what is counted.
func TestOTLPBadInput(t *testing.T) {
	n, err := Start(testConfig(t.TempDir()), "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	garbage := []byte("\x0a\xff\xff\xff\xff\x0f")
	resp, err := http.Post("http://"+n.HTTPAddr()+"/v1/metrics", "application/x-protobuf", bytes.NewReader(garbage))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(body, []byte("the request is not an ExportMetricsServiceRequest")) {
		t.Errorf("HTTP: %d %q, want 400", resp.StatusCode, body)
	}

	conn, err := grpc.NewClient(n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var out colmetricspb.ExportMetricsServiceResponse
	err = conn.Invoke(ctx, "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", garbage, &out, grpc.ForceCodec(rawBytes{}))
	if st := grpcstatus.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "the request is not an ExportMetricsServiceRequest") {
		t.Errorf("gRPC: %v, want InvalidArgument", err)
	}

	kv := func(k, v string) *commonpb.KeyValue {
		return &commonpb.KeyValue{Key: k, Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: v}}}
	}
	nan := &metricspb.NumberDataPoint{
		TimeUnixNano: uint64(time.Now().UnixNano()), Value: &metricspb.NumberDataPoint_AsDouble{AsDouble: math.NaN()},
		Attributes: []*commonpb.KeyValue{kv("datacenter", "dc1"), kv("cluster", "c"), kv("host", "h"), kv("transaction", "t"), kv("status", "200")},
	}
	sum := &metricspb.Sum{IsMonotonic: true, AggregationTemporality: metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA,
		DataPoints: []*metricspb.NumberDataPoint{nan}}
	req := &colmetricspb.ExportMetricsServiceRequest{ResourceMetrics: []*metricspb.ResourceMetrics{{ScopeMetrics: []*metricspb.ScopeMetrics{{
		Metrics: []*metricspb.Metric{{Name: "requests", Data: &metricspb.Metric_Sum{Sum: sum}}},
	}}}}}
	exp, err := colmetricspb.NewMetricsServiceClient(conn).Export(ctx, req)
	if err != nil || exp.GetPartialSuccess().GetRejectedDataPoints() != 1 ||
		exp.GetPartialSuccess().GetErrorMessage() != `1 of 1 data points rejected: 1 not_finite (metric "requests": value NaN is not finite)` {
		t.Errorf("NaN: %v, %v", exp, err)
	}
	if got := sliceSums(t, n.HTTPAddr()); len(got) != 0 {
		t.Errorf("counted %v, want nothing", got)
	}
}

// rawBytes sends a []byte as the message, as it is.
type rawBytes struct{}

func (rawBytes) Marshal(v any) ([]byte, error)      { return v.([]byte), nil }
func (rawBytes) Unmarshal(data []byte, v any) error { return proto.Unmarshal(data, v.(proto.Message)) }
func (rawBytes) Name() string                       { return "proto" }

// TestOTLPCredentials runs a node with credentials: an export needs the
// push right, over gRPC as over HTTP, as a push does.
func TestOTLPCredentials(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(filepath.Join(dir, "data"))
	cfg.Auth.CredentialsFile = credentialsFile(t, filepath.Join(dir, "credentials.yaml"),
		tokenLine("pipeline", "push-token", "push"), tokenLine("grafana", "query-token", "query"))
	n, err := Start(cfg, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	ctx := context.Background()
	for _, tc := range []struct {
		token, want string // want: what the export's error says; "" none
	}{
		{"", "Unauthenticated"}, {"query-token", "PermissionDenied"}, {"push-token", ""},
	} {
		headers := map[string]string{}
		if tc.token != "" {
			headers["Authorization"] = "Bearer " + tc.token
		}
		grpcExp, err := otlpmetricgrpc.New(ctx, otlpmetricgrpc.WithEndpoint(n.GRPCAddr()), otlpmetricgrpc.WithInsecure(),
			otlpmetricgrpc.WithTemporalitySelector(deltaTemporality), otlpmetricgrpc.WithHeaders(headers), otlpmetricgrpc.WithRetry(otlpmetricgrpc.RetryConfig{}))
		if err != nil {
			t.Fatal(err)
		}
		httpExp, err := otlpmetrichttp.New(ctx, otlpmetrichttp.WithEndpoint(n.HTTPAddr()), otlpmetrichttp.WithInsecure(),
			otlpmetrichttp.WithTemporalitySelector(deltaTemporality), otlpmetrichttp.WithHeaders(headers), otlpmetrichttp.WithRetry(otlpmetrichttp.RetryConfig{}))
		if err != nil {
			t.Fatal(err)
		}
		httpWant := map[string]string{"Unauthenticated": "401", "PermissionDenied": "403"}[tc.want]
		for _, p := range []struct {
			exp  sdkmetric.Exporter
			want string
		}{{grpcExp, tc.want}, {httpExp, httpWant}} {
			pr := newProducer(t, p.exp, attribute.String("datacenter", "dc1"), attribute.String("cluster", "c"), attribute.String("host.name", "h"))
			pr.add(1, "/a", 200)
			err := pr.flush(t)
			if (p.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), p.want) {
				t.Errorf("token %q: export %v, want %q", tc.token, err, p.want)
			}
		}
	}
}

// TestOTLPCluster exports to one aggregator of a cluster the counts of
// hosts that two aggregators own: the one that takes the export forwards
// each host's events to its owner, as it does a push's, and every count
// reads back exactly from the other member.
func TestOTLPCluster(t *testing.T) {
	c1 := member(t, "c1", nil)
	c2 := member(t, "c2", c1)
	waitFor(t, "c2 to see two members", func() bool { return len(states(t, c2)) == 2 })

	exp, err := otlpmetrichttp.New(context.Background(), otlpmetrichttp.WithEndpoint(c1.HTTPAddr()), otlpmetrichttp.WithInsecure(),
		otlpmetrichttp.WithTemporalitySelector(deltaTemporality))
	if err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, exp, attribute.String("datacenter", "dc1"), attribute.String("cluster", "dc1-c1"))
	want, total := map[string]float64{}, 0.0
	for h := range 20 {
		host := fmt.Sprintf("dc1-c1-h%02d", h)
		p.requests.Add(context.Background(), int64(h+1), metric.WithAttributes(attribute.String("host.name", host),
			attribute.String("http.route", "/checkout"), attribute.Int("http.response.status_code", 200)))
		want[host+" /checkout 200"] = float64(h + 1)
		total += float64(h + 1)
	}
	if err := p.flush(t); err != nil {
		t.Fatal(err)
	}
	if got := metricValue(t, c1.HTTPAddr(), `dimsum_aggregator_forwarded_events_total{outcome="queued"}`); got == 0 || got == 20 {
		t.Fatalf("%v of 20 events forwarded, want some but not all: the hosts must have two owners", got)
	}
	// A window's cells travel as one flush per shard, each to its replicas
	// on its own, so the apex may be whole before every host is: wait for
	// both, and say what the slice held if it never is.
	at := time.Now().Truncate(time.Minute).Add(time.Minute)
	var got map[string]float64
	defer func() {
		if t.Failed() {
			t.Logf("slice by host:\n%v\nwant\n%v", got, want)
		}
	}()
	waitFor(t, "the export to be queryable", func() bool {
		got = sliceSums(t, c2.HTTPAddr())
		return vector(t, c2.HTTPAddr(), "sum(sum_over_time(requests_delta[1h]))", at, "")[""] == total &&
			fmt.Sprint(got) == fmt.Sprint(want)
	})
}

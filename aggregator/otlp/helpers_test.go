package otlp_test

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/aggregator/otlp"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// testSchema has the default family, whose renames feed host, transaction
// and status from the semantic conventions' attributes, and two more: one
// fed by a listed metric, one whose name holds a unit suffix.
const testSchema = `
otlp: {attributes: {k8s.cluster.name: cluster}}
families:
  - name: requests
    dimensions: [datacenter/cluster/host, transaction, status]
    otlp: {attributes: {host.name: host, http.route: transaction, http.response.status_code: status}}
  - name: jobs
    dimensions: [queue]
    otlp: {metrics: [worker.jobs.done]}
  - name: sent_bytes
    dimensions: [peer]
`

// now is the clock of every aggregator of these tests.
var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// nopSink drops every flush: these tests look at what the Push path
// takes, not at the store.
type nopSink struct{}

func (nopSink) Shards() int                                      { return 1 }
func (nopSink) Replicas(uint32) []string                         { return []string{"c"} }
func (nopSink) Flush(context.Context, string, *wire.Flush) error { return nil }

// recorder is the Push path of a test: it keeps a copy of every batch and
// its reply, and passes the batch to a real aggregator, or fails with err.
type recorder struct {
	agg *aggregator.Aggregator
	err error

	mu      sync.Mutex
	batches []*wirepb.PushRequest
	replies []*wirepb.PushResponse
}

func (r *recorder) Push(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	if r.err != nil {
		return nil, r.err
	}
	resp, err := r.agg.Push(req)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.batches = append(r.batches, proto.Clone(req).(*wirepb.PushRequest))
	r.replies = append(r.replies, resp)
	return resp, err
}

// events returns the events of every batch pushed, each as
// family{labels sorted} value @ms before the test clock.
func (r *recorder) events() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, b := range r.batches {
		for _, e := range b.Events {
			var labels []string
			for i := 0; i+1 < len(e.Labels); i += 2 {
				labels = append(labels, b.Dict[e.Labels[i]]+"="+b.Dict[e.Labels[i+1]])
			}
			sort.Strings(labels)
			out = append(out, fmt.Sprintf("%s{%s} %v @-%dms", b.Dict[e.Family], strings.Join(labels, ","), e.Value, now.UnixMilli()-e.TimestampMs))
		}
	}
	return out
}

// newReceiver returns a receiver over a real aggregator of the test schema
// (with opts' limits) on the test clock, and the recorder between them.
func newReceiver(t testing.TB, opts aggregator.Options) (*otlp.Receiver, *recorder) {
	t.Helper()
	s, err := schema.Parse([]byte(testSchema))
	if err != nil {
		t.Fatal(err)
	}
	opts.Schema, opts.Sink, opts.Now = s, nopSink{}, func() time.Time { return now }
	a, err := aggregator.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	rec := &recorder{agg: a}
	r, err := otlp.New(otlp.Options{Schema: s, Push: rec})
	if err != nil {
		t.Fatal(err)
	}
	return r, rec
}

// attrs builds key-values from pairs: a string, int64, float64 or bool
// value each, or a []string for an array.
func attrs(kv ...any) []*commonpb.KeyValue {
	var out []*commonpb.KeyValue
	for i := 0; i < len(kv); i += 2 {
		v := &commonpb.AnyValue{}
		switch x := kv[i+1].(type) {
		case string:
			v.Value = &commonpb.AnyValue_StringValue{StringValue: x}
		case int:
			v.Value = &commonpb.AnyValue_IntValue{IntValue: int64(x)}
		case float64:
			v.Value = &commonpb.AnyValue_DoubleValue{DoubleValue: x}
		case bool:
			v.Value = &commonpb.AnyValue_BoolValue{BoolValue: x}
		case []string:
			arr := &commonpb.ArrayValue{}
			for _, s := range x {
				arr.Values = append(arr.Values, &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: s}})
			}
			v.Value = &commonpb.AnyValue_ArrayValue{ArrayValue: arr}
		}
		out = append(out, &commonpb.KeyValue{Key: kv[i].(string), Value: v})
	}
	return out
}

// point is a data point at the test clock less ago, of an int (as_int)
// or a float64 (as_double) value; nil sets neither.
func point(ago time.Duration, value any, kv ...any) *metricspb.NumberDataPoint {
	at := uint64(now.Add(-ago).UnixNano())
	p := &metricspb.NumberDataPoint{StartTimeUnixNano: at - 10e9, TimeUnixNano: at, Attributes: attrs(kv...)}
	if v, isInt := value.(int); isInt {
		p.Value = &metricspb.NumberDataPoint_AsInt{AsInt: int64(v)}
	} else if v, isFloat := value.(float64); isFloat {
		p.Value = &metricspb.NumberDataPoint_AsDouble{AsDouble: v}
	}
	return p
}

// deltaSum is a delta monotonic sum.
func deltaSum(name, unit string, points ...*metricspb.NumberDataPoint) *metricspb.Metric {
	return sum(name, unit, metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA, true, points...)
}

func sum(name, unit string, temp metricspb.AggregationTemporality, monotonic bool, points ...*metricspb.NumberDataPoint) *metricspb.Metric {
	return &metricspb.Metric{Name: name, Unit: unit, Data: &metricspb.Metric_Sum{Sum: &metricspb.Sum{
		AggregationTemporality: temp, IsMonotonic: monotonic, DataPoints: points}}}
}

// request puts metrics under one resource and one scope.
func request(res, scope []*commonpb.KeyValue, metrics ...*metricspb.Metric) *colmetricspb.ExportMetricsServiceRequest {
	return &colmetricspb.ExportMetricsServiceRequest{ResourceMetrics: []*metricspb.ResourceMetrics{{
		Resource:     &resourcepb.Resource{Attributes: res},
		ScopeMetrics: []*metricspb.ScopeMetrics{{Scope: &commonpb.InstrumentationScope{Name: "test", Attributes: scope}, Metrics: metrics}},
	}}}
}

// host is the resource of a producer on dc1-c1-h1.
func host() []*commonpb.KeyValue {
	return attrs("service.name", "checkout", "telemetry.sdk.language", "go", "datacenter", "dc1", "k8s.cluster.name", "dc1-c1", "host.name", "dc1-c1-h1")
}

var nan = math.NaN()

package otlp_test

import (
	"math"
	"testing"
	"time"

	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/aggregator"
)

// FuzzExport decodes arbitrary bytes as an export request and exports
// what decodes into a real aggregator: Export must never panic nor fail,
// and must account for every data point once, counted by the Push path or
// rejected in the partial success, whose message is there exactly when
// something was rejected.
func FuzzExport(f *testing.F) {
	r, rec := newReceiver(f, aggregator.Options{})
	for _, req := range []*colmetricspb.ExportMetricsServiceRequest{
		good(),
		request(host(), attrs("datacenter", "dc2", "scope.bytes", []string{"x"}),
			deltaSum("requests", "{request}", point(time.Second, 3, "http.route", "/a", "http.response.status_code", 200, "extra", true)),
			deltaSum("jobs.total", "", point(0, math.Inf(1), "queue", "q"), point(0, nil, "queue", 1.5)),
			deltaSum("worker.jobs.done", "", point(3*time.Hour, -4, "queue", "q")),
			deltaSum("sent", "By", point(0, 1<<53+1, "peer", "p"), &metricspb.NumberDataPoint{Flags: 1})),
		request(nil, nil,
			sum("requests", "", metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_CUMULATIVE, true, point(0, 1)),
			sum("jobs", "", metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA, false, point(0, 1)),
			&metricspb.Metric{Name: "h", Data: &metricspb.Metric_Histogram{Histogram: &metricspb.Histogram{DataPoints: []*metricspb.HistogramDataPoint{{}}}}},
			&metricspb.Metric{Name: "g", Data: &metricspb.Metric_Gauge{Gauge: &metricspb.Gauge{DataPoints: []*metricspb.NumberDataPoint{{}}}}},
			&metricspb.Metric{Name: ""}),
	} {
		data, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("\x0a\xff\xff\xff\xff\x0f"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var req colmetricspb.ExportMetricsServiceRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		rec.mu.Lock()
		rec.replies = nil
		rec.mu.Unlock()
		resp, err := r.Export(&req)
		if err != nil {
			t.Fatalf("export: %v", err)
		}
		var accepted uint64
		for _, rp := range rec.replies {
			accepted += rp.Accepted
		}
		ps := resp.GetPartialSuccess()
		if got, want := accepted+uint64(ps.GetRejectedDataPoints()), points(&req); got != want {
			t.Errorf("%d counted and %d rejected, want %d in all", accepted, ps.GetRejectedDataPoints(), want)
		}
		if (ps.GetRejectedDataPoints() > 0) != (ps.GetErrorMessage() != "") {
			t.Errorf("partial success %v: a message exactly when something is rejected", ps)
		}
	})
}

// points counts the data points of req that must be counted or rejected:
// all but a delta monotonic sum's points that mark no recorded value.
func points(req *colmetricspb.ExportMetricsServiceRequest) uint64 {
	var n uint64
	for _, rm := range req.GetResourceMetrics() {
		for _, sm := range rm.GetScopeMetrics() {
			for _, m := range sm.GetMetrics() {
				switch d := m.GetData().(type) {
				case *metricspb.Metric_Sum:
					counted := d.Sum.GetIsMonotonic() && d.Sum.GetAggregationTemporality() == metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA
					for _, p := range d.Sum.GetDataPoints() {
						if !counted || p.GetFlags()&uint32(metricspb.DataPointFlags_DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK) == 0 {
							n++
						}
					}
				case *metricspb.Metric_Gauge:
					n += uint64(len(d.Gauge.GetDataPoints()))
				case *metricspb.Metric_Histogram:
					n += uint64(len(d.Histogram.GetDataPoints()))
				case *metricspb.Metric_ExponentialHistogram:
					n += uint64(len(d.ExponentialHistogram.GetDataPoints()))
				case *metricspb.Metric_Summary:
					n += uint64(len(d.Summary.GetDataPoints()))
				}
			}
		}
	}
	return n
}

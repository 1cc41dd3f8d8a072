package otlp_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"

	"github.com/dimsum/dimsum/aggregator"
)

// TestExport maps requests onto the Push path of a real aggregator: what
// becomes which event, and what is refused with which reason.
func TestExport(t *testing.T) {
	delta := metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA
	cumulative := metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_CUMULATIVE
	ok := func(route string, status int) []any {
		return []any{"http.route", route, "http.response.status_code", status}
	}
	for _, tc := range []struct {
		name string
		req  *colmetricspb.ExportMetricsServiceRequest
		// events are what the Push path gets; rejected and message what
		// the partial success says (no message: none).
		events   []string
		rejected int64
		message  string
	}{
		{
			name: "resource, scope and data point attributes",
			req: request(host(), attrs("datacenter", "dc2"),
				deltaSum("requests", "{request}", point(time.Second, 3, ok("/checkout", 200)...), point(2*time.Second, 1.5, ok("/search", 404)...))),
			events: []string{
				"requests{cluster=dc1-c1,datacenter=dc2,host=dc1-c1-h1,status=200,transaction=/checkout} 3 @-1000ms",
				"requests{cluster=dc1-c1,datacenter=dc2,host=dc1-c1-h1,status=404,transaction=/search} 1.5 @-2000ms",
			},
		},
		{
			name:   "a data point attribute over the resource's",
			req:    request(host(), nil, deltaSum("requests", "", point(time.Second, 1, append(ok("/a", 500), "host.name", "h9")...))),
			events: []string{"requests{cluster=dc1-c1,datacenter=dc1,host=h9,status=500,transaction=/a} 1 @-1000ms"},
		},
		{
			name: "names translated: _total, the unit and a listed metric",
			req: request(nil, nil,
				deltaSum("jobs_total", "", point(0, 1, "queue", "q1")),
				deltaSum("worker.jobs.done", "1", point(0, 2, "queue", "q2")),
				deltaSum("sent", "By", point(0, 4096, "peer", "p", "ignored.bool", true)),
				deltaSum("sent", "By", point(0, 1, "peer", 2.5)),
			),
			events: []string{"jobs{queue=q1} 1 @-0ms", "jobs{queue=q2} 2 @-0ms", "sent_bytes{ignored_bool=true,peer=p} 4096 @-0ms", "sent_bytes{peer=2.5} 1 @-0ms"},
			// An attribute that feeds no label of the family is refused,
			// as a pushed label that is not a dimension is.
			rejected: 1,
			message:  `1 of 4 data points rejected: 1 unknown_dimension (metric "sent": label "ignored_bool" is not a dimension of family "sent_bytes")`,
		},
		{
			name:     "unknown metric",
			req:      request(host(), nil, deltaSum("http.server.active", "", point(0, 1))),
			events:   []string{"http_server_active{} 1 @-0ms"},
			rejected: 1,
			message:  `1 of 1 data points rejected: 1 unknown_family (metric "http.server.active": unknown family "http_server_active")`,
		},
		{
			name:     "missing attribute",
			req:      request(host(), nil, deltaSum("requests", "", point(0, 1, "http.route", "/a"))),
			events:   []string{"requests{cluster=dc1-c1,datacenter=dc1,host=dc1-c1-h1,transaction=/a} 1 @-0ms"},
			rejected: 1,
			message:  `1 of 1 data points rejected: 1 missing_dimension (metric "requests": label "status" of family "requests" is missing)`,
		},
		{
			name:     "two attributes of one label",
			req:      request(host(), nil, deltaSum("requests", "", point(0, 1, append(ok("/a", 200), "status", "201")...))),
			events:   []string{"requests{cluster=dc1-c1,datacenter=dc1,host=dc1-c1-h1,status=200,status=201,transaction=/a} 1 @-0ms"},
			rejected: 1,
			message:  `1 of 1 data points rejected: 1 duplicate_dimension (metric "requests": label "status" appears twice)`,
		},
		{
			name: "values the Push path refuses",
			req: request(host(), nil, deltaSum("requests", "",
				point(0, nan, ok("/a", 200)...), point(0, -1, ok("/a", 200)...), point(2*time.Hour, 1, ok("/a", 200)...),
				point(0, 1<<53+1, ok("/a", 200)...), point(0, 1<<53, ok("/b", 200)...))),
			rejected: 4,
			message: `4 of 5 data points rejected: 1 not_finite (metric "requests": value NaN is not finite); ` +
				`1 negative_delta (metric "requests": counter delta -1 is negative); ` +
				`1 too_old (metric "requests": timestamp 2026-03-01T10:00:00Z is older than the maximum lateness 1h0m0s); ` +
				`1 value_too_large (metric "requests": value 9.007199254740994e+15 is beyond 2^53, past which sums of counts are no longer exact)`,
		},
		{
			name: "kinds and temporalities that are not counted",
			req: request(host(), nil,
				sum("requests", "", cumulative, true, point(0, 5, ok("/a", 200)...), point(0, 6, ok("/a", 200)...)),
				sum("requests", "", delta, false, point(0, 5, ok("/a", 200)...)),
				sum("requests", "", metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_UNSPECIFIED, true, point(0, 5, ok("/a", 200)...)),
				&metricspb.Metric{Name: "latency", Data: &metricspb.Metric_Histogram{Histogram: &metricspb.Histogram{DataPoints: []*metricspb.HistogramDataPoint{{}, {}}}}},
				&metricspb.Metric{Name: "latency", Data: &metricspb.Metric_ExponentialHistogram{ExponentialHistogram: &metricspb.ExponentialHistogram{DataPoints: []*metricspb.ExponentialHistogramDataPoint{{}}}}},
				&metricspb.Metric{Name: "queue.depth", Data: &metricspb.Metric_Gauge{Gauge: &metricspb.Gauge{DataPoints: []*metricspb.NumberDataPoint{{}}}}},
				&metricspb.Metric{Name: "rpc.latency", Data: &metricspb.Metric_Summary{Summary: &metricspb.Summary{DataPoints: []*metricspb.SummaryDataPoint{{}}}}},
				&metricspb.Metric{Name: "empty"},
			),
			rejected: 9,
			message: `9 of 9 data points rejected: ` +
				`3 cumulative (metric "requests": temporality CUMULATIVE is not taken, only delta: set the exporter's temporality preference to delta, or convert with the Collector's cumulativetodelta processor); ` +
				`1 non_monotonic (metric "requests": a non-monotonic sum (an UpDownCounter) is not a counter; a family counts the deltas of a monotonic sum); ` +
				`3 histogram (metric "latency": histograms need a distribution family, not yet supported); ` +
				`1 gauge (metric "queue.depth": gauges are not counted: a family counts the deltas of a monotonic sum); ` +
				`1 summary (metric "rpc.latency": summaries are not counted: their quantiles do not add up; send a histogram once distribution families exist)`,
		},
		{
			name: "values that are not label values, and points without a value",
			req: request(append(host(), attrs("transaction", []string{"x"})...), nil,
				deltaSum("requests", "", point(0, 1, "http.response.status_code", 200, "http.route", []string{"a", "b"}),
					point(0, 1, "http.response.status_code", 200), point(0, nil, ok("/a", 200)...),
					&metricspb.NumberDataPoint{Flags: uint32(metricspb.DataPointFlags_DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK)})),
			rejected: 3,
			message: `3 of 3 data points rejected: 2 bad_attribute (metric "requests": attribute "http.route" has an array value; a dimension takes a string, integer, boolean or double); ` +
				`1 no_value (metric "requests": a data point has neither as_int nor as_double)`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, rec := newReceiver(t, aggregator.Options{})
			resp, err := r.Export(tc.req)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := strings.Join(rec.events(), "\n"), strings.Join(tc.events, "\n"); got != want && tc.events != nil {
				t.Errorf("events:\n%s\nwant:\n%s", got, want)
			}
			ps := resp.GetPartialSuccess()
			if ps.GetRejectedDataPoints() != tc.rejected || ps.GetErrorMessage() != tc.message {
				t.Errorf("partial success %d %q\nwant %d %q", ps.GetRejectedDataPoints(), ps.GetErrorMessage(), tc.rejected, tc.message)
			}
			if tc.rejected == 0 && ps != nil {
				t.Errorf("a partial success %v for a request counted whole", ps)
			}
		})
	}
}

// TestExportCardinalityLimit checks that the Push path's limits apply to
// OTLP data points as they do to pushed events.
func TestExportCardinalityLimit(t *testing.T) {
	r, _ := newReceiver(t, aggregator.Options{MaxCellsPerWindow: 2})
	var points []*metricspb.NumberDataPoint
	for i := range 5 {
		points = append(points, point(0, 1, "queue", fmt.Sprintf("q%d", i)))
	}
	resp, err := r.Export(request(nil, nil, deltaSum("jobs", "", points...)))
	if err != nil {
		t.Fatal(err)
	}
	want := `3 of 5 data points rejected: 3 cardinality_limit (metric "jobs": family "jobs" has 2 cells in this window, the limit)`
	if ps := resp.GetPartialSuccess(); ps.GetRejectedDataPoints() != 3 || ps.GetErrorMessage() != want {
		t.Errorf("partial success %v, want 3 %q", ps, want)
	}
}

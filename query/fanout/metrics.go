package fanout

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	partial  prometheus.Counter
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		partial: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_query_partial_answers_total",
			Help: "Queries answered without some shards of the cube, which no replica answered for.",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_query_fanout_requests_total",
			Help: "Read requests to combiners, by replica and outcome: ok, failed (unreachable, timed out or a bad reply), refused (invalid request) or canceled (the query ended).",
		}, []string{"replica", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "dimsum_query_fanout_request_duration_seconds",
			Help:    "Time a read request to a combiner took, streams read whole, by method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"method"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.partial, m.requests, m.duration} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

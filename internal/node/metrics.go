package node

import (
	"context"
	"net/http"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	grpcstatus "google.golang.org/grpc/status"
)

// serverMetrics count the requests the node's HTTP and gRPC servers answer,
// by route or method and by outcome, as Prometheus' own
// prometheus_http_requests_total does for its handlers.
type serverMetrics struct {
	httpRequests *prometheus.CounterVec
	httpDuration *prometheus.HistogramVec
	grpcRequests *prometheus.CounterVec
	grpcDuration *prometheus.HistogramVec
}

func newServerMetrics(reg prometheus.Registerer, version string) *serverMetrics {
	m := &serverMetrics{
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_http_requests_total",
			Help: "HTTP requests answered, by the route that served them (the mux pattern; \"none\" when none matched) and status code.",
		}, []string{"handler", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "dimsum_http_request_duration_seconds",
			Help:    "Time to answer an HTTP request, by route.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 8),
		}, []string{"handler"}),
		grpcRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_grpc_requests_total",
			Help: "gRPC calls answered, by server (public or internal), method and status code. Calls refused for their credential are counted by dimsum_auth_requests_total.",
		}, []string{"server", "method", "code"}),
		grpcDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "dimsum_grpc_request_duration_seconds",
			Help:    "Time to answer a gRPC call, by server and method.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 8),
		}, []string{"server", "method"}),
	}
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "dimsum_build_info",
		Help:        "Always 1; the labels say which dimsum this is.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	info.Set(1)
	reg.MustRegister(m.httpRequests, m.httpDuration, m.grpcRequests, m.grpcDuration, info)
	return m
}

// instrumentHTTP counts every request h answers under the pattern mux
// routes it to.
func (m *serverMetrics) instrumentHTTP(mux *http.ServeMux, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, pattern := mux.Handler(r)
		if pattern == "" {
			pattern = "none"
		}
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(rec, r)
		m.httpRequests.WithLabelValues(pattern, strconv.Itoa(rec.code)).Inc()
		m.httpDuration.WithLabelValues(pattern).Observe(time.Since(start).Seconds())
	})
}

// statusRecorder keeps the status code a handler writes.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.code = code
	r.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the writer's Flush and
// deadlines (pprof's profiles set them).
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// grpcOptions are the interceptors that count the calls of the server
// named server.
func (m *serverMetrics) grpcOptions(server string) []grpc.ServerOption {
	observe := func(method string, start time.Time, err error) {
		m.grpcRequests.WithLabelValues(server, method, grpcstatus.Code(err).String()).Inc()
		m.grpcDuration.WithLabelValues(server, method).Observe(time.Since(start).Seconds())
	}
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := h(ctx, req)
			observe(info.FullMethod, start, err)
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			start := time.Now()
			err := h(srv, ss)
			observe(info.FullMethod, start, err)
			return err
		}),
	}
}

// Package otlp takes OpenTelemetry metrics (OTLP, over gRPC and HTTP) into
// the aggregator's Push path, so that any OpenTelemetry SDK or Collector
// can feed dimsum with no client of its own.
//
// Each export request becomes one batch: a delta monotonic Sum's data
// points become counter events of the family the metric feeds, their
// labels taken from the data point's, the scope's and the resource's
// attributes as the schema's otlp sections rename them (docs/otlp.md).
// The Push path checks, counts and logs the batch as it does a pushed one,
// so an acknowledged export is as durable as an acknowledged push, and in
// a cluster the Router forwards each event to its owner. Every data point
// is counted or refused; the refused ones are counted, with their reasons,
// in the response's partial success. Other kinds of metrics, cumulative
// and non-monotonic sums are refused with their reason.
//
//	r, err := otlp.New(otlp.Options{Schema: s, Push: agg})
//	if err != nil { ... }
//	r.Register(grpcServer)              // opentelemetry.proto.collector.metrics.v1.MetricsService/Export
//	mux.Handle("POST "+otlp.Path, r)    // OTLP/HTTP, protobuf, gzip or not
package otlp

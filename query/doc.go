// Package query answers PromQL over the cube: the Prometheus HTTP API
// (query, query_range, labels, label values, series, metadata, the status
// endpoints, and empty answers where dimsum has nothing, in Prometheus'
// shapes; see docs/grafana.md) served by the Prometheus engine over
// Queryable, a storage.Queryable that synthesizes series from the stored
// deltas. The planner's rewrites are the table testdata/plan.
//
// Each cell of a family's finest cuboid is visible as two series: name_total,
// a cumulative counter for rate() and increase(), and name_delta, the exact
// count of each step. See docs/architecture.md for where samples stand and
// why the running total starts where it does.
//
//	api, err := query.NewAPI(query.Options{Schema: s, Reader: db})
//	if err != nil { ... }
//	api.Register(mux) // serves /api/v1/...
//
// Every query reads through a View that a Source opens for it. A node
// holding the whole cube gives its store as the Reader, which is its own
// view; a query node of a cluster gives a Source instead (package
// query/fanout), whose views read each shard from one combiner and may
// answer partially, with warnings.
package query

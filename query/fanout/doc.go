// Package fanout reads the global cube of a cluster from the combiners that
// hold its shards, for the query layer: it is a query.Source.
//
// The cube is split into shards (schema.Shard), each held by several
// combiners, its replicas. Cell IDs are local to one combiner's store, so a
// query reads each shard's cells and their steps from the same replica: the
// replica a shard's first read answered from is kept for the rest of the
// query (query.View). The cell IDs a view hands to the query layer carry the
// shard in their high bits and the combiner's own ID below.
//
// A replica that fails (unreachable, timed out, or an answer that does not
// make sense) before any of its data was used is replaced by the next one of
// the shard. A shard with no replica left is missing: with a partial answer
// allowed, the query answers from every other shard and warns which shards
// are missing; otherwise it fails with query.ErrUnavailable. So does a
// query while the topology knows of events that no combiner holds yet
// (Gap): those waiting for an aggregator that is down or behind.
//
//	r, err := fanout.New(fanout.Options{Schema: s, Topology: topo})
//	if err != nil { ... }
//	api, err := query.NewAPI(query.Options{Schema: s, Source: r})
package fanout

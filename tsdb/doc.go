// Package tsdb keeps dimsum's global cube in Pebble: for every resolution of
// the schema, the per-step sum and event count of every cell of every
// materialized cuboid, plus the dictionaries that name those cells.
//
// Combiners write with Apply, which turns a partial cube into Pebble merge
// operands in one atomic, fsynced batch: ingest never reads a row, and a
// retried batch with the same idempotency key is applied once. Queries list
// cells with Cells, which evaluates Prometheus label matchers, and read their
// steps with Steps.
//
//	db, err := tsdb.Open(tsdb.Options{Dir: dir, Schema: schema.Default()})
//	if err != nil { ... }
//	defer db.Close()
//
//	finest := schema.Default().Family("requests").Finest()
//	_, err = db.Apply([]byte("agg-1/window-42/seq-7"), windowStart, []tsdb.Delta{{
//		Family: "requests", Cuboid: finest.ID,
//		Values: []string{"dc1", "c1", "h1", "GET /", "200"},
//		Time:   windowStart, Sum: 7, Count: 3,
//	}})
//
//	cells, err := db.Cells("requests", finest.ID, []*labels.Matcher{
//		labels.MustNewMatcher(labels.MatchEqual, "datacenter", "dc1"),
//	})
//	for _, c := range cells {
//		steps, err := db.Steps(0, "requests", finest.ID, c.ID, mint, maxt, nil)
//		...
//	}
//
// The on-disk layout (key kinds, the row encoding, the format version and
// the merge operator's name) is described byte by byte in
// docs/format/tsdb.md; the code refers to it where it encodes or decodes.
package tsdb

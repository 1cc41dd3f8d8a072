// Package tsdb keeps dimsum's global cube in Pebble: for every resolution of
// the schema, the per-step sum and event count of every cell of every
// materialized cuboid, plus the dictionaries that name those cells.
//
// Combiners write with Apply, which logs a partial cube in one atomic,
// fsynced Pebble batch and adds it to the head, the open rows of the finest
// resolution held in memory; a writer writes each row once its span closes,
// into every resolution at once, as Pebble merge operands: ingest never
// reads a row, and a retried batch with the same BatchID is applied once.
// Memory is bounded by Options.HeadMaxBytes, past which Apply waits for the
// writer. Reads see the head and Pebble together. Queries list
// cells with Cells, which evaluates Prometheus label matchers on Roaring
// postings, read the steps of one cell with Steps or of many cells of a
// cuboid in one pass with Scan, and serve label names and values with
// LabelNames and LabelValues. A periodic retention pass (RunRetention)
// deletes expired rows with range deletions and forgets the cells left
// without data.
//
//	db, err := tsdb.Open(tsdb.Options{Dir: dir, Schema: schema.Default()})
//	if err != nil { ... }
//	defer db.Close()
//
//	finest := schema.Default().Family("requests").Finest()
//	_, err = db.Apply(tsdb.BatchID{Source: "agg-1", Seq: 7}, []tsdb.Delta{{
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
//	// Every cell of the cuboid over the last hour, one callback per cell.
//	err = db.Scan(0, "requests", finest.ID, nil, now-3600e3, now, func(cell uint32, steps []tsdb.Step) error {
//		...
//	})
//
// The on-disk layout (key kinds and their order, postings, presence, the
// head and its staged batches, the row encoding, the format version,
// retention and what memory holds) is described byte by byte in
// docs/format/tsdb.md; the code refers to it where it encodes or decodes.
package tsdb

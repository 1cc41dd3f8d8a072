// Package aggregator is the first stage of dimsum's ingest path. It validates
// each pushed event against the schema, rolls it up in memory into every
// cuboid of its family's lattice for the window the event falls in, and once
// the window's grace period has passed flushes the window's partial cube to a
// combiner.
//
// Events later than the grace period still count: they reopen their window,
// which goes out in the next flush as a late delta under a new sequence
// number, up to MaxLateness. Every flush carries the identity (source, window,
// sequence), so a combiner applies a retried flush once.
//
//	a, err := aggregator.New(aggregator.Options{Schema: s, Sink: sink})
//	if err != nil { ... }
//	defer a.Close() // flushes every window, open or not
//	resp, err := a.Push(req) // resp.Rejects lists each refused event
//
// A window's cells are split by shard of the global cube, and each request
// is delivered to every replica of its shard on that replica's own queue, so
// a replica that is down holds up no other (hinted handoff).
//
// In a cluster, a Router serves Ingest: the aggregator that receives a batch
// counts the events it owns and logs the others as one part per owning
// aggregator (PushRouted), acknowledges the batch, and then delivers each
// part from the same per-destination queues through Options.Peers; the owner
// counts it with PushForwarded, once per batch identity. Keys are owned by
// the aggregators that did not leave, alive or dead, so a crash moves none.
//
// With Options.WALDir, a batch is acknowledged once it is fsynced in the
// write-ahead log, and so are its forwarded parts, the cuts, the flush
// requests and their deliveries: a restart after a crash rebuilds the cube
// and the dedupe state and sends again what no replica or owner confirmed, under the same identities (see
// docs/format/wal.md). Without it, a crash loses what was not yet flushed.
package aggregator

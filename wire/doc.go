// Package wire is dimsum's protobuf/gRPC contract between publishers,
// aggregators and combiners, and the helpers every side uses to build and
// read its messages.
//
// The messages and services are defined in wirepb/dimsum.proto and generated
// into package wirepb. A publisher builds a batch with a Batch, which
// dictionary-encodes dimension strings, and pushes it:
//
//	var b wire.Batch
//	b.Add("requests", time.Now().UnixMilli(), 1,
//		"datacenter", "dc1", "cluster", "c1", "host", "h1",
//		"transaction", "checkout", "status", "200")
//	resp, err := wirepb.NewIngestClient(conn).Push(ctx, b.Request())
//
// Field numbers and enum values are append-only: they are the protocol.
package wire

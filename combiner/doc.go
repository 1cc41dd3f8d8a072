// Package combiner merges the partial cubes that aggregators flush into the
// global cube, persisting each flush into every resolution of the store in one
// atomic write.
//
// A flush is identified by (source, window, sequence); the store records the
// identity in the same write as the data, so a flush retried after a lost
// acknowledgement is applied once.
//
//	c, err := combiner.New(combiner.Options{Store: db, Schema: s})
//	if err != nil { ... }
//	c.Register(grpcServer) // serves dimsum.wire.v1.Combiner/Flush
package combiner

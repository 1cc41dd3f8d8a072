// Package publisher is the client a log pipeline uses to push counter events
// to dimsum.
//
// A Publisher serves one destination: a list of nodes, of which it uses one
// and fails over to the next when an attempt fails. Add puts events into a
// bounded ring buffer; senders cut it into batches of BatchEvents, or
// smaller once the oldest event has waited Linger, and push them over gRPC,
// gzip-compressed. When the buffer is full the Policy decides: Block makes
// Add wait (back-pressure), DropHead drops the oldest buffered event,
// DropTail the new one. Every outcome is counted (Stats, and Prometheus
// metrics when a Registerer is given).
//
// Transient failures (Unavailable, DeadlineExceeded, Aborted) are retried
// with backoff, failing over to the next node after each. Every batch carries an identity, the publisher's Source and a
// sequence, so a node that counted an attempt whose reply was lost
// acknowledges the retry without counting it again. Events the node rejects,
// one by one or as a whole batch (InvalidArgument), are never retried.
//
//	p, err := publisher.New(publisher.Options{Addrs: []string{"10.0.0.1:9400", "10.0.0.2:9400"}})
//	if err != nil { ... }
//	err = p.Add(ctx, publisher.Event{
//		Family: "requests", TimestampMS: time.Now().UnixMilli(), Value: 1,
//		Labels: []string{"datacenter", "dc1", "cluster", "c1", "host", "h1",
//			"transaction", "checkout", "status", "200"},
//	})
//	...
//	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
//	defer cancel()
//	err = p.Close(ctx) // sends what is buffered; wraps ErrUnsent with what it could not
//
// See docs/publisher.md for the policies, the metrics and the guarantees.
package publisher

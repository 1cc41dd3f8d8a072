package aggregator

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// forwardedKey is the gRPC metadata key that marks a batch one aggregator
// forwarded to another. Its receiver counts it without routing it again,
// so two nodes that briefly disagree on ownership never bounce a batch. It
// means something only on the internal listener (RegisterInternal), which
// in a secure cluster only members reach; a public one refuses it.
const forwardedKey = "dimsum-forwarded"

// forwarded reports whether a call carries the forwarded marker.
func forwarded(ctx context.Context) bool {
	md, ok := metadata.FromIncomingContext(ctx)
	return ok && len(md.Get(forwardedKey)) > 0
}

// RouterOptions configure a Router.
type RouterOptions struct {
	// Local takes every batch: it counts the events this node owns and
	// forwards the others through its outbox. It must have Options.Peers.
	// Required.
	Local *Aggregator
	// Owner names the aggregator that owns a partition key (see
	// schema.PartitionKey); Self is this node's name. Required.
	//
	// Owner must choose among the aggregators that did not leave the
	// cluster, alive or dead, so that a crash moves no key: a dead owner's
	// parts wait in the other aggregators' outboxes until it is back, and
	// its log's dedupe state then counts a part it may already have taken
	// once. Only a join or a leave moves keys.
	Owner func(key uint64) string
	Self  string
}

// Router serves Ingest for a node of a cluster. It takes each batch whole
// (Aggregator.PushRouted): it checks the batch's identity once, counts the
// events this node owns, and logs the others, split by the owner of each
// event's partition key, as parts to forward under the batch's identity.
// It acknowledges the batch once all of that is on this node's disk; each
// part then goes to its owner from the outbox, retried until the owner
// takes it, across restarts of either node. An owner counts a part once
// however often it arrives. See docs/architecture.md for what a retry of a
// batch through another aggregator counts.
type Router struct {
	opts RouterOptions
}

// NewRouter builds a router.
func NewRouter(opts RouterOptions) (*Router, error) {
	if opts.Local == nil || opts.Owner == nil || opts.Self == "" {
		return nil, fmt.Errorf("%w: a router needs a local aggregator, an owner function and its own name", ErrOptions)
	}
	if opts.Local.opts.Peers == nil {
		return nil, fmt.Errorf("%w: a router's aggregator needs Peers to forward parts to their owners", ErrOptions)
	}
	return &Router{opts: opts}, nil
}

// Register serves Ingest through the router on s, a public listener, for
// publishers: a batch marked as forwarded is refused (ErrNotInternal).
func (r *Router) Register(s *grpc.Server) {
	wirepb.RegisterIngestServer(s, ingestServer{push: func(_ context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
		return r.Push(req)
	}})
}

// RegisterInternal serves Ingest through the router on s, the cluster's
// internal listener, where the other aggregators deliver the parts they
// forward.
func (r *Router) RegisterInternal(s *grpc.Server) {
	wirepb.RegisterIngestServer(s, ingestServer{push: r.serve, internal: true})
}

// serve counts a batch another aggregator forwarded here as it is, and
// routes one from a publisher.
func (r *Router) serve(ctx context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	if forwarded(ctx) {
		return r.opts.Local.PushForwarded(req)
	}
	return r.Push(req)
}

// Push takes one batch from a publisher. The owner of each valid event is
// read from its family and partition levels, as the validation resolved
// them.
func (r *Router) Push(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	return r.opts.Local.PushRouted(req, func(f *schema.Family, partition []string) string {
		if owner := r.opts.Owner(schema.PartitionKey(f.Name, partition)); owner != r.opts.Self {
			return owner
		}
		return ""
	})
}

// PeerClients is Peers over gRPC: it returns an Ingest client of the named
// aggregator, and Forward marks each request as forwarded so that the
// owner's Router counts it without routing it again.
type PeerClients func(name string) (wirepb.IngestClient, error)

// Forward sends one part to its owner.
func (p PeerClients) Forward(ctx context.Context, owner string, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	c, err := p(owner)
	if err != nil {
		return nil, fmt.Errorf("aggregator %s: %w", owner, err)
	}
	resp, err := c.Push(metadata.AppendToOutgoingContext(ctx, forwardedKey, "1"), req)
	if err != nil {
		return nil, fmt.Errorf("aggregator %s: %w", owner, err)
	}
	return resp, nil
}

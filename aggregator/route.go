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
// so two nodes that briefly disagree on ownership never bounce a batch.
const forwardedKey = "dimsum-forwarded"

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
	opts     RouterOptions
	families map[string]*schema.Family
}

// NewRouter builds a router.
func NewRouter(opts RouterOptions) (*Router, error) {
	if opts.Local == nil || opts.Owner == nil || opts.Self == "" {
		return nil, fmt.Errorf("%w: a router needs a local aggregator, an owner function and its own name", ErrOptions)
	}
	if opts.Local.opts.Peers == nil {
		return nil, fmt.Errorf("%w: a router's aggregator needs Peers to forward parts to their owners", ErrOptions)
	}
	r := &Router{opts: opts, families: map[string]*schema.Family{}}
	for _, f := range opts.Local.opts.Schema.Families {
		r.families[f.Name] = f
	}
	return r, nil
}

// Register serves Ingest through the router on s.
func (r *Router) Register(s *grpc.Server) {
	wirepb.RegisterIngestServer(s, routeServer{r: r})
}

type routeServer struct {
	wirepb.UnimplementedIngestServer
	r *Router
}

func (s routeServer) Push(ctx context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	var resp *wirepb.PushResponse
	var err error
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(forwardedKey)) > 0 {
		resp, err = s.r.opts.Local.PushForwarded(req)
	} else {
		resp, err = s.r.Push(req)
	}
	if err != nil {
		return nil, grpcError(err)
	}
	return resp, nil
}

// Push takes one batch from a publisher. The owner function runs only for
// the events that passed validation (a bad reference, an unknown family or
// a missing level is rejected with its reason first), so their partition
// key can be read; one that could not would be counted here.
func (r *Router) Push(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	values := make([]string, schema.MaxLevels)
	return r.opts.Local.PushRouted(req, func(i int) string {
		key, ok := r.partitionKey(req.Dict, req.Events[i], values)
		if !ok {
			return ""
		}
		if owner := r.opts.Owner(key); owner != r.opts.Self {
			return owner
		}
		return ""
	})
}

// partitionKey reads an event's family and the values of its partition
// levels; ok is false when the event is malformed.
func (r *Router) partitionKey(dict []string, e *wirepb.Event, values []string) (uint64, bool) {
	if int(e.Family) >= len(dict) {
		return 0, false
	}
	f := r.families[dict[e.Family]]
	if f == nil {
		return 0, false
	}
	levels := f.PartitionLevels()
	values = values[:levels]
	found := 0
	for i := 0; i+1 < len(e.Labels); i += 2 {
		n, v := e.Labels[i], e.Labels[i+1]
		if int(n) >= len(dict) || int(v) >= len(dict) {
			return 0, false
		}
		if s, ok := f.LabelIndex(dict[n]); ok && s < levels {
			values[s] = dict[v]
			found++
		}
	}
	if found != levels {
		return 0, false
	}
	return schema.PartitionKey(f.Name, values), true
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

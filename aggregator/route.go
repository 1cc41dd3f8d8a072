package aggregator

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

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
	// cluster, alive or dead, so that a brief crash moves no key: a dead
	// owner's parts wait in the other aggregators' outboxes until it is
	// back, and its log's dedupe state then counts a part it may already
	// have taken once. Keys move at a join or a leave, and when a dead
	// owner is handed over: then Owner no longer names it, and HandOver
	// moves what waits for it.
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
	registerIngest(s, ingestServer{push: func(_ context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
		return r.Push(req)
	}})
}

// RegisterInternal serves Ingest through the router on s, the cluster's
// internal listener, where the other aggregators deliver the parts they
// forward.
func (r *Router) RegisterInternal(s *grpc.Server) {
	registerIngest(s, ingestServer{push: r.serve, internal: true})
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
	return r.opts.Local.PushRouted(req, r.owner)
}

// PeerClients is Peers over gRPC: it returns an Ingest client of the named
// aggregator, and Forward marks each request as forwarded so that the
// owner's Router counts it without routing it again.
type PeerClients func(name string) (wirepb.IngestClient, error)

// Forward sends one part to its owner. A call that failed before gRPC
// opened a stream to the owner (no connection: the owner is down, or has
// no known address) never left this node, and its error wraps ErrNotSent.
func (p PeerClients) Forward(ctx context.Context, owner string, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	c, err := p(owner)
	if err != nil {
		return nil, fmt.Errorf("aggregator %s: %w: %w", owner, ErrNotSent, err)
	}
	// gRPC fills in the peer only for a call that had a stream on a
	// connection to it.
	var at peer.Peer
	resp, err := c.Push(metadata.AppendToOutgoingContext(ctx, forwardedKey, "1"), req, grpc.Peer(&at))
	if err != nil && at.Addr == nil {
		return nil, fmt.Errorf("aggregator %s: %w: %w", owner, ErrNotSent, err)
	}
	if err != nil {
		return nil, fmt.Errorf("aggregator %s: %w", owner, err)
	}
	return resp, nil
}

// forwards gathers the events of a batch that other aggregators own: per
// owner, a batch of their own events with a dictionary of the strings they
// use and the publisher's identity, as an outbox entry addressed to it.
type forwards struct {
	entries  []*entry
	byOwner  map[string]*forwardPart
	events   int
	received int64 // when the batch was received, unix ms
}

type forwardPart struct {
	req   *wirepb.PushRequest
	remap map[uint32]uint32 // batch dictionary index -> index in req.Dict
}

// add puts event i of batch into owner's part.
func (f *forwards) add(owner string, batch *wirepb.PushRequest, i int) {
	if f.byOwner == nil {
		f.byOwner = map[string]*forwardPart{}
	}
	p := f.byOwner[owner]
	if p == nil {
		p = &forwardPart{req: &wirepb.PushRequest{Source: batch.Source, BatchSeq: batch.BatchSeq, ReceivedMs: f.received}, remap: map[uint32]uint32{}}
		f.byOwner[owner] = p
		f.entries = append(f.entries, &entry{kind: entryForward, dests: []string{owner}, push: p.req})
	}
	e := batch.Events[i]
	fe := &wirepb.Event{Family: p.ref(batch.Dict, e.Family), Labels: make([]uint32, len(e.Labels)), TimestampMs: e.TimestampMs, Value: e.Value}
	for j, l := range e.Labels {
		fe.Labels[j] = p.ref(batch.Dict, l)
	}
	p.req.Events = append(p.req.Events, fe)
	f.events++
}

// ref returns the index in the part's dictionary of the batch's string d.
func (p *forwardPart) ref(dict []string, d uint32) uint32 {
	if x, ok := p.remap[d]; ok {
		return x
	}
	x := uint32(len(p.req.Dict))
	p.req.Dict = append(p.req.Dict, dict[d])
	p.remap[d] = x
	return x
}

package aggregator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// forwardedKey is the gRPC metadata key that marks a batch one aggregator
// forwarded to another. Its receiver counts it without routing it again,
// so two nodes that briefly disagree on ownership never bounce a batch.
const forwardedKey = "dimsum-forwarded"

// RouterOptions configure a Router.
type RouterOptions struct {
	// Local counts the events this node owns. Required.
	Local *Aggregator
	// Owner names the aggregator that owns a partition key (see
	// schema.PartitionKey); Self is this node's name. Required.
	Owner func(key uint64) string
	Self  string
	// Peer returns a client of the named aggregator. Required.
	Peer func(name string) (wirepb.IngestClient, error)
	// Registerer registers the router's metrics. nil registers none.
	Registerer prometheus.Registerer
}

// Router serves Ingest for a node of a cluster. It splits each batch by the
// owner of each event's partition key, counts its own part locally and
// forwards every other part to its owner, all under the batch's identity,
// and acknowledges the batch once every part is acknowledged. An owner
// counts a part once however often it arrives, whichever aggregator
// forwarded it, so a publisher that retries a batch, here or at another
// aggregator, counts it once.
type Router struct {
	opts      RouterOptions
	families  map[string]*schema.Family
	forwarded *prometheus.CounterVec // events by outcome
}

// NewRouter builds a router.
func NewRouter(opts RouterOptions) (*Router, error) {
	if opts.Local == nil || opts.Owner == nil || opts.Peer == nil || opts.Self == "" {
		return nil, fmt.Errorf("%w: a router needs a local aggregator, an owner function, a peer function and its own name", ErrOptions)
	}
	r := &Router{opts: opts, families: map[string]*schema.Family{}}
	for _, f := range opts.Local.opts.Schema.Families {
		r.families[f.Name] = f
	}
	r.forwarded = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dimsum_aggregator_forwarded_events_total",
		Help: "Events forwarded to the aggregator that owns them, by outcome (ok, error).",
	}, []string{"outcome"})
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(r.forwarded)
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
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(forwardedKey)) > 0 {
		return s.r.local(req)
	}
	return s.r.Push(ctx, req)
}

func (r *Router) local(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	resp, err := r.opts.Local.Push(req)
	if err != nil {
		return nil, grpcError(err)
	}
	return resp, nil
}

// part is the events of a batch that one aggregator owns, with their
// indexes in the batch.
type part struct {
	owner   string
	index   []uint32
	events  []*wirepb.Event
	resp    *wirepb.PushResponse
	err     error
	forward bool
}

// Push routes one batch. Events whose partition key cannot be read (a bad
// reference, an unknown family, a missing level) stay local, where the
// aggregator rejects them with the precise reason.
func (r *Router) Push(ctx context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	if n := len(req.Events); n > r.opts.Local.opts.MaxBatchEvents {
		// Refused whole before any part is counted anywhere.
		return r.local(req)
	}
	parts := r.split(req)
	if len(parts) == 1 && !parts[0].forward {
		return r.local(req)
	}
	var wg sync.WaitGroup
	for _, p := range parts {
		if !p.forward {
			continue
		}
		wg.Go(func() {
			p.resp, p.err = r.forward(ctx, p.owner, p.request(req))
			outcome := "ok"
			if p.err != nil {
				outcome = "error"
			}
			r.forwarded.WithLabelValues(outcome).Add(float64(len(p.events)))
		})
	}
	if p := parts[0]; !p.forward {
		// The local part counts while the forwards are on their way.
		p.resp, p.err = r.local(p.request(req))
	}
	wg.Wait()

	resp := &wirepb.PushResponse{Duplicate: true}
	var errs []error
	for _, p := range parts {
		if p.err != nil {
			errs = append(errs, p.err)
			continue
		}
		resp.Accepted += p.resp.Accepted
		resp.Duplicate = resp.Duplicate && p.resp.Duplicate
		for _, rej := range p.resp.Rejects {
			if int(rej.Index) >= len(p.index) {
				errs = append(errs, fmt.Errorf("aggregator %s rejected event %d of a part of %d", p.owner, rej.Index, len(p.index)))
				continue
			}
			rej.Index = p.index[rej.Index]
			resp.Rejects = append(resp.Rejects, rej)
		}
	}
	if len(errs) > 0 {
		// The parts that were counted are remembered under the batch's
		// identity, so the publisher's retry counts only the rest.
		return nil, status.Error(codes.Unavailable, fmt.Sprintf("aggregator: part of the batch was not acknowledged: %v", errors.Join(errs...)))
	}
	slices.SortFunc(resp.Rejects, func(x, y *wirepb.Reject) int { return int(x.Index) - int(y.Index) })
	return resp, nil
}

// request is the part as a batch of its own, under the batch's identity.
func (p *part) request(batch *wirepb.PushRequest) *wirepb.PushRequest {
	return &wirepb.PushRequest{Dict: batch.Dict, Events: p.events, Source: batch.Source, BatchSeq: batch.BatchSeq}
}

// split groups the batch's events by owner, this node's part first.
func (r *Router) split(req *wirepb.PushRequest) []*part {
	byOwner := map[string]*part{}
	var parts []*part
	values := make([]string, 0, schema.MaxLevels)
	for i, e := range req.Events {
		owner := r.opts.Self
		if key, ok := r.partitionKey(req.Dict, e, values); ok {
			owner = r.opts.Owner(key)
		}
		p := byOwner[owner]
		if p == nil {
			p = &part{owner: owner, forward: owner != r.opts.Self}
			byOwner[owner] = p
			parts = append(parts, p)
		}
		p.index = append(p.index, uint32(i))
		p.events = append(p.events, e)
	}
	if local := slices.IndexFunc(parts, func(p *part) bool { return !p.forward }); local > 0 {
		parts[0], parts[local] = parts[local], parts[0]
	}
	return parts
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

func (r *Router) forward(ctx context.Context, owner string, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	c, err := r.opts.Peer(owner)
	if err != nil {
		return nil, fmt.Errorf("aggregator %s: %w", owner, err)
	}
	resp, err := c.Push(metadata.AppendToOutgoingContext(ctx, forwardedKey, r.opts.Self), req)
	if err != nil {
		return nil, fmt.Errorf("aggregator %s: %w", owner, err)
	}
	return resp, nil
}

package otlp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Pusher is the Push path a receiver feeds: an *aggregator.Aggregator for
// a node alone, an *aggregator.Router in a cluster, which forwards each
// event to the aggregator that owns it.
type Pusher interface {
	Push(*wirepb.PushRequest) (*wirepb.PushResponse, error)
}

// ErrOptions marks invalid Options.
var ErrOptions = errors.New("otlp: invalid options")

// Options configure a Receiver.
type Options struct {
	// Schema says which metric feeds which family and which attribute
	// which label. Required.
	Schema *schema.Schema
	// Push takes the batch each request becomes. Required.
	Push Pusher
	// MaxBodyBytes bounds the body of an OTLP/HTTP request, decompressed,
	// as the public gRPC listener bounds a message: a larger one gets 413.
	// The default is 16 MiB.
	MaxBodyBytes int
	// Logger receives what the receiver cannot answer a producer with. nil
	// discards.
	Logger *slog.Logger
	// Registerer registers the receiver's metrics. nil registers none.
	Registerer prometheus.Registerer
}

// EnsureDefaults fills the zero fields.
func (o *Options) EnsureDefaults() {
	if o.MaxBodyBytes == 0 {
		o.MaxBodyBytes = 16 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports the first field that cannot work.
func (o *Options) Validate() error {
	switch {
	case o.Schema == nil || o.Push == nil:
		return fmt.Errorf("%w: a receiver needs a schema and a Push path", ErrOptions)
	case o.MaxBodyBytes < 0:
		return fmt.Errorf("%w: MaxBodyBytes %d is negative", ErrOptions, o.MaxBodyBytes)
	}
	return nil
}

// Receiver takes OTLP metrics export requests, over gRPC (Register) and
// HTTP (ServeHTTP), and feeds them to the Push path as batches. It is safe
// for concurrent use.
type Receiver struct {
	opts  Options
	names *names
	// refused counts the data points refused before the Push path, by
	// reason; the aggregator counts the rest.
	refused *prometheus.CounterVec
}

// New builds a receiver.
func New(opts Options) (*Receiver, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	r := &Receiver{opts: opts, names: newNames()}
	r.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dimsum_otlp_data_points_refused_total",
		Help: "OTLP data points refused before the Push path, by reason: " + strings.Join(refusedReasons, ", ") + ". Those the Push path refuses are counted in dimsum_aggregator_events_rejected_total.",
	}, []string{"reason"})
	for _, reason := range refusedReasons {
		r.refused.WithLabelValues(reason)
	}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(r.refused)
	}
	return r, nil
}

// Export maps a request onto the Push path and pushes it as one batch.
// Every data point is either counted or refused: the response's partial
// success counts the refused ones and says why, by reason. An error is
// the Push path's, for the whole request (nothing of it was counted): map
// it with aggregator.GRPCError.
func (r *Receiver) Export(req *colmetricspb.ExportMetricsServiceRequest) (*colmetricspb.ExportMetricsServiceResponse, error) {
	b := batchPool.Get().(*batch)
	defer func() {
		b.reset()
		batchPool.Put(b)
	}()
	r.names.fill(r.opts.Schema, b, req.GetResourceMetrics())
	var pushed *wirepb.PushResponse
	if b.b.Len() > 0 {
		var err error
		if pushed, err = r.opts.Push.Push(b.b.Request()); err != nil {
			return nil, err
		}
	}
	for _, f := range b.refused {
		r.refused.WithLabelValues(f.reason).Add(float64(f.points))
	}
	return &colmetricspb.ExportMetricsServiceResponse{PartialSuccess: b.partial(pushed)}, nil
}

// maxReasons bounds the reasons one message lists; it ends with how many
// more there were.
const maxReasons = 8

// partial is the partial success of a request: nil when every data point
// was counted, else the number refused and a message that gives, per
// reason in the order met, how many and the first one's detail.
func (b *batch) partial(pushed *wirepb.PushResponse) *colmetricspb.ExportMetricsPartialSuccess {
	type group struct {
		reason, example string
		points          int
	}
	var groups []*group
	add := func(reason, metric, detail string, points int) {
		for _, g := range groups {
			if g.reason == reason {
				g.points += points
				return
			}
		}
		groups = append(groups, &group{reason: reason, points: points, example: fmt.Sprintf("metric %s: %s", aggregator.Quote(metric), detail)})
	}
	for _, f := range b.refused {
		add(f.reason, f.metric, f.detail, f.points)
	}
	for _, rj := range pushed.GetRejects() {
		add(wire.ReasonName(rj.Reason), b.metrics[rj.Index], rj.Detail, 1)
	}
	if len(groups) == 0 {
		return nil
	}
	var msg strings.Builder
	rejected := 0
	for i, g := range groups {
		rejected += g.points
		switch {
		case i < maxReasons:
			if i > 0 {
				msg.WriteString("; ")
			}
			fmt.Fprintf(&msg, "%d %s (%s)", g.points, g.reason, g.example)
		case i == maxReasons:
			fmt.Fprintf(&msg, "; and %d more reasons", len(groups)-maxReasons)
		}
	}
	return &colmetricspb.ExportMetricsPartialSuccess{
		RejectedDataPoints: int64(rejected),
		ErrorMessage:       fmt.Sprintf("%d of %d data points rejected: %s", rejected, b.points, msg.String()),
	}
}

// Register serves the OTLP metrics service on s, a public listener built
// with ServerOption.
func (r *Receiver) Register(s *grpc.Server) {
	desc := colmetricspb.MetricsService_ServiceDesc
	desc.Methods = []grpc.MethodDesc{{MethodName: "Export", Handler: exportHandler}}
	s.RegisterService(&desc, grpcService{r: r})
}

// grpcService serves Export over gRPC, mapping the Push path's errors to
// the statuses a publisher sees.
type grpcService struct {
	colmetricspb.UnimplementedMetricsServiceServer
	r *Receiver
}

// Export takes a request unless its caller is already gone; once taken,
// it runs to its reply, as Push does.
func (g grpcService) Export(ctx context.Context, req *colmetricspb.ExportMetricsServiceRequest) (*colmetricspb.ExportMetricsServiceResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	resp, err := g.r.Export(req)
	if err != nil {
		return nil, aggregator.GRPCError(err)
	}
	return resp, nil
}

// exportRequest is what the Export handler decodes a call into: the
// request and, with ServerOption's codec, the error decoding it met.
// Without that codec gRPC decodes the embedded request itself, and answers
// one that does not decode with Internal.
type exportRequest struct {
	*colmetricspb.ExportMetricsServiceRequest
	err error
}

// ServerOption is the codec a gRPC server that serves Export (Register)
// must be built with, so that a request that does not decode gets
// InvalidArgument, as OTLP says, not the Internal that gRPC gives (it
// answers a message that does not decode before any handler runs). It is
// wire.ServerCodec for every other message.
func ServerOption() grpc.ServerOption {
	return grpc.ForceServerCodecV2(serverCodec{wire.ServerCodec()})
}

type serverCodec struct{ encoding.CodecV2 }

func (c serverCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*exportRequest); ok {
		r.err = c.CodecV2.Unmarshal(data, r.ExportMetricsServiceRequest)
		return nil
	}
	return c.CodecV2.Unmarshal(data, v)
}

// exportHandler is the generated handler of Export, except that it
// decodes into an exportRequest.
func exportHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := &exportRequest{ExportMetricsServiceRequest: new(colmetricspb.ExportMetricsServiceRequest)}
	if err := dec(in); err != nil {
		return nil, err
	}
	if in.err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "the request is not an ExportMetricsServiceRequest: %v", in.err)
	}
	export := func(ctx context.Context, req any) (any, error) {
		return srv.(grpcService).Export(ctx, req.(*colmetricspb.ExportMetricsServiceRequest))
	}
	if interceptor == nil {
		return export(ctx, in.ExportMetricsServiceRequest)
	}
	return interceptor(ctx, in.ExportMetricsServiceRequest, &grpc.UnaryServerInfo{Server: srv, FullMethod: ExportMethod}, export)
}

// ExportMethod is the full gRPC method name of OTLP metrics export.
var ExportMethod = "/" + colmetricspb.MetricsService_ServiceDesc.ServiceName + "/Export"

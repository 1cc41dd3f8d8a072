package aggregator

import (
	"context"
	"errors"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	// Publishers compress batches with gzip; registering the codec lets
	// every server that serves Ingest accept them.
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/dimsum/dimsum/wire/wirepb"
)

// Register serves the aggregator's Ingest service on s, a public listener:
// a batch marked as forwarded is refused (ErrNotInternal).
func (a *Aggregator) Register(s *grpc.Server) {
	registerIngest(s, ingestServer{push: func(_ context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
		return a.Push(req)
	}})
}

// registerIngest serves Ingest on s with srv. Its Push handler is the
// generated one, except that it decodes each batch into a request an
// earlier batch was decoded into (pushRequests), whose events the codec
// reuses (wire.UnmarshalPush), and keeps it for the next once the call is
// over: nothing a push keeps refers to its request (the parts it forwards
// copy their events).
func registerIngest(s *grpc.Server, srv ingestServer) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: wirepb.Ingest_ServiceDesc.ServiceName,
		HandlerType: (*wirepb.IngestServer)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Push", Handler: pushHandler}},
		Metadata:    wirepb.Ingest_ServiceDesc.Metadata,
	}, srv)
}

var pushRequests = sync.Pool{New: func() any { return new(wirepb.PushRequest) }}

func pushHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := pushRequests.Get().(*wirepb.PushRequest)
	defer pushRequests.Put(in)
	if err := dec(in); err != nil {
		return nil, err
	}
	push := func(ctx context.Context, req any) (any, error) {
		return srv.(ingestServer).Push(ctx, req.(*wirepb.PushRequest))
	}
	if interceptor == nil {
		return push(ctx, in)
	}
	return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: wirepb.Ingest_Push_FullMethodName}, push)
}

// ingestServer serves Ingest with push, mapping its errors to the statuses
// a publisher sees. On a public listener (internal unset) it refuses a
// batch marked as forwarded before push sees it.
type ingestServer struct {
	wirepb.UnimplementedIngestServer
	push     func(context.Context, *wirepb.PushRequest) (*wirepb.PushResponse, error)
	internal bool
}

// Push takes a batch unless its caller is already gone. Once taken, it
// runs to the end whatever the caller does: its events are in the cube
// before the log's sync returns, so cutting the wait short would save no
// work, and a retry of the batch is a duplicate.
func (s ingestServer) Push(ctx context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	if !s.internal && forwarded(ctx) {
		return nil, GRPCError(ErrNotInternal)
	}
	resp, err := s.push(ctx, req)
	if err != nil {
		return nil, GRPCError(err)
	}
	return resp, nil
}

// retryDelay is how long a publisher refused for back-pressure is asked to
// wait before it tries again: the time for a few flushes to go out.
const retryDelay = 100 * time.Millisecond

// GRPCError maps an error of Push, PushRouted or PushForwarded to the status
// a publisher sees: every ingest protocol refuses a batch alike.
func GRPCError(err error) error {
	switch {
	case errors.Is(err, ErrBatchTooLarge):
		st, _ := status.New(codes.InvalidArgument, err.Error()).WithDetails(&errdetails.BadRequest{
			FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "events", Description: err.Error()}},
		})
		return st.Err()
	case errors.Is(err, ErrLogFull), errors.Is(err, ErrBehind), errors.Is(err, ErrDiskLow):
		// RetryInfo tells this back-pressure apart from gRPC's own
		// ResourceExhausted for a message over the size limit, which no
		// retry mends: a publisher retries the batch, after the delay it
		// says.
		st, _ := status.New(codes.ResourceExhausted, err.Error()).WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(retryDelay)})
		return st.Err()
	case errors.Is(err, ErrClosed), errors.Is(err, ErrLogFailed), errors.Is(err, ErrNotReady):
		// Nothing of the batch is known to be safe here: the publisher
		// retries it, on another node if it has one.
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, ErrNotInternal):
		return status.Error(codes.PermissionDenied, err.Error())
	default:
		return status.Error(codes.Internal, err.Error())
	}
}

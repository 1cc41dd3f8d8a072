package otlp

import (
	"compress/gzip"
	"io"
	"math"
	"mime"
	"net/http"
	"strconv"

	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/aggregator"
)

// Path is where OTLP/HTTP exporters send metrics.
const Path = "/v1/metrics"

const (
	protobufType = "application/x-protobuf"
	jsonType     = "application/json"
)

// ServeHTTP takes an OTLP/HTTP export request: a POST of a protobuf
// ExportMetricsServiceRequest, plain or with Content-Encoding gzip. It
// answers 200 with an ExportMetricsServiceResponse (its partial success
// says what was refused), or with a google.rpc.Status: 400 for a body that
// does not decode, 413 for one over MaxBodyBytes, 415 for OTLP/JSON or an
// unknown encoding, and the Push path's refusals as OTLP/HTTP exporters
// read them: 429 or 503 with Retry-After for what a retry may mend, 400
// for a batch over the event limit.
func (r *Receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeStatus(w, false, http.StatusMethodNotAllowed, status.New(codes.Unimplemented, "OTLP export is a POST"))
		return
	}
	ct, _, _ := mime.ParseMediaType(req.Header.Get("Content-Type"))
	switch ct {
	case protobufType:
	case jsonType:
		writeStatus(w, true, http.StatusUnsupportedMediaType, status.New(codes.InvalidArgument,
			"OTLP/JSON is not supported: send Content-Type application/x-protobuf (the OTLP/HTTP exporters' default encoding)"))
		return
	default:
		writeStatus(w, false, http.StatusUnsupportedMediaType, status.Newf(codes.InvalidArgument,
			"Content-Type %q is not supported: send application/x-protobuf", req.Header.Get("Content-Type")))
		return
	}
	body := io.Reader(req.Body)
	switch enc := req.Header.Get("Content-Encoding"); enc {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(req.Body)
		if err != nil {
			writeStatus(w, false, http.StatusBadRequest, status.Newf(codes.InvalidArgument, "the gzip body does not decompress: %v", err))
			return
		}
		defer zr.Close()
		body = zr
	default:
		writeStatus(w, false, http.StatusUnsupportedMediaType, status.Newf(codes.InvalidArgument, "Content-Encoding %q is not supported: send gzip or none", enc))
		return
	}
	data, err := io.ReadAll(io.LimitReader(body, int64(r.opts.MaxBodyBytes)+1))
	switch {
	case len(data) > r.opts.MaxBodyBytes:
		writeStatus(w, false, http.StatusRequestEntityTooLarge, status.Newf(codes.InvalidArgument,
			"the request is over %d bytes, decompressed: send smaller batches", r.opts.MaxBodyBytes))
		return
	case err != nil:
		writeStatus(w, false, http.StatusBadRequest, status.Newf(codes.InvalidArgument, "cannot read the request: %v", err))
		return
	}
	var msg colmetricspb.ExportMetricsServiceRequest
	if err := proto.Unmarshal(data, &msg); err != nil {
		writeStatus(w, false, http.StatusBadRequest, status.Newf(codes.InvalidArgument, "the request is not an ExportMetricsServiceRequest: %v", err))
		return
	}
	resp, err := r.Export(&msg)
	if err != nil {
		st := status.Convert(aggregator.GRPCError(err))
		code := httpCode(st.Code())
		if code == http.StatusTooManyRequests || code == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", strconv.Itoa(retryAfter(st)))
		}
		writeStatus(w, false, code, st)
		return
	}
	out, err := proto.Marshal(resp)
	if err != nil {
		r.opts.Logger.Error("cannot encode an OTLP response", "err", err)
		writeStatus(w, false, http.StatusInternalServerError, status.New(codes.Internal, err.Error()))
		return
	}
	w.Header().Set("Content-Type", protobufType)
	w.WriteHeader(http.StatusOK)
	w.Write(out)
}

// httpCode is the HTTP status of a refusal of the Push path, as the
// OTLP/HTTP specification lists them: 429 and 503 are retried, the others
// are not.
func httpCode(c codes.Code) int {
	switch c {
	case codes.InvalidArgument:
		return http.StatusBadRequest
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.PermissionDenied:
		return http.StatusForbidden
	}
	return http.StatusInternalServerError
}

// retryAfter is the Retry-After of a refusal, in whole seconds: its
// RetryInfo delay rounded up, at least 1 (the header has no finer unit).
func retryAfter(st *status.Status) int {
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return max(1, int(math.Ceil(ri.GetRetryDelay().AsDuration().Seconds())))
		}
	}
	return 1
}

// writeStatus answers with st as a google.rpc.Status, in the encoding of
// the request: JSON for an OTLP/JSON one, protobuf otherwise.
func writeStatus(w http.ResponseWriter, asJSON bool, code int, st *status.Status) {
	// A Status of a code, a message and well-known details always
	// encodes.
	var out []byte
	if asJSON {
		w.Header().Set("Content-Type", jsonType)
		out, _ = protojson.Marshal(st.Proto())
	} else {
		w.Header().Set("Content-Type", protobufType)
		out, _ = proto.Marshal(st.Proto())
	}
	w.WriteHeader(code)
	w.Write(out)
}

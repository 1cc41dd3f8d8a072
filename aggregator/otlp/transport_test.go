package otlp_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	colmetricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/aggregator/otlp"
)

// good is a request of two data points the test schema counts.
func good() *colmetricspb.ExportMetricsServiceRequest {
	return request(host(), nil, deltaSum("requests", "", point(0, 2, "http.route", "/a", "http.response.status_code", 200),
		point(0, 1, "http.route", "/b", "http.response.status_code", 200)))
}

func marshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	data, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func gzipped(t *testing.T, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestHTTP posts requests to the OTLP/HTTP handler: what it counts, and
// the status and google.rpc.Status of what it refuses.
func TestHTTP(t *testing.T) {
	r, rec := newReceiver(t, aggregator.Options{MaxBatchEvents: 3})
	srv := httptest.NewServer(r)
	defer srv.Close()
	body := marshal(t, good())
	big := request(host(), nil)
	for range 2 {
		big.ResourceMetrics[0].ScopeMetrics[0].Metrics = append(big.ResourceMetrics[0].ScopeMetrics[0].Metrics, good().ResourceMetrics[0].ScopeMetrics[0].Metrics...)
	}
	for _, tc := range []struct {
		name, contentType, encoding, method string
		body                                []byte
		pushErr                             error
		code                                int
		retryAfter, message                 string
		events                              int // events counted so far
	}{
		{name: "protobuf", body: body, code: 200, events: 2},
		{name: "gzip", encoding: "gzip", body: gzipped(t, body), code: 200, events: 4},
		{name: "a content type with parameters", contentType: "application/x-protobuf; charset=binary", body: body, code: 200, events: 6},
		{name: "malformed protobuf", body: []byte("\x0a\xff\xff\xff\xff\x0f"), code: 400, message: "the request is not an ExportMetricsServiceRequest", events: 6},
		{name: "malformed gzip", encoding: "gzip", body: []byte("not gzip"), code: 400, message: "the gzip body does not decompress", events: 6},
		{name: "truncated gzip", encoding: "gzip", body: gzipped(t, body)[:20], code: 400, message: "cannot read the request", events: 6},
		{name: "JSON", contentType: "application/json", body: []byte(`{}`), code: 415, message: "OTLP/JSON is not supported", events: 6},
		{name: "text", contentType: "text/plain", body: body, code: 415, message: `Content-Type "text/plain" is not supported`, events: 6},
		{name: "zstd", encoding: "zstd", body: body, code: 415, message: `Content-Encoding "zstd" is not supported`, events: 6},
		{name: "too large", body: bytes.Repeat([]byte{0}, 17<<20), code: 413, message: "the request is over 16777216 bytes", events: 6},
		{name: "a GET", method: http.MethodGet, code: 405, message: "OTLP export is a POST", events: 6},
		{name: "over the batch limit", body: marshal(t, big), code: 400, message: "aggregator: batch too large: 4 events, at most 3", events: 6},
		{name: "behind", body: body, pushErr: aggregator.ErrBehind, code: 429, retryAfter: "1", message: "the combiners are behind", events: 6},
		{name: "disk low", body: body, pushErr: aggregator.ErrDiskLow, code: 429, retryAfter: "1", message: "free disk space below the floor", events: 6},
		{name: "closed", body: body, pushErr: aggregator.ErrClosed, code: 503, retryAfter: "1", message: "aggregator: closed", events: 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec.err = tc.pushErr
			defer func() { rec.err = nil }()
			method := tc.method
			if method == "" {
				method = http.MethodPost
			}
			req, err := http.NewRequest(method, srv.URL+otlp.Path, bytes.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			ct := tc.contentType
			if ct == "" {
				ct = "application/x-protobuf"
			}
			req.Header.Set("Content-Type", ct)
			if tc.encoding != "" {
				req.Header.Set("Content-Encoding", tc.encoding)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			data, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.code || resp.Header.Get("Retry-After") != tc.retryAfter {
				t.Errorf("HTTP %d, Retry-After %q; want %d, %q: %s", resp.StatusCode, resp.Header.Get("Retry-After"), tc.code, tc.retryAfter, data)
			}
			if got := len(rec.events()); got != tc.events {
				t.Errorf("%d events counted, want %d", got, tc.events)
			}
			if tc.code == 200 {
				var out colmetricspb.ExportMetricsServiceResponse
				if err := proto.Unmarshal(data, &out); err != nil || out.PartialSuccess != nil {
					t.Errorf("response %v, %v; want one without partial success", &out, err)
				}
				return
			}
			var st spb.Status
			if tc.contentType == "application/json" {
				if !strings.Contains(string(data), tc.message) {
					t.Errorf("body %s, want one saying %q", data, tc.message)
				}
				return
			}
			if err := proto.Unmarshal(data, &st); err != nil || !strings.Contains(st.Message, tc.message) {
				t.Errorf("status %v, %v; want a message containing %q", &st, err, tc.message)
			}
		})
	}
}

// rawCodec sends bytes as they are, for requests that do not decode.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	if b, ok := v.([]byte); ok {
		return b, nil
	}
	return proto.Marshal(v.(proto.Message))
}

func (rawCodec) Unmarshal(data []byte, v any) error { return proto.Unmarshal(data, v.(proto.Message)) }
func (rawCodec) Name() string                       { return "proto" }

var _ encoding.Codec = rawCodec{}

// TestGRPC exports over real gRPC on a free port: a request that counts,
// one that does not decode (InvalidArgument, nothing counted), and the
// Push path's back-pressure as ResourceExhausted with RetryInfo, which
// OTLP exporters retry.
func TestGRPC(t *testing.T) {
	r, rec := newReceiver(t, aggregator.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(otlp.ServerOption())
	r.Register(s)
	go s.Serve(ln)
	defer s.Stop()
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := colmetricspb.NewMetricsServiceClient(conn)

	resp, err := client.Export(ctx, good())
	if err != nil || resp.PartialSuccess != nil || len(rec.events()) != 2 {
		t.Fatalf("export: %v, %v; %d events counted", resp, err, len(rec.events()))
	}

	var out colmetricspb.ExportMetricsServiceResponse
	err = conn.Invoke(ctx, otlp.ExportMethod, []byte("\x0a\xff\xff\xff\xff\x0f"), &out, grpc.ForceCodec(rawCodec{}))
	if status.Code(err) != codes.InvalidArgument || len(rec.events()) != 2 {
		t.Errorf("malformed request: %v, want InvalidArgument; %d events counted, want 2", err, len(rec.events()))
	}

	for _, tc := range []struct {
		err   error
		code  codes.Code
		retry bool
	}{
		{aggregator.ErrLogFull, codes.ResourceExhausted, true},
		{aggregator.ErrBehind, codes.ResourceExhausted, true},
		{aggregator.ErrLogFailed, codes.Unavailable, false},
		{aggregator.ErrBatchTooLarge, codes.InvalidArgument, false},
	} {
		t.Run(fmt.Sprint(tc.err), func(t *testing.T) {
			rec.err = tc.err
			defer func() { rec.err = nil }()
			_, err := client.Export(ctx, good())
			st := status.Convert(err)
			var retry bool
			for _, d := range st.Details() {
				_, ok := d.(*errdetails.RetryInfo)
				retry = retry || ok
			}
			if st.Code() != tc.code || retry != tc.retry || !strings.Contains(st.Message(), tc.err.Error()) {
				t.Errorf("%v (RetryInfo %v), want %v (RetryInfo %v) saying %q", err, retry, tc.code, tc.retry, tc.err)
			}
		})
	}
}

package publisher_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/stats"

	"github.com/dimsum/dimsum/internal/node"
	"github.com/dimsum/dimsum/publisher"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// serve serves an Ingest server on a free port of 127.0.0.1 until the end of
// the test and returns its address.
func serve(t *testing.T, srv wirepb.IngestServer, opts ...grpc.ServerOption) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(opts...)
	wirepb.RegisterIngestServer(s, srv)
	go s.Serve(lis)
	t.Cleanup(s.Stop)
	return lis.Addr().String()
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}

// stalled is an Ingest server whose handlers wait until the test releases
// them, then acknowledge every event. It keeps the values it acknowledged.
type stalled struct {
	wirepb.UnimplementedIngestServer
	arrived chan int      // the size of each batch, as it arrives
	release chan struct{} // closed by the test to let handlers answer

	mu struct {
		sync.Mutex
		values    []float64
		encodings []string // the grpc-encoding of each batch
	}
}

// HandleRPC records the compression of every request; stalled is its
// server's stats handler too.
func (s *stalled) HandleRPC(_ context.Context, st stats.RPCStats) {
	if h, ok := st.(*stats.InHeader); ok {
		s.mu.Lock()
		s.mu.encodings = append(s.mu.encodings, h.Compression)
		s.mu.Unlock()
	}
}

func (s *stalled) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (s *stalled) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (s *stalled) HandleConn(context.Context, stats.ConnStats)                       {}

func newStalled() *stalled {
	return &stalled{arrived: make(chan int, 100), release: make(chan struct{})}
}

func (s *stalled) Push(ctx context.Context, req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	s.arrived <- len(req.Events)
	select {
	case <-s.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range req.Events {
		s.mu.values = append(s.mu.values, e.Value)
	}
	return &wirepb.PushResponse{Accepted: uint64(len(req.Events))}, nil
}

// startNode starts an all-in-one node on free loopback ports with a 1s
// window, a short grace and the rest of ac, stopped at the end of the test.
func startNode(t *testing.T, ac node.AggregatorConfig) *node.Node {
	t.Helper()
	return startNodeIn(t, t.TempDir(), ac)
}

// startNodeIn is startNode with its data in dataDir.
func startNodeIn(t *testing.T, dataDir string, ac node.AggregatorConfig) *node.Node {
	t.Helper()
	ac.Grace = model.Duration(200 * time.Millisecond)
	ac.FlushInterval = model.Duration(50 * time.Millisecond)
	n, err := node.Start(node.Config{
		DataDir:    dataDir,
		GRPCListen: "127.0.0.1:0",
		HTTPListen: "127.0.0.1:0",
		Name:       "test",
		Aggregator: ac,
		Schema:     schema.File{Resolutions: []string{"1s:1d", "10s:8d", "1m:35d"}},
	}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// nodeMetric scrapes a node's /metrics and returns the sample of name whose
// labels contain label ("" for any), summed.
func nodeMetric(t *testing.T, n *node.Node, name, label string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + n.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		series, value, ok := strings.Cut(line, " ")
		if !ok || (series != name && !strings.HasPrefix(series, name+"{")) || !strings.Contains(series, label) {
			continue
		}
		f, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		v += f
	}
	return v
}

// nodeTotal reads back sum(sum_over_time(requests_delta[1h])) from a node's
// HTTP API, polling until something is there.
func nodeTotal(t *testing.T, n *node.Node) float64 {
	t.Helper()
	at := time.Now().Truncate(time.Minute).Add(time.Minute)
	q := url.Values{"query": {"sum(sum_over_time(requests_delta[1h]))"}, "time": {strconv.FormatInt(at.Unix(), 10)}}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + n.HTTPAddr() + "/api/v1/query?" + q.Encode())
		if err != nil {
			t.Fatal(err)
		}
		var r struct {
			Data struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&r)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Data.Result) == 1 {
			v, err := strconv.ParseFloat(r.Data.Result[0].Value[1].(string), 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		if time.Now().After(deadline) {
			t.Fatal("no data became queryable")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// metric returns the value of a publisher metric with the given reason
// label ("" for none).
func metric(t *testing.T, reg *prometheus.Registry, name, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			r := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" {
					r = l.GetValue()
				}
			}
			if r == reason {
				return m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

// requestLabels are the labels of a valid event of the default schema.
var requestLabels = []string{"datacenter", "dc1", "cluster", "c1", "host", "h1", "transaction", "checkout", "status", "200"}

func event(v float64) publisher.Event {
	return publisher.Event{Family: "requests", TimestampMS: time.Now().UnixMilli(), Value: v, Labels: requestLabels}
}

func grpcClient(addr string) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

package main

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// TestPublicPortRefusesClusterCalls runs a node on its defaults as a real
// process and plays an anonymous client of its public gRPC port: a flush
// that would add 1,000,000 to a datacenter, and a push carrying the
// forwarded marker with events stamped a day ago, a year ahead and at
// MaxInt64, which once skipped the lateness and skew checks. Neither may
// reach the cube.
func TestPublicPortRefusesClusterCalls(t *testing.T) {
	dir, bin := t.TempDir(), dimsumBinary(t)
	config := writeConfig(t, dir, "aggregator: {grace: 500ms, flush_interval: 100ms}\nschema: {resolutions: [1s:1d, 1m:35d]}\n")
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	node := startNode(t, bin, config, filepath.Join(dir, "data"), grpcAddr, httpAddr)
	defer stopNode(t, node)
	conn, err := grpc.NewClient("passthrough:///"+grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	now := time.Now()
	window := now.Truncate(time.Second).UnixMilli()
	flush := &wirepb.FlushRequest{Source: "intruder", WindowStartMs: window, Sequence: 1,
		Dict:  []string{"requests", "injected"},
		Cells: []*wirepb.FlushCell{{Family: 0, Cuboid: 1 << 2, Values: []uint32{1}, Sum: 1e6, Count: 1}}}
	if _, err := wirepb.NewCombinerClient(conn).Flush(ctx, flush); status.Code(err) != codes.Unimplemented {
		t.Errorf("a flush on the public port: %v, want Unimplemented: no combiner serves there", err)
	}

	var b wire.Batch
	for _, ts := range []int64{now.Add(-24 * time.Hour).UnixMilli(), now.Add(365 * 24 * time.Hour).UnixMilli(), 1<<63 - 1} {
		b.Add("requests", ts, 1, "datacenter", "forged", "cluster", "c", "host", "h", "transaction", "t", "status", "200")
	}
	forged := metadata.AppendToOutgoingContext(ctx, "dimsum-forwarded", "1")
	if _, err := wirepb.NewIngestClient(conn).Push(forged, b.Request()); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a push marked as forwarded on the public port: %v, want PermissionDenied", err)
	}

	// A good event shows that what was refused is absent, not late.
	var good wire.Batch
	good.Add("requests", now.UnixMilli(), 1, "datacenter", "dc1", "cluster", "c", "host", "h", "transaction", "t", "status", "200")
	if resp, err := wirepb.NewIngestClient(conn).Push(ctx, good.Request()); err != nil || resp.Accepted != 1 {
		t.Fatalf("a good push: %v, %v", resp, err)
	}
	waitFor(t, "the good event to be queryable", func() bool {
		v, ok := total(t, httpAddr)
		return ok && v == 1
	})
	q := url.Values{"query": {"sum by (datacenter) (sum_over_time(requests_delta[2d]))"}}
	resp, err := http.Get("http://" + httpAddr + "/api/v1/query?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(body), "injected") || strings.Contains(string(body), "forged") || !strings.Contains(string(body), "dc1") {
		t.Errorf("the cube holds what an anonymous client sent, or not the good event: %s", body)
	}
}

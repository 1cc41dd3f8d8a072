package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/internal/testcert"
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
	body := get(t, "http://"+httpAddr+"/api/v1/query?"+q.Encode())
	if strings.Contains(string(body), "injected") || strings.Contains(string(body), "forged") || !strings.Contains(string(body), "dc1") {
		t.Errorf("the cube holds what an anonymous client sent, or not the good event: %s", body)
	}
}

// TestSecureNodeWithLoadAndSlice runs a node as a real process with TLS
// and credentials on its public listeners, and drives it with the load
// and slice commands given a CA and a token: the load, verified through
// PromQL and the slice API, is exact; without the token, or with one that
// may only push, the commands fail with the node's refusal.
func TestSecureNodeWithLoadAndSlice(t *testing.T) {
	dir, bin := t.TempDir(), dimsumBinary(t)
	ca := testcert.NewCA(t, dir, "public")
	cert := ca.Issue(t, "node")
	token := func(name, value string) (string, string) {
		file := filepath.Join(dir, name+".token")
		if err := os.WriteFile(file, []byte(value+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256([]byte(value))
		return file, hex.EncodeToString(sum[:])
	}
	allFile, allSum := token("all", "load-token")
	pushFile, pushSum := token("push", "push-only-token")
	creds := filepath.Join(dir, "credentials.yaml")
	if err := os.WriteFile(creds, []byte(fmt.Sprintf("credentials:\n  - {name: load, token_sha256: %s, rights: [push, query, admin]}\n  - {name: pipeline, token_sha256: %s, rights: [push]}\n", allSum, pushSum)), 0o600); err != nil {
		t.Fatal(err)
	}
	config := writeConfig(t, dir, fmt.Sprintf("aggregator: {grace: 500ms, flush_interval: 100ms}\nschema: {resolutions: [1s:1d, 1m:35d]}\ntls: {cert_file: %s, key_file: %s}\nauth: {credentials_file: %s}\n", cert.Cert, cert.Key, creds))
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool}}}
	node := startNodeUntil(t, bin, config, filepath.Join(dir, "data"), grpcAddr, httpAddr, func() bool { return healthy(client, "https://"+httpAddr) })
	defer stopNode(t, node)

	secure := []string{"-tls-ca", ca.File, "-token-file", allFile}
	out, err := exec.Command(bin, append([]string{"load", "-addr", grpcAddr, "-http", httpAddr, "-events", "5000", "-batch", "500", "-late", "-1",
		"-verify", "-window", "1s", "-verify-timeout", "30s"}, secure...)...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "accepted 5000, rejected 0") {
		t.Fatalf("dimsum load over TLS with a token: %v\n%s", err, out)
	}
	out, err = exec.Command(bin, append([]string{"slice", "requests", "-addr", httpAddr, "-by", "datacenter"}, secure...)...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "(total)") {
		t.Fatalf("dimsum slice over TLS with a token: %v\n%s", err, out)
	}
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"slice without a token", []string{"slice", "requests", "-addr", httpAddr, "-tls-ca", ca.File}, "HTTP 401"},
		{"slice with a push-only token", []string{"slice", "requests", "-addr", httpAddr, "-tls-ca", ca.File, "-token-file", pushFile}, "HTTP 403"},
		{"slice not trusting the CA", []string{"slice", "requests", "-addr", httpAddr, "-tls", "-token-file", allFile}, "certificate"},
	} {
		out, err := exec.Command(bin, c.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("%s: %v, want a failure naming %q:\n%s", c.name, err, c.want, out)
		}
	}
	// A load that is refused reports the events as dropped, and says why.
	out, _ = exec.Command(bin, "load", "-addr", grpcAddr, "-http", httpAddr, "-events", "10", "-tls-ca", ca.File).CombinedOutput()
	if !strings.Contains(string(out), "code = Unauthenticated") || !strings.Contains(string(out), "dropped failed: 10") {
		t.Errorf("load without a token:\n%s", out)
	}
}

package node

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/api"
	v1 "github.com/prometheus/client_golang/api/prometheus/v1"
	"github.com/prometheus/common/model"
	"golang.org/x/crypto/bcrypt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/internal/testcert"
	"github.com/dimsum/dimsum/loadtest"
	"github.com/dimsum/dimsum/publisher"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// credentialsFile writes a credentials file of bearer tokens (name ->
// token, rights) and returns its path.
func credentialsFile(t *testing.T, path string, lines ...string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte("credentials:\n"+strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func tokenLine(name, token, rights string) string {
	sum := sha256.Sum256([]byte(token))
	return fmt.Sprintf("  - {name: %s, token_sha256: %s, rights: [%s]}", name, hex.EncodeToString(sum[:]), rights)
}

// bearer is an http.RoundTripper that adds an Authorization header, as
// Grafana's data source does.
type bearer struct {
	value string
	base  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", b.value)
	return b.base.RoundTrip(r)
}

// TestPublicTLSAndCredentials runs a node with TLS and credentials on its
// public listeners, and checks them with real clients: the publisher over
// gRPC, Prometheus' Go client and plain requests over HTTPS. A client that
// does not trust the node's CA fails the handshake; a call without a
// valid credential is refused with 401 or Unauthenticated, one whose
// credential lacks the right with 403 or PermissionDenied, each counted;
// and a rewritten credentials file takes effect without a restart.
func TestPublicTLSAndCredentials(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir, "public")
	other := testcert.NewCA(t, dir, "other")
	cert := ca.Issue(t, "node")
	hash, err := bcrypt.GenerateFromPassword([]byte("grafana-password"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	creds := credentialsFile(t, filepath.Join(dir, "credentials.yaml"),
		tokenLine("pipeline", "push-token", "push"),
		tokenLine("dashboards", "query-token", "query"),
		tokenLine("ops", "admin-token", "admin"),
		fmt.Sprintf("  - {name: grafana, username: grafana, password_bcrypt: '%s', rights: [query]}", hash))
	cfg := testConfig(filepath.Join(dir, "data"))
	cfg.TLS = TLSConfig{CertFile: cert.Cert, KeyFile: cert.Key}
	cfg.Auth = AuthConfig{CredentialsFile: creds}
	cfg.ReloadInterval = model.Duration(50 * time.Millisecond)
	n, err := Start(cfg, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	trusting := &tls.Config{RootCAs: ca.Pool}

	// gRPC: the publisher pushes with its token over TLS.
	push := func(c credentials.PerRPCCredentials, tc *tls.Config) error {
		var b wire.Batch
		addRequest(&b, time.Now().UnixMilli(), 1, "h1")
		_, err := pushBatch(t, n.GRPCAddr(), b.Request(), grpc.WithTransportCredentials(credentials.NewTLS(tc)), grpc.WithPerRPCCredentials(c))
		return err
	}
	for _, c := range []struct {
		name  string
		creds credentials.PerRPCCredentials
		tls   *tls.Config
		code  codes.Code
	}{
		{"push token", publisher.BearerToken("push-token"), trusting, codes.OK},
		{"no credential", publisher.BearerToken(""), trusting, codes.Unauthenticated},
		{"unknown token", publisher.BearerToken("guess"), trusting, codes.Unauthenticated},
		{"wrong password", publisher.BasicAuth("grafana", "guess"), trusting, codes.Unauthenticated},
		{"query token", publisher.BearerToken("query-token"), trusting, codes.PermissionDenied},
		{"a CA the node's certificate is not of", publisher.BearerToken("push-token"), &tls.Config{RootCAs: other.Pool}, codes.Unavailable},
	} {
		if err := push(c.creds, c.tls); grpcstatus.Code(err) != c.code {
			t.Errorf("gRPC push with %s: %v, want %v", c.name, err, c.code)
		}
	}
	p, err := publisher.New(publisher.Options{Addrs: []string{n.GRPCAddr()}, Credentials: publisher.BearerToken("push-token"),
		DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(trusting))}, BatchEvents: 10, Linger: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if err := p.Add(context.Background(), publisher.Event{Family: "requests", TimestampMS: time.Now().UnixMilli(), Value: 1,
			Labels: []string{"datacenter", "dc1", "cluster", "c1", "host", "h2", "transaction", "t", "status", "200"}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(context.Background()); err != nil || p.Stats().Sent != 10 {
		t.Fatalf("publisher: %v, stats %+v", err, p.Stats())
	}

	// HTTP: Prometheus' client, as Grafana, with a bearer token and with
	// basic auth.
	at := time.Now().Truncate(time.Minute).Add(time.Minute)
	for _, value := range []string{"Bearer query-token", "Basic " + basic("grafana", "grafana-password")} {
		c, err := api.NewClient(api.Config{Address: "https://" + n.HTTPAddr(), RoundTripper: bearer{value, &http.Transport{TLSClientConfig: trusting}}})
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the pushed events through "+value[:6], func() bool {
			v, _, _, err := v1.NewAPI(c).Query(context.Background(), "sum(sum_over_time(requests_delta[1h]))", at)
			vec, ok := v.(model.Vector)
			return err == nil && ok && len(vec) == 1 && vec[0].Value == 11
		})
	}
	get := func(path, authorization string, tc *tls.Config) (int, error) {
		code, _, err := fetch(&http.Client{Transport: &http.Transport{TLSClientConfig: tc}}, "https://"+n.HTTPAddr()+path, authorization)
		return code, err
	}
	for _, c := range []struct {
		path, authorization string
		code                int
	}{
		{"/-/healthy", "", http.StatusOK},
		{"/api/v1/labels", "", http.StatusUnauthorized},
		{"/api/v1/labels", "Bearer guess", http.StatusUnauthorized},
		{"/api/v1/labels", "Basic " + basic("grafana", "guess"), http.StatusUnauthorized},
		{"/api/v1/labels", "Bearer push-token", http.StatusForbidden},
		{"/api/v1/labels", "Bearer query-token", http.StatusOK},
		{"/api/v1/cube/slice?family=requests", "Bearer query-token", http.StatusOK},
		{"/metrics", "Bearer query-token", http.StatusForbidden},
		{"/metrics", "Bearer admin-token", http.StatusOK},
	} {
		if code, err := get(c.path, c.authorization, trusting); err != nil || code != c.code {
			t.Errorf("GET %s with %q: %d, %v; want %d", c.path, c.authorization, code, err, c.code)
		}
	}
	if _, err := get("/-/healthy", "", &tls.Config{RootCAs: other.Pool}); err == nil {
		t.Error("a client of another CA completed the TLS handshake")
	}
	if resp, err := http.Get("http://" + n.HTTPAddr() + "/-/healthy"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP was served on the TLS port")
		}
	}
	_, m, err := fetch(&http.Client{Transport: &http.Transport{TLSClientConfig: trusting}}, "https://"+n.HTTPAddr()+"/metrics", "Bearer admin-token")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`dimsum_auth_requests_total{listener="grpc",outcome="unauthenticated"} 3`,
		`dimsum_auth_requests_total{listener="grpc",outcome="forbidden"} 1`,
		`dimsum_auth_requests_total{listener="http",outcome="unauthenticated"} 3`,
		`dimsum_auth_requests_total{listener="http",outcome="forbidden"} 2`,
		`dimsum_auth_credentials 4`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	// Rotation: the pipeline's token is replaced in the file; the node
	// notices by itself, refuses the old one and takes the new one.
	credentialsFile(t, creds, tokenLine("pipeline", "new-push-token", "push"), tokenLine("ops", "admin-token", "admin"))
	waitFor(t, "the rewritten credentials file to be read", func() bool {
		return grpcstatus.Code(push(publisher.BearerToken("push-token"), trusting)) == codes.Unauthenticated
	})
	if err := push(publisher.BearerToken("new-push-token"), trusting); err != nil {
		t.Errorf("the new token after the reload: %v", err)
	}
	// A file that does not parse keeps the credentials in force.
	if err := os.WriteFile(creds, []byte("credentials: [{name: x}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := n.Reload(); err == nil || !strings.Contains(err.Error(), "has no name") && !strings.Contains(err.Error(), "either token_sha256") {
		t.Errorf("reloading a bad file: %v, want an error naming what is wrong", err)
	}
	if err := push(publisher.BearerToken("new-push-token"), trusting); err != nil {
		t.Errorf("the token in force after a failed reload: %v", err)
	}
	// An empty file, as one caught halfway through a rewrite in place
	// reads, would refuse every call: it keeps the credentials in force.
	credentialsFile(t, creds)
	if err := n.Reload(); err == nil || !strings.Contains(err.Error(), "holds no credential") {
		t.Errorf("reloading an empty file: %v, want it refused", err)
	}
	if err := push(publisher.BearerToken("new-push-token"), trusting); err != nil {
		t.Errorf("the token in force after reloading an empty file: %v", err)
	}
	// A rewrite by rename that keeps the size and the modification time
	// is still seen: the node compares contents.
	credentialsFile(t, creds, tokenLine("pipeline", "new-push-token", "push"), tokenLine("ops", "admin-token", "admin"))
	if err := n.Reload(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(creds)
	if err != nil {
		t.Fatal(err)
	}
	next := credentialsFile(t, filepath.Join(dir, "credentials.next"), tokenLine("pipeline", "nxt-push-token", "push"), tokenLine("ops", "admin-token", "admin"))
	if err := os.Chtimes(next, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(next, creds); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the renamed credentials file to be read", func() bool {
		return push(publisher.BearerToken("nxt-push-token"), trusting) == nil
	})
}

// basic is the value of HTTP basic credentials.
func basic(user, password string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
}

// secure turns a member's config into one of a secure cluster: mutual TLS
// with a certificate of ca, gossip under the key in keyFile.
func secure(cfg Config, ca *testcert.CA, t *testing.T, keyFile string) Config {
	pair := ca.Issue(t, cfg.Name)
	cfg.Cluster.Insecure = false
	cfg.Cluster.TLS = TLSConfig{CAFile: ca.File, CertFile: pair.Cert, KeyFile: pair.Key}
	cfg.Cluster.GossipKeyFile = keyFile
	return cfg
}

// TestClusterMutualTLS runs a secure cluster of two combiners, two
// aggregators and a query node, on real memberlist gossip (encrypted) and
// mutual TLS between members, and pushes a load whose events are forwarded
// between the aggregators, flushed to both combiners and read back through
// the query node's fan-out: all over the internal listeners. Then it calls
// a combiner's internal listener as an outsider: in plain text, over TLS
// without a certificate and with a certificate of another CA, each refused
// in the handshake, and checks that nothing it sent counted.
func TestClusterMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, dir, "cluster")
	other := testcert.NewCA(t, dir, "other")
	keyFile := filepath.Join(dir, "gossip.key")
	if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := func(name string, seed *Node, role cluster.Role) *Node {
		return startMember(t, secure(memberConfig(t, name, seed, role), ca, t, keyFile))
	}
	c1 := start("c1", nil, cluster.RoleCombiner)
	start("c2", c1, cluster.RoleCombiner)
	a1 := start("a1", c1, cluster.RoleAggregator)
	a2 := start("a2", c1, cluster.RoleAggregator)
	q := start("q", c1, cluster.RoleQuery)
	waitFor(t, "q to see five members", func() bool { return len(states(t, q)) == 5 })

	rep, err := loadtest.Run(context.Background(), loadtest.Options{
		Addrs: []string{a1.GRPCAddr(), a2.GRPCAddr()}, HTTPAddrs: []string{q.HTTPAddr()},
		Events: 5_000, BatchSize: 500, Seed: 3, LateFraction: -1, Verify: true, Window: time.Second, VerifyTimeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatalf("load over the secure cluster: %v", err)
	}
	if rep.Accepted != rep.Events {
		t.Fatalf("accepted %d of %d", rep.Accepted, rep.Events)
	}
	if got := metricValue(t, a1.HTTPAddr(), `dimsum_aggregator_forwarded_events_total{outcome="delivered"}`) +
		metricValue(t, a2.HTTPAddr(), `dimsum_aggregator_forwarded_events_total{outcome="delivered"}`); got == 0 {
		t.Errorf("no event was forwarded between the aggregators: the test shows nothing of their internal calls")
	}
	before, _, _, _ := totals(t, q, false)

	flush := &wirepb.FlushRequest{Source: "outsider", WindowStartMs: time.Now().Truncate(time.Second).UnixMilli(), Sequence: 1, Shard: 0, Shards: 8,
		Dict: []string{"requests"}, Cells: []*wirepb.FlushCell{{Family: 0, Cuboid: 0, Sum: 1e6, Count: 1}}}
	outsider := testcert.NewCA(t, dir, "outsider").Issue(t, "outsider")
	for _, c := range []struct {
		name string
		dial grpc.DialOption
	}{
		{"plain text", grpc.WithTransportCredentials(insecure.NewCredentials())},
		{"TLS without a certificate", grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: ca.Pool}))},
		{"a certificate of another CA", grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{outsider.TLS}}))},
		{"a client that does not trust the cluster's CA", grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: other.Pool, Certificates: []tls.Certificate{ca.Issue(t, "stolen").TLS}}))},
	} {
		conn, err := grpc.NewClient("passthrough:///"+c1.InternalAddr(), c.dial)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = wirepb.NewCombinerClient(conn).Flush(ctx, flush)
		cancel()
		conn.Close()
		if grpcstatus.Code(err) != codes.Unavailable {
			t.Errorf("a flush with %s: %v, want the handshake refused (Unavailable)", c.name, err)
		}
	}
	// A member's own certificate is what lets a call in.
	member := ca.Issue(t, "member")
	conn, err := grpc.NewClient("passthrough:///"+c1.InternalAddr(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{member.TLS}})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := wirepb.NewReadClient(conn).LabelNames(context.Background(), &wirepb.LabelsRequest{Family: "requests", MaxtMs: math.MaxInt64, Shards: &wirepb.ShardSet{Count: 8, Shards: []uint32{0}}}); err != nil {
		t.Errorf("a read with a member's certificate: %v", err)
	}
	// A publisher that marks its batch as forwarded, on an aggregator's
	// public listener, would have its events counted as they are, past the
	// lateness and horizon checks: the public listener refuses the marker.
	pub, err := grpc.NewClient("passthrough:///"+a1.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	labels := []uint32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	forged := &wirepb.PushRequest{Source: "forger", BatchSeq: 1,
		Dict: []string{"requests", "datacenter", "dc1", "cluster", "c1", "host", "forged", "transaction", "checkout", "status", "200"},
		Events: []*wirepb.Event{
			{Family: 0, Labels: labels, TimestampMs: time.Now().Add(-24 * time.Hour).UnixMilli(), Value: 1e6},
			{Family: 0, Labels: labels, TimestampMs: time.Now().AddDate(1, 0, 0).UnixMilli(), Value: 1e6},
			{Family: 0, Labels: labels, TimestampMs: math.MaxInt64, Value: 1e6},
		}}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "dimsum-forwarded", "1"), 10*time.Second)
	defer cancel()
	if _, err := wirepb.NewIngestClient(pub).Push(ctx, forged); grpcstatus.Code(err) != codes.PermissionDenied {
		t.Errorf("a batch marked as forwarded on a public listener: %v, want PermissionDenied", err)
	}
	after, _, _, _ := totals(t, q, false)
	if fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("the totals moved from %v to %v after the outsiders' calls", before, after)
	}
}

// fetch GETs u through client, with an Authorization header unless it is
// empty, and returns the status and the body.
func fetch(client *http.Client, u, authorization string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		return 0, "", err
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// metricValue reads one sample of a node's /metrics, 0 when absent.
func metricValue(t *testing.T, addr, series string) float64 {
	t.Helper()
	_, body, err := fetch(http.DefaultClient, "http://"+addr+"/metrics", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return 0
}

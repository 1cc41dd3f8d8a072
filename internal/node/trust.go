package node

import (
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/aggregator/otlp"
	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/internal/auth"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// trust is what proves callers to the node and the node to its peers: the
// public listeners' certificate, the cluster's CA and this member's
// certificate, the public credentials and the gossip keys. Reload reads
// the files that changed again, so each rotates without a restart.
type trust struct {
	log     *slog.Logger
	public  *tlsFiles   // the public listeners' TLS; nil for plain text
	members *tlsFiles   // mutual TLS between members; nil alone or insecure
	guard   *auth.Guard // the public credentials; nil without auth
	// gossipKeys are the keys read from gossipFile at start; in a
	// cluster, setKeys applies the ones read later.
	gossipFile string
	gossipKeys [][]byte
	setKeys    func([][]byte) error

	mu struct {
		sync.Mutex // one reload at a time
		// sums holds the SHA-256 of each file's content when it was last
		// read: a rewrite within the file system's clock tick, or one
		// that keeps the size, still counts as a change.
		sums map[string][sha256.Size]byte
	}
}

func loadTrust(cfg Config, log *slog.Logger, reg prometheus.Registerer) (*trust, error) {
	t := &trust{log: log, gossipFile: cfg.Cluster.GossipKeyFile}
	t.mu.sums = map[string][sha256.Size]byte{}
	var err error
	if t.public, err = loadTLS(cfg.TLS); err != nil {
		return nil, err
	}
	if t.members, err = loadTLS(cfg.Cluster.TLS); err != nil {
		return nil, err
	}
	if f := cfg.Auth.CredentialsFile; f != "" {
		if t.guard, err = auth.NewGuard(auth.Options{File: f, Logger: log.With("component", "auth"), Registerer: reg}); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrConfig, err)
		}
	}
	if t.gossipFile != "" {
		if t.gossipKeys, err = readGossipKeys(t.gossipFile); err != nil {
			return nil, err
		}
	}
	for _, f := range t.files() {
		t.changed(f)
	}
	return t, nil
}

func readGossipKeys(file string) ([][]byte, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot read cluster.gossip_key_file: %v", ErrConfig, err)
	}
	keys, err := cluster.ParseKeys(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrConfig, file, err)
	}
	return keys, nil
}

// files lists every file Reload watches.
func (t *trust) files() []string {
	var out []string
	for _, f := range []*tlsFiles{t.public, t.members} {
		if f != nil {
			out = append(out, f.pair.certFile, f.pair.keyFile)
		}
	}
	if t.guard != nil {
		out = append(out, t.guard.File())
	}
	if t.gossipFile != "" {
		out = append(out, t.gossipFile)
	}
	return out
}

// changed reports whether the content of file differs from when changed
// last looked at it. The caller holds t.mu.
func (t *trust) changed(file string) bool {
	data, err := os.ReadFile(file)
	if err != nil {
		return true // reading it says why
	}
	sum := sha256.Sum256(data)
	if t.mu.sums[file] == sum {
		return false
	}
	t.mu.sums[file] = sum
	return true
}

// reload reads again the files that changed, or all of them with force.
// What fails to load keeps what was in force, and the error says so.
func (t *trust) reload(force bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, f := range []*tlsFiles{t.public, t.members} {
		if f == nil {
			continue
		}
		if c, k := t.changed(f.pair.certFile), t.changed(f.pair.keyFile); force || c || k {
			if err := f.pair.reload(); err != nil {
				errs = append(errs, err)
			} else {
				t.log.Info("certificate loaded", "file", f.pair.certFile)
			}
		}
	}
	if t.guard != nil && (t.changed(t.guard.File()) || force) {
		errs = append(errs, t.guard.Reload())
	}
	if t.gossipFile != "" && t.setKeys != nil && (t.changed(t.gossipFile) || force) {
		keys, err := readGossipKeys(t.gossipFile)
		if err == nil {
			err = t.setKeys(keys)
		}
		if err == nil {
			t.log.Info("gossip keys loaded", "file", t.gossipFile, "keys", len(keys))
		}
		errs = append(errs, err)
	}
	err := errors.Join(errs...)
	if err != nil {
		t.log.Error("reload: what failed to load stays as it was", "err", err)
	}
	return err
}

// publicTLS is the TLS config of the public listeners; nil for plain text.
func (t *trust) publicTLS() *tls.Config {
	if t.public == nil {
		return nil
	}
	return t.public.server()
}

// publicServerOptions are the public gRPC server's TLS and credential
// check.
func (t *trust) publicServerOptions() []grpc.ServerOption {
	var opts []grpc.ServerOption
	if c := t.publicTLS(); c != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(c)))
	}
	if t.guard != nil {
		opts = append(opts, grpc.InTapHandle(t.guard.Tap(grpcRight)))
	}
	return opts
}

// pushMethod is the call publishers make.
var pushMethod = "/" + wirepb.Ingest_ServiceDesc.ServiceName + "/Push"

// grpcRight is the right a public gRPC method needs: Push for pushes and
// OTLP exports, Admin for anything else (the public server serves nothing
// else).
func grpcRight(method string) auth.Right {
	if method == pushMethod || method == otlp.ExportMethod {
		return auth.Push
	}
	return auth.Admin
}

// internalServerOption is the internal server's mutual TLS: only a member
// with a certificate of the cluster's CA completes a handshake.
func (t *trust) internalServerOption() grpc.ServerOption {
	if t.members == nil {
		return grpc.Creds(insecure.NewCredentials())
	}
	return grpc.Creds(credentials.NewTLS(t.members.server()))
}

// internalDialOption is how this node reaches another member's internal
// listener.
func (t *trust) internalDialOption() grpc.DialOption {
	if t.members == nil {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(t.members.client()))
}

// guardHTTP puts the credential check in front of the HTTP mux.
func (t *trust) guardHTTP(mux http.Handler) http.Handler {
	if t.guard == nil {
		return mux
	}
	return t.guard.HTTP(mux, httpRight)
}

// httpRight is the right an HTTP request needs: none for the health check
// (load balancers probe it), Push for OTLP exports, Admin for the node's
// own state, its profiles and reload, Query for the rest (the API, slices,
// the explorer page).
func httpRight(r *http.Request) auth.Right {
	switch r.URL.Path {
	case "/-/healthy":
		return 0
	case otlp.Path:
		return auth.Push
	case "/metrics", "/-/reload", "/api/v1/status/cluster":
		return auth.Admin
	}
	if strings.HasPrefix(r.URL.Path, "/debug/") {
		return auth.Admin
	}
	return auth.Query
}

package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

// Options configure a Guard.
type Options struct {
	// File is the credentials file. Required.
	File string
	// Logger receives reloads and refused calls (at debug level). nil
	// discards.
	Logger *slog.Logger
	// Registerer registers the guard's metrics. nil registers none.
	Registerer prometheus.Registerer
}

// Guard holds the credentials in force, reads their file again when it
// changes, and refuses calls without the right they need, counting each
// outcome. It is safe for concurrent use.
type Guard struct {
	opts    Options
	set     atomic.Pointer[Set]
	checked *prometheus.CounterVec // calls, by listener and outcome
	reloads *prometheus.CounterVec // reads of the file, by outcome
	count   prometheus.Gauge
	mu      sync.Mutex // one reload at a time
}

// NewGuard reads the credentials file; it fails if the file cannot be
// used.
func NewGuard(opts Options) (*Guard, error) {
	if opts.File == "" {
		return nil, fmt.Errorf("%w: no file", ErrFile)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	g := &Guard{opts: opts}
	g.checked = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dimsum_auth_requests_total",
		Help: "Calls on the public listeners checked for a credential, by listener (grpc, http) and outcome: allowed, unauthenticated (no valid credential) or forbidden (a credential without the right).",
	}, []string{"listener", "outcome"})
	g.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dimsum_auth_reloads_total",
		Help: "Reads of the credentials file, by outcome: success, or failure (the credentials before it stay in force).",
	}, []string{"outcome"})
	g.count = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "dimsum_auth_credentials",
		Help: "Credentials in force.",
	})
	if err := g.Reload(); err != nil {
		return nil, err
	}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(g.checked, g.reloads, g.count)
	}
	return g, nil
}

// Reload reads the file again. When that fails, or the file holds no
// credential, the credentials in force stay, and the error says why.
func (g *Guard) Reload() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	data, err := os.ReadFile(g.opts.File)
	var set *Set
	if err == nil {
		set, err = Parse(data)
	}
	if err == nil && set.Len() == 0 {
		// An empty file, or one caught halfway through a rewrite in place,
		// would refuse every call.
		err = fmt.Errorf("%w: it holds no credential, which would refuse every call; to run without credentials, remove auth.credentials_file", ErrFile)
	}
	if err != nil {
		g.reloads.WithLabelValues("failure").Inc()
		if g.set.Load() != nil {
			g.opts.Logger.Error("cannot read the credentials file; the credentials before it stay in force", "file", g.opts.File, "err", err)
		}
		return fmt.Errorf("auth: cannot read %s: %w", g.opts.File, err)
	}
	g.set.Store(set)
	g.reloads.WithLabelValues("success").Inc()
	g.count.Set(float64(set.Len()))
	g.opts.Logger.Info("credentials loaded", "file", g.opts.File, "credentials", set.Len())
	return nil
}

// Check is Set.Check on the credentials in force, counted under listener.
func (g *Guard) Check(listener, authorization string, need Right) (string, error) {
	name, err := g.set.Load().Check(authorization, need)
	outcome := "allowed"
	switch {
	case errors.Is(err, ErrForbidden):
		outcome = "forbidden"
	case err != nil:
		outcome = "unauthenticated"
	}
	g.checked.WithLabelValues(listener, outcome).Inc()
	if err != nil {
		g.opts.Logger.Debug("call refused", "listener", listener, "credential", name, "err", err)
	}
	return name, err
}

// Tap is a gRPC tap handle (grpc.InTapHandle): it checks the credential
// in a call's "authorization" metadata against the right of its method,
// rights(method), before the server reads the call's message. A refused
// call gets Unauthenticated or PermissionDenied.
func (g *Guard) Tap(rights func(method string) Right) tap.ServerInHandle {
	return func(ctx context.Context, info *tap.Info) (context.Context, error) {
		var authorization string
		if v := info.Header.Get("authorization"); len(v) > 0 {
			authorization = v[0]
		}
		_, err := g.Check("grpc", authorization, rights(info.FullMethodName))
		switch {
		case errors.Is(err, ErrForbidden):
			return ctx, status.Error(codes.PermissionDenied, err.Error())
		case err != nil:
			return ctx, status.Error(codes.Unauthenticated, err.Error())
		}
		return ctx, nil
	}
}

// HTTP wraps next so that a request is served only with a credential that
// holds rights(r); a request for which rights says 0 needs none. A
// refused request gets 401 (with a WWW-Authenticate challenge, so that a
// browser asks for a user) or 403, with the error in the Prometheus API's
// JSON envelope.
func (g *Guard) HTTP(next http.Handler, rights func(*http.Request) Right) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		need := rights(r)
		if need == 0 {
			next.ServeHTTP(w, r)
			return
		}
		_, err := g.Check("http", r.Header.Get("Authorization"), need)
		if err == nil {
			next.ServeHTTP(w, r)
			return
		}
		code, typ := http.StatusUnauthorized, "unauthorized"
		if errors.Is(err, ErrForbidden) {
			code, typ = http.StatusForbidden, "forbidden"
		} else {
			w.Header().Set("WWW-Authenticate", `Basic realm="dimsum", charset="UTF-8"`)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(map[string]string{"status": "error", "errorType": typ, "error": err.Error()})
	})
}

// File is the credentials file the guard reads.
func (g *Guard) File() string { return g.opts.File }

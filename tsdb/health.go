package tsdb

import (
	"errors"
	"log/slog"
)

// FailureHandler wraps a slog.Handler for Options.Logger so that the store
// can say when it cannot go on: Pebble calls its logger's Fatalf on an
// error it cannot recover from (a commit its log could not write, a
// manifest it could not sync, a broken invariant). With this handler in
// the logger, Fatalf logs the error, calls failed with it and stops the
// goroutine that met it for good, instead of taking the process down; the
// caller stops sending work to the store, reports itself unhealthy and
// asks for a restart, which recovers what was committed from Pebble's log.
// Without it, Fatalf panics.
func FailureHandler(h slog.Handler, failed func(error)) slog.Handler {
	return failureHandler{h, failed}
}

type failureHandler struct {
	slog.Handler
	failed func(error)
}

func (h failureHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return failureHandler{h.Handler.WithAttrs(attrs), h.failed}
}

func (h failureHandler) WithGroup(name string) slog.Handler {
	return failureHandler{h.Handler.WithGroup(name), h.failed}
}

// fail reports a fatal error through the logger's FailureHandler, and
// says whether there was one.
func fail(l *slog.Logger, msg string) bool {
	h, ok := l.Handler().(failureHandler)
	if ok {
		h.failed(errors.New(msg))
	}
	return ok
}

package tsdb

import (
	"log/slog"
	"strings"
	"testing"
)

// TestFatalWithFailureHandler checks Pebble's fatal path through the
// logger bridge: with a FailureHandler (kept through With, as Open adds
// its component), Fatalf reports the error and the goroutine that met it
// goes no further; without one, Fatalf panics.
func TestFatalWithFailureHandler(t *testing.T) {
	var logs strings.Builder
	failed := make(chan error, 1)
	l := slog.New(FailureHandler(slog.NewTextHandler(&logs, nil), func(err error) { failed <- err })).With("component", "pebble")
	past := make(chan struct{})
	go func() {
		pebbleLogger{l}.Fatalf("pebble: fatal commit error: %v", "no space left on device")
		close(past)
	}()
	err := <-failed
	if !strings.Contains(err.Error(), "fatal commit error: no space left on device") {
		t.Errorf("reported %v", err)
	}
	select {
	case <-past:
		t.Error("the goroutine went on past Fatalf")
	default:
	}
	if !strings.Contains(logs.String(), "fatal=true") || !strings.Contains(logs.String(), "component=pebble") {
		t.Errorf("log %q", logs.String())
	}

	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "broken") {
			t.Errorf("Fatalf without a FailureHandler: recovered %v, want a panic naming the error", r)
		}
	}()
	pebbleLogger{slog.New(slog.DiscardHandler)}.Fatalf("broken")
}

package loadtest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/dimsum/dimsum/publisher"
)

// progress writes a run's progress to Options.Progress: a line each
// interval, or on a terminal one line rewritten in place.
type progress struct {
	opts Options
	mu   sync.Mutex
	// open is true while a terminal line has been written without its
	// newline.
	open bool
}

// newProgress returns the run's progress writer; nil without
// Options.Progress, and every method of a nil one does nothing.
func newProgress(opts Options) *progress {
	if opts.Progress == nil {
		return nil
	}
	return &progress{opts: opts}
}

// status shows a line that the next replaces on a terminal.
func (p *progress) status(format string, args ...any) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	line := fmt.Sprintf(format, args...)
	if p.opts.ProgressTerminal {
		// Back to the line's start and clear it.
		fmt.Fprintf(p.opts.Progress, "\r\x1b[K%s", line)
		p.open = true
		return
	}
	fmt.Fprintln(p.opts.Progress, line)
}

// say writes a line that stays.
func (p *progress) say(format string, args ...any) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLine()
	fmt.Fprintf(p.opts.Progress, format+"\n", args...)
}

// done ends a status line left open on a terminal.
func (p *progress) done() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLine()
}

func (p *progress) endLine() {
	if p.open {
		fmt.Fprintln(p.opts.Progress)
		p.open = false
	}
}

// stalledAfter is how long without an acknowledgement makes the progress
// line name the publisher's last error.
const stalledAfter = 3 * time.Second

// run shows the publisher's progress each interval until done closes.
func (p *progress) run(pub *publisher.Publisher, start time.Time, lastErr *lastError, done <-chan struct{}) {
	t := time.NewTicker(p.opts.ProgressInterval)
	defer t.Stop()
	defer p.done()
	var last uint64
	lastAck := start
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		s := pub.Stats()
		now := time.Now()
		if s.Sent != last {
			lastAck = now
		}
		p.status("%s", p.line(s, now.Sub(start), float64(s.Sent-last)/p.opts.ProgressInterval.Seconds(), now.Sub(lastAck), lastErr.get()))
		last = s.Sent
	}
}

// line is one progress line: the share acknowledged, the rate over the
// last interval, the time left at the run's average rate, what waits, and
// while nothing is acknowledged, why.
func (p *progress) line(s publisher.Stats, elapsed time.Duration, rate float64, stalled time.Duration, lastErr string) string {
	o := p.opts
	eta := "ETA unknown"
	if s.Sent > 0 && int(s.Sent) < o.Events {
		left := float64(o.Events-int(s.Sent)) / (float64(s.Sent) / elapsed.Seconds())
		eta = "ETA " + (time.Duration(left) * time.Second).Round(time.Second).String()
	} else if int(s.Sent) >= o.Events {
		eta = "done"
	}
	target := ""
	if o.Rate > 0 {
		target = fmt.Sprintf(" (target %.0f)", o.Rate*o.diurnal(elapsed))
	}
	line := fmt.Sprintf("%s %5.1f%%  %d/%d events acknowledged  %.0f events/s%s  %s  buffered %d, rejected %d, dropped %d",
		elapsed.Round(time.Second), 100*float64(s.Sent)/float64(max(o.Events, 1)), s.Sent, o.Events, rate, target, eta,
		s.Buffered, sum(s.Rejected), sum(s.Dropped))
	if stalled >= stalledAfter && lastErr != "" {
		line += fmt.Sprintf("; nothing acknowledged for %s, last error: %s", stalled.Round(time.Second), lastErr)
	}
	return line
}

// lastError is a log handler that keeps the error of the last warning or
// error the publisher logged, and passes every record on.
type lastError struct {
	next slog.Handler
	mu   *sync.Mutex
	msg  *string
	// attrs are those of WithAttrs, searched for the error too.
	attrs []slog.Attr
}

func newLastError(next slog.Handler) *lastError {
	return &lastError{next: next, mu: new(sync.Mutex), msg: new(string)}
}

func (h *lastError) Enabled(context.Context, slog.Level) bool { return true }

func (h *lastError) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		var node, err string
		find := func(a slog.Attr) bool {
			switch a.Key {
			case "node", "from":
				node = a.Value.String()
			case "err":
				err = a.Value.String()
			}
			return true
		}
		for _, a := range h.attrs {
			find(a)
		}
		r.Attrs(find)
		if err != "" {
			if node != "" {
				err = node + ": " + err
			}
			h.mu.Lock()
			*h.msg = err
			h.mu.Unlock()
		}
	}
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}

func (h *lastError) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *h
	c.next = h.next.WithAttrs(attrs)
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), attrs...)
	return &c
}

func (h *lastError) WithGroup(name string) slog.Handler {
	c := *h
	c.next = h.next.WithGroup(name)
	return &c
}

func (h *lastError) get() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return *h.msg
}

// ErrUnreachable marks a run that could not connect to any of its gRPC
// addresses.
var ErrUnreachable = errors.New("loadtest: no node accepts connections")

// reachable checks, before anything is sent, that the gRPC addresses
// accept TCP connections, within ConnectTimeout. None does: an error
// naming each address and why (connection refused, no such host, a
// timeout), rather than a minute of retries. Some do not: a line says
// which, and the publisher fails over to the others.
func reachable(ctx context.Context, opts Options, out *progress) error {
	var failed []string
	for _, addr := range opts.Addrs {
		dctx, cancel := context.WithTimeout(ctx, opts.ConnectTimeout)
		conn, err := (&net.Dialer{}).DialContext(dctx, "tcp", addr)
		cancel()
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", addr, err))
			continue
		}
		conn.Close()
	}
	switch {
	case len(failed) == len(opts.Addrs):
		return fmt.Errorf("%w: %s", ErrUnreachable, strings.Join(failed, "; "))
	case len(failed) > 0:
		out.say("cannot reach %s; sending to the others", strings.Join(failed, "; "))
	}
	return nil
}

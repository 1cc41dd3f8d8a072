package publisher

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Event is one counter delta: "Value more of Family, for these labels, at
// this time".
type Event struct {
	Family      string
	TimestampMS int64 // unix milliseconds
	Value       float64
	// Labels alternate name, value, name, value. The publisher holds the
	// slice until the event is sent: do not change it after Add.
	Labels []string
}

// Result is the fate of one batch, as Options.OnResult receives it.
type Result struct {
	// Events are the batch's events. The slice is reused once OnResult
	// returns.
	Events []Event
	// Accepted is the number of events the node counted.
	Accepted int
	// Rejects lists the events the node refused, by index in Events, with
	// the reason. They are never retried: they would be refused again.
	Rejects []*wirepb.Reject
	// Duplicate is true when the node had counted this batch before: an
	// earlier attempt got through but its reply was lost.
	Duplicate bool
	// Err is nil when the node answered. Otherwise nothing of the batch is
	// known to be counted, and Err wraps ErrRefused (the node refused the
	// batch as a whole, gRPC InvalidArgument), ErrFailed (an error no retry
	// mends) or ErrUnsent (Close's deadline came first; an attempt cut
	// short may still have been counted).
	Err error

	queued []int64 // per event, when it was added (ns since the epoch)
	acked  int64   // when the batch settled (ns since the epoch)
}

// Waited is how long event i waited from its Add to its batch's reply.
func (r *Result) Waited(i int) time.Duration { return time.Duration(r.acked - r.queued[i]) }

var (
	// ErrClosed is returned by Add after Close.
	ErrClosed = errors.New("publisher: closed")
	// ErrRefused marks a batch the node refused whole as malformed.
	ErrRefused = errors.New("publisher: batch refused")
	// ErrFailed marks a batch that failed with an error no retry mends.
	ErrFailed = errors.New("publisher: push failed")
	// ErrUnsent marks events Close could not send before its deadline.
	ErrUnsent = errors.New("publisher: events unsent")
)

// Publisher batches events and pushes them to one destination: a list of
// nodes, of which it uses one at a time and fails over to the next. It is
// safe for concurrent use.
type Publisher struct {
	opts     Options
	conns    []*grpc.ClientConn
	clients  []wirepb.IngestClient
	callOpts []grpc.CallOption
	epoch    time.Time
	node     atomic.Int32  // index of the node batches go to
	seq      atomic.Uint64 // the last batch sequence handed out
	stats    counters
	// ctx ends when Close's deadline passes: every attempt and backoff is
	// cut short.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the senders

	mu struct {
		sync.Mutex
		// events is the ring buffer; queued holds when each was added.
		// The buffered events are n from head, wrapping around.
		events  []Event
		queued  []int64
		head, n int
		closing bool
	}
	data   *sync.Cond  // senders wait for a batch to be ready, or Close
	room   *sync.Cond  // blocked Adds wait for room, Close or their ctx
	linger *time.Timer // wakes the senders when the oldest event has lingered
}

// New connects to the destination's nodes (lazily: an unreachable node is a
// failed attempt later, not an error here) and starts the senders.
func New(opts Options) (*Publisher, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	p := &Publisher{opts: opts, epoch: time.Now()}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	for _, addr := range opts.Addrs {
		conn, err := grpc.NewClient("passthrough:///"+addr, opts.DialOptions...)
		if err != nil {
			p.closeConns()
			return nil, fmt.Errorf("publisher: cannot dial %s: %w", addr, err)
		}
		p.conns = append(p.conns, conn)
		p.clients = append(p.clients, wirepb.NewIngestClient(conn))
	}
	// Pushes marshal without protobuf's reflection (wire.CallCodec).
	p.callOpts = append(p.callOpts, wire.CallCodec())
	if opts.Compression == Gzip {
		p.callOpts = append(p.callOpts, grpc.UseCompressor(gzip.Name))
	}
	p.mu.events = make([]Event, opts.BufferEvents)
	p.mu.queued = make([]int64, opts.BufferEvents)
	p.data = sync.NewCond(&p.mu.Mutex)
	p.room = sync.NewCond(&p.mu.Mutex)
	p.linger = time.AfterFunc(time.Hour, func() {
		p.mu.Lock()
		p.data.Broadcast()
		p.mu.Unlock()
	})
	p.linger.Stop()
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(collector{p})
	}
	for range opts.InFlight {
		p.wg.Add(1)
		go p.sender()
	}
	return p, nil
}

// now is the time since the publisher started, on the monotonic clock.
func (p *Publisher) now() int64 { return int64(time.Since(p.epoch)) }

// Add buffers events for sending. When the buffer is full the policy
// decides: Block waits for room (until ctx ends, returning its error),
// DropHead drops the oldest buffered event, DropTail the one being added;
// drops are counted, not returned. After Close, Add returns ErrClosed. On
// an error, the events before the one that failed were added.
func (p *Publisher) Add(ctx context.Context, evs ...Event) error {
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	var stop func() bool // ends the wake-up on ctx of a blocked Add
	defer func() {
		if stop != nil {
			stop()
		}
	}()
	wasEmpty := p.mu.n == 0
	size := len(p.mu.events)
	for i := range evs {
		if p.mu.closing {
			return ErrClosed
		}
		if p.mu.n == size {
			switch p.opts.Policy {
			case DropTail:
				p.stats.added.Add(1)
				p.stats.dropped[dropBufferFull].Add(1)
				continue
			case DropHead:
				p.mu.events[p.mu.head] = Event{}
				p.mu.head = (p.mu.head + 1) % size
				p.mu.n--
				p.stats.dropped[dropBufferFull].Add(1)
			case Block:
				if stop == nil {
					stop = context.AfterFunc(ctx, func() {
						p.mu.Lock()
						p.room.Broadcast()
						p.mu.Unlock()
					})
				}
				p.data.Broadcast()
				for p.mu.n == size && !p.mu.closing && ctx.Err() == nil {
					p.room.Wait()
				}
				if p.mu.closing {
					return ErrClosed
				}
				if err := ctx.Err(); err != nil {
					return err
				}
				wasEmpty = wasEmpty || p.mu.n == 0
			}
		}
		j := (p.mu.head + p.mu.n) % size
		p.mu.events[j] = evs[i]
		p.mu.queued[j] = now
		p.mu.n++
		p.stats.added.Add(1)
	}
	if p.mu.n >= p.opts.BatchEvents || (wasEmpty && p.mu.n > 0) {
		p.data.Broadcast()
	}
	return nil
}

// take waits for a batch to be ready and moves it out of the ring into evs
// and queued. A batch is ready when it is full, when its oldest event has
// lingered, or when Close has begun. It reports false when there is nothing
// more to send.
func (p *Publisher) take(evs []Event, queued []int64) ([]Event, []int64, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.ctx.Err() != nil {
			return nil, nil, false // Close's deadline passed: Close counts the rest
		}
		n, head := p.mu.n, p.mu.head
		if n == 0 && p.mu.closing {
			return nil, nil, false
		}
		if n > 0 {
			waited := time.Duration(p.now() - p.mu.queued[head])
			if n >= p.opts.BatchEvents || p.mu.closing || waited >= p.opts.Linger {
				k := min(n, p.opts.BatchEvents)
				end := min(head+k, len(p.mu.events))
				evs = append(evs, p.mu.events[head:end]...)
				queued = append(queued, p.mu.queued[head:end]...)
				clear(p.mu.events[head:end]) // let the labels go
				if rest := k - (end - head); rest > 0 {
					evs = append(evs, p.mu.events[:rest]...)
					queued = append(queued, p.mu.queued[:rest]...)
					clear(p.mu.events[:rest])
				}
				p.mu.head = (head + k) % len(p.mu.events)
				p.mu.n -= k
				p.room.Broadcast()
				return evs, queued, true
			}
			p.linger.Reset(p.opts.Linger - waited)
		}
		p.data.Wait()
	}
}

// sender takes batches and pushes them until Close.
func (p *Publisher) sender() {
	defer p.wg.Done()
	var (
		b   wire.Batch
		res Result
	)
	for {
		evs, queued, ok := p.take(res.Events[:0], res.queued[:0])
		if !ok {
			return
		}
		res = Result{Events: evs, queued: queued}
		b.Reset()
		for _, e := range evs {
			b.Add(e.Family, e.TimestampMS, e.Value, e.Labels...)
		}
		b.Identify(p.opts.Source, p.seq.Add(1))
		resp, err := p.push(b.Request())
		p.settle(&res, resp, err)
	}
}

// retryable reports whether an attempt that failed with err may succeed
// when repeated, on this node or another. ResourceExhausted is, only when
// the node says so with RetryInfo (its write-ahead log is full: back-pressure
// until its combiners catch up); gRPC itself answers ResourceExhausted,
// without it, for a message over the node's size limit, which the same batch
// exceeds again on every attempt.
func retryable(err error) bool {
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted:
		return true
	case codes.ResourceExhausted:
		return slices.ContainsFunc(st.Details(), func(d any) bool {
			_, ok := d.(*errdetails.RetryInfo)
			return ok
		})
	}
	return false
}

// askedDelay returns the delay a node asked for in the RetryInfo of its
// refusal, if it gave one.
func askedDelay(err error) (time.Duration, bool) {
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok && ri.RetryDelay != nil && ri.RetryDelay.AsDuration() > 0 {
			return ri.RetryDelay.AsDuration(), true
		}
	}
	return 0, false
}

// push sends one batch, retrying transient failures with backoff and
// failing over to the next node after each. Every attempt carries the same
// batch identity, so a node that counted an attempt whose reply was lost
// acknowledges the retry without counting it again.
func (p *Publisher) push(req *wirepb.PushRequest) (*wirepb.PushResponse, error) {
	backoff := p.opts.RetryBackoff
	for {
		i := p.node.Load()
		ctx, cancel := context.WithTimeout(p.ctx, p.opts.PushTimeout)
		resp, err := p.clients[i].Push(ctx, req, p.callOpts...)
		cancel()
		if err == nil {
			return resp, nil
		}
		switch {
		case p.ctx.Err() != nil:
			return nil, fmt.Errorf("%w: %w", ErrUnsent, err)
		case status.Code(err) == codes.InvalidArgument:
			return nil, fmt.Errorf("%w: %w", ErrRefused, err)
		case !retryable(err):
			return nil, fmt.Errorf("%w: %w", ErrFailed, err)
		}
		p.stats.retries.Add(1)
		next := (i + 1) % int32(len(p.clients))
		if next != i && p.node.CompareAndSwap(i, next) {
			p.stats.failovers.Add(1)
			p.opts.Logger.Warn("failing over", "from", p.opts.Addrs[i], "to", p.opts.Addrs[next], "err", err)
		}
		wait := backoff
		if d, ok := askedDelay(err); ok {
			// Back-pressure: the node says when to come back, and
			// waiting for it is no failure to back off from.
			wait = min(d, p.opts.MaxBackoff)
			p.stats.backpressured.Add(1)
			p.opts.Logger.Debug("node asks to wait", "node", p.opts.Addrs[i], "batch", req.BatchSeq, "wait", wait, "err", err)
		} else {
			p.opts.Logger.Warn("push failed, retrying", "node", p.opts.Addrs[i], "batch", req.BatchSeq,
				"events", len(req.Events), "backoff", backoff, "err", err)
			backoff = min(2*backoff, p.opts.MaxBackoff)
		}
		wait += time.Duration(rand.Int64N(int64(wait)/5 + 1))
		select {
		case <-p.ctx.Done():
			return nil, fmt.Errorf("%w: %w", ErrUnsent, err)
		case <-time.After(wait):
		}
	}
}

// settle counts a batch's fate and hands it to OnResult.
func (p *Publisher) settle(res *Result, resp *wirepb.PushResponse, err error) {
	res.acked = p.now()
	res.Err = err
	n := uint64(len(res.Events))
	switch {
	case err == nil:
		res.Accepted = int(resp.Accepted)
		res.Rejects = resp.Rejects
		res.Duplicate = resp.Duplicate
		p.stats.batches.Add(1)
		p.stats.sent.Add(resp.Accepted)
		if resp.Duplicate {
			p.stats.duplicates.Add(1)
		}
		p.stats.reject(resp.Rejects)
	case errors.Is(err, ErrRefused):
		p.stats.refuse(n)
		p.opts.Logger.Error("batch refused", "events", n, "err", err)
	case errors.Is(err, ErrUnsent):
		p.stats.dropped[dropUnsent].Add(n)
	default:
		p.stats.dropped[dropFailed].Add(n)
		p.opts.Logger.Error("batch lost", "events", n, "err", err)
	}
	if p.opts.OnResult != nil {
		p.opts.OnResult(res)
	}
}

// Close stops taking events and sends what is buffered, retrying as usual,
// until everything is sent or ctx ends. Then it cuts every attempt short and
// returns an error wrapping ErrUnsent that says how many events were not
// sent; those are counted as dropped with reason unsent. A batch whose
// attempt was cut short may still have been counted by the node.
func (p *Publisher) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.mu.closing {
		p.mu.Unlock()
		return nil
	}
	p.mu.closing = true
	p.data.Broadcast()
	p.room.Broadcast()
	p.mu.Unlock()

	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.cancel()
		p.mu.Lock()
		p.data.Broadcast()
		p.mu.Unlock()
		<-done
	}
	p.cancel()
	p.linger.Stop()

	p.mu.Lock()
	left := p.mu.n
	clear(p.mu.events)
	p.mu.n = 0
	p.mu.Unlock()
	p.stats.dropped[dropUnsent].Add(uint64(left))
	p.closeConns()
	if unsent := p.stats.dropped[dropUnsent].Load(); unsent > 0 {
		return fmt.Errorf("%w: %d events not sent before the deadline (%d of them never left the buffer)", ErrUnsent, unsent, left)
	}
	return nil
}

func (p *Publisher) closeConns() {
	for _, c := range p.conns {
		c.Close()
	}
}

// Source is the identity this publisher puts on its batches.
func (p *Publisher) Source() string { return p.opts.Source }

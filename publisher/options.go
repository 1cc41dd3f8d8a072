package publisher

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// Policy says what Add does when the buffer is full.
type Policy int

// The buffer policies.
const (
	// Block makes Add wait for room: back-pressure on the log reader.
	Block Policy = iota
	// DropHead drops the oldest buffered event to make room for the new
	// one: recent data matters more than old data.
	DropHead
	// DropTail drops the event being added: what is buffered goes out
	// first.
	DropTail
)

var policyNames = []string{Block: "block", DropHead: "drop-head", DropTail: "drop-tail"}

func (p Policy) String() string {
	if int(p) < len(policyNames) {
		return policyNames[p]
	}
	return "Policy(" + strconv.Itoa(int(p)) + ")"
}

// ParsePolicy reads a policy by its name: block, drop-head or drop-tail.
func ParsePolicy(s string) (Policy, error) {
	for i, n := range policyNames {
		if n == s {
			return Policy(i), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown buffer policy %q, want block, drop-head or drop-tail", ErrOptions, s)
}

// The compressions a publisher can put on the wire.
const (
	Gzip = "gzip"
	None = "none"
)

// Options configure a Publisher. Every field but Addrs has a default, set
// by EnsureDefaults.
type Options struct {
	// Addrs are the gRPC addresses of the destination's nodes. Batches go
	// to the first; on a transient failure the publisher fails over to the
	// next, round the list. Required.
	Addrs []string

	// Source identifies this publisher in batch identities, so that a node
	// counts a retried batch once. It must differ between publishers and
	// between two runs of one. The default is the host name, the process ID
	// and a random number.
	Source string

	// BatchEvents is the most events a batch holds. A batch goes out as
	// soon as it is full. The default is 5,000; it must stay within the
	// node's max_batch_events (100,000 by default).
	BatchEvents int

	// Linger is the longest an event waits for its batch to fill: a batch
	// goes out when it is full or when its oldest event has waited this
	// long. The default is 100ms.
	Linger time.Duration

	// BufferEvents bounds the events held while no sender is free: the ring
	// buffer of this destination. When it is full, Policy decides. It does
	// not count the batches being sent (at most InFlight). The default is
	// 100,000; it must be at least BatchEvents.
	BufferEvents int

	// Policy is what Add does when the buffer is full. The default is
	// Block.
	Policy Policy

	// InFlight is how many batches are pushed at once. The default is 2.
	InFlight int

	// Compression is Gzip or None. The default is Gzip: log-derived
	// batches repeat themselves and shrink several times, at some CPU cost
	// on both sides.
	Compression string

	// PushTimeout bounds one attempt of one batch. An attempt that times
	// out is retried under the same batch identity. The default is 10s.
	PushTimeout time.Duration

	// RetryBackoff is the wait after the first failed attempt; it doubles
	// with every further failure of the batch up to MaxBackoff, with up to
	// 20% jitter. The defaults are 100ms and 5s.
	RetryBackoff, MaxBackoff time.Duration

	// DialOptions are passed to grpc.NewClient for every node, for TLS for
	// instance (grpc.WithTransportCredentials(credentials.NewTLS(...))).
	// The default is insecure credentials.
	DialOptions []grpc.DialOption

	// Credentials are sent with every push: BearerToken or BasicAuth, for
	// a node that checks credentials. A refused one fails the batch
	// (Unauthenticated, PermissionDenied: no retry mends it). The default
	// is none.
	Credentials credentials.PerRPCCredentials

	// OnResult, when set, is called once for every batch when its fate is
	// known: counted (perhaps with rejects), refused, failed or left unsent
	// at Close. It runs on a sender, so a slow OnResult slows sending.
	OnResult func(*Result)

	// Logger receives operational logs. nil discards them.
	Logger *slog.Logger

	// Registerer registers the publisher's metrics. nil registers none. To
	// tell destinations apart, wrap it with a label
	// (prometheus.WrapRegistererWith).
	Registerer prometheus.Registerer
}

// ErrOptions marks invalid options.
var ErrOptions = errors.New("publisher: invalid options")

// EnsureDefaults fills every unset field with its default.
func (o *Options) EnsureDefaults() {
	if o.Source == "" {
		host, _ := os.Hostname()
		o.Source = host + "/" + strconv.Itoa(os.Getpid()) + "-" +
			strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + strconv.FormatUint(uint64(rand.Uint32()), 36)
	}
	if o.BatchEvents == 0 {
		o.BatchEvents = 5_000
	}
	if o.Linger == 0 {
		o.Linger = 100 * time.Millisecond
	}
	if o.BufferEvents == 0 {
		o.BufferEvents = max(100_000, o.BatchEvents)
	}
	if o.InFlight == 0 {
		o.InFlight = 2
	}
	if o.Compression == "" {
		o.Compression = Gzip
	}
	if o.PushTimeout == 0 {
		o.PushTimeout = 10 * time.Second
	}
	if o.RetryBackoff == 0 {
		o.RetryBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff == 0 {
		o.MaxBackoff = 5 * time.Second
	}
	if o.DialOptions == nil {
		o.DialOptions = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	if o.Credentials != nil {
		o.DialOptions = append(o.DialOptions[:len(o.DialOptions):len(o.DialOptions)], grpc.WithPerRPCCredentials(o.Credentials))
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports the first invalid field.
func (o *Options) Validate() error {
	switch {
	case len(o.Addrs) == 0:
		return fmt.Errorf("%w: no node address", ErrOptions)
	case o.BatchEvents < 0 || o.BufferEvents < 0 || o.InFlight < 0:
		return fmt.Errorf("%w: negative batch, buffer or in-flight size", ErrOptions)
	case o.BufferEvents < o.BatchEvents:
		return fmt.Errorf("%w: buffer of %d events is smaller than a batch of %d", ErrOptions, o.BufferEvents, o.BatchEvents)
	case o.Linger < 0 || o.PushTimeout < 0 || o.RetryBackoff < 0 || o.MaxBackoff < 0:
		return fmt.Errorf("%w: negative duration", ErrOptions)
	case o.MaxBackoff < o.RetryBackoff:
		return fmt.Errorf("%w: max backoff %s is below the retry backoff %s", ErrOptions, o.MaxBackoff, o.RetryBackoff)
	case o.Policy < Block || o.Policy > DropTail:
		return fmt.Errorf("%w: unknown policy %d", ErrOptions, int(o.Policy))
	case o.Compression != Gzip && o.Compression != None:
		return fmt.Errorf("%w: compression %q, want gzip or none", ErrOptions, o.Compression)
	}
	for _, a := range o.Addrs {
		if a == "" {
			return fmt.Errorf("%w: empty node address", ErrOptions)
		}
	}
	return nil
}

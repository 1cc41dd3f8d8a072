package aggregator

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dimsum/dimsum/schema"
)

// LabelBytesCeiling is the most MaxLabelNameBytes and MaxLabelValueBytes
// may be: a label lies in the keys of the store and in every message that
// carries its cells, each far smaller than a label of megabytes would
// make useful.
const LabelBytesCeiling = 1 << 20

// Options configure an Aggregator. The zero value of every field but Schema,
// Sink and Peers is replaced by its default in EnsureDefaults.
type Options struct {
	// Schema declares the families the aggregator accepts. Required.
	Schema *schema.Schema

	// Sink receives every closed window's partial cube, split by shard, for
	// each replica of the shard. Required.
	Sink Sink

	// Peers delivers the parts of a batch that other aggregators own, for
	// PushRouted (a Router); in a node, PeerClients over the cluster's
	// connections. Parts wait in the outbox, and with a log survive
	// restarts, until their owner takes them. nil, the default, is a node
	// alone: PushRouted is refused, and so is a log that still holds
	// parts to forward.
	Peers Peers

	// Name identifies this aggregator in flush identities. A process adds its
	// start time to it, so flushes of two incarnations never collide. The
	// default is the host name.
	Name string

	// Grace is how long a window stays open after its end, waiting for
	// events that arrive a little late, before it is flushed. Window + grace
	// is the freshness of the data. The default is 10s.
	Grace time.Duration

	// MaxLateness is how old an event may be and still count. An event
	// older than its window's end plus grace goes out in the next flush as a
	// late delta; one older than MaxLateness is rejected. It must not exceed
	// the finest resolution's retention. The default is 1h.
	MaxLateness time.Duration

	// MaxFutureSkew is how far ahead of this node's clock an event may be
	// stamped. The default is 1m.
	MaxFutureSkew time.Duration

	// MaxBatchEvents is the largest batch Push takes; a larger one is refused
	// whole, so that one request cannot hold the cube's lock for long. The
	// default is 100,000.
	MaxBatchEvents int

	// MaxCellsPerWindow bounds the finest cells of one family in one window;
	// events that would create more are rejected with a cardinality-limit
	// reason. The default is 1,000,000.
	MaxCellsPerWindow int

	// MaxLabelNameBytes and MaxLabelValueBytes bound the length of an
	// event's label names and values; an event with a longer one is
	// rejected with a label-too-long reason. A label value becomes part of
	// every key and series of its cells for the whole retention, so one
	// huge value costs every query that touches it. The defaults are 256
	// and 2,048 bytes (Grafana Cloud's and Loki's value limit; Prometheus'
	// scrape limits on them are off by default); neither may exceed
	// LabelBytesCeiling.
	MaxLabelNameBytes, MaxLabelValueBytes int

	// FlushInterval is how often closed windows are looked for, with 10%
	// jitter. The default is the window divided by 10, at least 100ms.
	FlushInterval time.Duration

	// RetryBackoff is the first wait after a failed flush; it doubles up to
	// 30s. The default is 200ms.
	RetryBackoff time.Duration

	// WALDir holds the write-ahead log. With one, Push acknowledges a batch
	// only once it is on disk, and a restart after a crash (SIGKILL, power
	// loss) rebuilds the cube, the publishers' dedupe state and the flushes
	// not yet delivered from it. Empty, the default, runs without a log: a
	// crash loses what was not yet flushed.
	WALDir string

	// WALMaxBytes bounds the log. It grows while windows cannot go out (a
	// combiner down for long); past the bound Push refuses batches with
	// ErrLogFull, which publishers see as back-pressure. The default is
	// 1 GiB.
	WALMaxBytes int64

	// MaxPendingBytes bounds the memory of the flushes that no replica of
	// their shard has taken yet. It grows when the combiners take less
	// than the aggregator takes, a store that falls behind; past the bound
	// Push refuses batches with ErrBehind, which publishers see as
	// back-pressure, until they drain. A flush one replica took, waiting
	// only for another that is down, and a part forwarded to an
	// aggregator, count against WALMaxBytes only. The default is 64 MiB,
	// which holds about five million cells of partial cubes.
	MaxPendingBytes int64

	// MinFreeBytes is the free-space floor of the log's filesystem: below
	// it Push refuses batches with ErrDiskLow, which publishers see as
	// back-pressure (ResourceExhausted with RetryInfo), until space
	// returns, so that the log never meets a full disk. The default, 0,
	// sets no floor; a node sets one (min_free_bytes).
	MinFreeBytes int64

	// Ready, when set, is asked before every batch: while it returns an
	// error, Push refuses batches with ErrNotReady (gRPC Unavailable), so
	// that publishers go to another node. In a node, it reports a store
	// that cannot go on. nil, the default, is always ready.
	Ready func() error

	// WALSegmentBytes is the size of a log segment file. The log drops
	// whole segments once everything in them reached the combiners. The
	// default is 64 MiB.
	WALSegmentBytes int64

	// Logger receives operational logs. nil discards them.
	Logger *slog.Logger

	// Registerer registers the aggregator's metrics. nil registers none.
	Registerer prometheus.Registerer

	// Now is the clock. The default is time.Now.
	Now func() time.Time
}

// ErrOptions marks invalid options.
var ErrOptions = errors.New("aggregator: invalid options")

// EnsureDefaults fills every unset field with its default.
func (o *Options) EnsureDefaults() {
	if o.Name == "" {
		o.Name, _ = os.Hostname()
		if o.Name == "" {
			o.Name = "aggregator"
		}
	}
	if o.Grace == 0 {
		o.Grace = 10 * time.Second
	}
	if o.MaxLateness == 0 {
		o.MaxLateness = time.Hour
	}
	if o.MaxFutureSkew == 0 {
		o.MaxFutureSkew = time.Minute
	}
	if o.MaxBatchEvents == 0 {
		o.MaxBatchEvents = 100_000
	}
	if o.MaxCellsPerWindow == 0 {
		o.MaxCellsPerWindow = 1_000_000
	}
	if o.MaxLabelNameBytes == 0 {
		o.MaxLabelNameBytes = 256
	}
	if o.MaxLabelValueBytes == 0 {
		o.MaxLabelValueBytes = 2048
	}
	if o.FlushInterval == 0 && o.Schema != nil {
		o.FlushInterval = max(o.Schema.Window()/10, 100*time.Millisecond)
	}
	if o.RetryBackoff == 0 {
		o.RetryBackoff = 200 * time.Millisecond
	}
	if o.WALMaxBytes == 0 {
		o.WALMaxBytes = 1 << 30
	}
	if o.MaxPendingBytes == 0 {
		o.MaxPendingBytes = 64 << 20
	}
	if o.WALSegmentBytes == 0 {
		o.WALSegmentBytes = 64 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Validate reports the first invalid field.
func (o *Options) Validate() error {
	switch {
	case o.Schema == nil:
		return fmt.Errorf("%w: no schema", ErrOptions)
	case o.Sink == nil:
		return fmt.Errorf("%w: no sink", ErrOptions)
	case o.Grace < 0:
		return fmt.Errorf("%w: negative grace %s", ErrOptions, o.Grace)
	case o.MaxLateness < 0 || o.MaxFutureSkew < 0:
		return fmt.Errorf("%w: negative lateness or skew", ErrOptions)
	case o.MaxLateness > o.Schema.Resolutions[0].Retention:
		return fmt.Errorf("%w: max lateness %s exceeds the finest retention %s", ErrOptions, o.MaxLateness, o.Schema.Resolutions[0].Retention)
	case o.MaxBatchEvents < 0 || o.MaxCellsPerWindow < 0 || o.MaxLabelNameBytes < 0 || o.MaxLabelValueBytes < 0:
		return fmt.Errorf("%w: negative limit", ErrOptions)
	case o.MaxLabelNameBytes > LabelBytesCeiling || o.MaxLabelValueBytes > LabelBytesCeiling:
		return fmt.Errorf("%w: label limits %d and %d bytes: neither may exceed %d", ErrOptions, o.MaxLabelNameBytes, o.MaxLabelValueBytes, LabelBytesCeiling)
	case o.WALMaxBytes < 0 || o.WALSegmentBytes < 0 || o.MinFreeBytes < 0:
		return fmt.Errorf("%w: negative write-ahead log size", ErrOptions)
	case o.MaxPendingBytes < 0:
		return fmt.Errorf("%w: negative max pending bytes %d", ErrOptions, o.MaxPendingBytes)
	case o.FlushInterval <= 0 || o.RetryBackoff <= 0:
		return fmt.Errorf("%w: flush interval and retry backoff must be positive", ErrOptions)
	}
	return nil
}

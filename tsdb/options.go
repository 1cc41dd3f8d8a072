package tsdb

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultCacheSize is the Pebble block cache size when Options.CacheSize is
// zero.
const DefaultCacheSize = 64 << 20

// DefaultRetentionInterval is the period of the retention pass when
// Options.RetentionInterval is zero.
const DefaultRetentionInterval = 10 * time.Minute

// DefaultHeadMaxBytes is the head's memory bound when Options.HeadMaxBytes
// is zero.
const DefaultHeadMaxBytes = 256 << 20

// DefaultHeadHold is how long a row stays open after its span ends when
// Options.HeadHold is zero.
const DefaultHeadHold = time.Minute

// Options configure a DB. The zero value plus Dir and Schema works: call
// EnsureDefaults (Open does) and Validate.
type Options struct {
	// Dir is the directory of the Pebble store. It is created if missing.
	// Required.
	Dir string

	// Schema declares the families, their cuboids and the resolutions the
	// cube is kept at. Required. Families are matched to stored data by name
	// and resolutions by step, so families and resolutions may be added or
	// removed between runs; changing the dimensions of an existing family is
	// refused at Open because its stored cells would no longer match.
	Schema *schema.Schema

	// Logger receives dimsum's and Pebble's log lines (Pebble's logger and
	// its significant events are bridged into it). The default, nil,
	// discards them.
	Logger *slog.Logger

	// Registerer receives the DB's metrics, which Close unregisters. The
	// default, nil, registers none.
	Registerer prometheus.Registerer

	// NoSync makes Apply return once its batch is in the write-ahead log's
	// buffer rather than after an fsync. The default, false, syncs every
	// Apply, so an applied batch survives a machine crash; the combiner
	// acknowledges a flush only after Apply returns. Set it for tests and
	// benchmarks, or where the caller has another copy of the data.
	NoSync bool

	// CacheSize is the size in bytes of Pebble's block cache, which holds
	// recently read sstable blocks. The default is 64 MiB.
	CacheSize int64

	// RetentionInterval is how often the retention pass runs (RunRetention):
	// it deletes the rows older than each resolution's retention, forgets
	// the cells left without data and the old idempotency keys. A pass
	// costs a few range deletions plus a read of presence bitmaps, not a
	// scan of the data, so a short interval is cheap; the first pass runs
	// one interval after Open, each with up to 10% jitter. The default is
	// 10 minutes. A negative value disables the periodic pass.
	RetentionInterval time.Duration

	// IdempotencyHorizon is how long the store remembers a source of
	// batches (Apply's BatchID) that applies nothing: a batch it retries
	// later than that is applied again. A source costs about 150 bytes,
	// whatever it sends. The default, zero, is the longest retention of the
	// schema, beyond which a retried batch's data would be dropped anyway.
	IdempotencyHorizon time.Duration

	// HeadMaxBytes bounds the memory of the head, the rows of the finest
	// resolution still open (docs/format/tsdb.md, "The head"). Past three
	// quarters of it the writer writes the oldest rows before their span
	// ends, as merge operands that later writes add to; past all of it
	// Apply waits for the writer, which slows the aggregators' flushes to
	// the pace the disk takes. A row of one cell costs about 4 bytes a step
	// with data plus 24, so the default, 256 MiB, holds an hour of 10s steps
	// for about 180,000 cells, or an hour of one step a minute for about a
	// million.
	HeadMaxBytes int64

	// HeadHold is how long a row of the finest resolution stays open after
	// its span ended, for the partial cubes of that span still on their way
	// (windows flushed late, retries): it is written once a delta at least
	// HeadHold newer than its end arrived, or, when nothing arrives, HeadHold
	// after its end by the wall clock. A delta for a written row opens it
	// again, and its next write adds to the first. The default is 1m.
	HeadHold time.Duration

	// now returns the current time; tests set it to pin retention. The
	// default is time.Now.
	now func() time.Time
	// noCompactions stops Pebble's own compactions, for tests that look
	// at what only an explicit one removes.
	noCompactions bool
	// fs is the file system the store lives in; tests set a crashable
	// one, to see what a machine crash leaves. The default is the disk.
	fs vfs.FS
}

// EnsureDefaults fills in the default of every unset field.
func (o *Options) EnsureDefaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.CacheSize == 0 {
		o.CacheSize = DefaultCacheSize
	}
	if o.now == nil {
		o.now = time.Now
	}
	if o.RetentionInterval == 0 {
		o.RetentionInterval = DefaultRetentionInterval
	}
	if o.HeadMaxBytes == 0 {
		o.HeadMaxBytes = DefaultHeadMaxBytes
	}
	if o.HeadHold == 0 {
		o.HeadHold = DefaultHeadHold
	}
	if o.IdempotencyHorizon == 0 && o.Schema != nil {
		for _, r := range o.Schema.Resolutions {
			o.IdempotencyHorizon = max(o.IdempotencyHorizon, r.Retention)
		}
	}
}

// Validate reports the first invalid field.
func (o *Options) Validate() error {
	switch {
	case o.Dir == "":
		return errors.New("tsdb: Options.Dir is required")
	case o.Schema == nil:
		return errors.New("tsdb: Options.Schema is required")
	case len(o.Schema.Resolutions) == 0:
		return errors.New("tsdb: Options.Schema has no resolutions")
	case len(o.Schema.Families) > math.MaxUint16:
		return fmt.Errorf("tsdb: Options.Schema has %d families, at most %d", len(o.Schema.Families), math.MaxUint16)
	case o.CacheSize < 0:
		return fmt.Errorf("tsdb: Options.CacheSize is %d, must not be negative", o.CacheSize)
	case o.IdempotencyHorizon < 0:
		return fmt.Errorf("tsdb: Options.IdempotencyHorizon is %v, must not be negative", o.IdempotencyHorizon)
	case o.HeadMaxBytes < 0:
		return fmt.Errorf("tsdb: Options.HeadMaxBytes is %d, must not be negative", o.HeadMaxBytes)
	case o.HeadHold < 0:
		return fmt.Errorf("tsdb: Options.HeadHold is %v, must not be negative", o.HeadHold)
	}
	for _, r := range o.Schema.Resolutions {
		if r.Step < time.Second || r.Step%time.Second != 0 || r.Step/time.Second > math.MaxUint32 {
			return fmt.Errorf("tsdb: resolution %v: step must be a whole number of seconds below 2^32", r)
		}
	}
	return nil
}

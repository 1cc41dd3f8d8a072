package tsdb

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultCacheSize is the Pebble block cache size when Options.CacheSize is
// zero.
const DefaultCacheSize = 64 << 20

// DefaultRetentionInterval is the period of the retention pass when
// Options.RetentionInterval is zero.
const DefaultRetentionInterval = 10 * time.Minute

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

	// IdempotencyHorizon is how long an idempotency key is remembered,
	// counted from its keyTime: a batch retried later than that is applied
	// again. The default, zero, is the longest retention of the schema,
	// beyond which a retried batch's data would be dropped anyway.
	IdempotencyHorizon time.Duration

	// now returns the current time; tests set it to pin retention. The
	// default is time.Now.
	now func() time.Time
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
	}
	for _, r := range o.Schema.Resolutions {
		if r.Step < time.Second || r.Step%time.Second != 0 || r.Step/time.Second > math.MaxUint32 {
			return fmt.Errorf("tsdb: resolution %v: step must be a whole number of seconds below 2^32", r)
		}
	}
	return nil
}

// Package disk keeps a node off a full disk: a Floor refuses work while the
// filesystem of a directory has less free space than a bound, so that the
// write-ahead log and the store never meet "no space left on device", which
// Pebble cannot survive, and lets work in again by itself once space
// returns.
//
//	f := &disk.Floor{Dir: "data/wal", Min: 256 << 20, Logger: log, What: "batches"}
//	if err := f.Check(); err != nil { // wraps disk.ErrLow
//		return err
//	}
package disk

import (
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
)

// ErrLow marks work refused because free space is below the floor.
var ErrLow = errors.New("disk: free space below the floor")

// Floor refuses work while Dir's filesystem has fewer than Min bytes free
// for an unprivileged writer. The zero Min never refuses. It is safe for
// concurrent use.
type Floor struct {
	// Dir is a directory on the filesystem watched.
	Dir string
	// Min is the floor, in bytes.
	Min uint64
	// Logger hears when a stretch of refusals begins and ends; nil
	// discards. What names the work refused, for those lines.
	Logger *slog.Logger
	What   string

	low       atomic.Bool
	unchecked atomic.Bool // free space could not be read, logged once
}

// Check returns nil while the free space is at or above the floor, and an
// error wrapping ErrLow that says how much is left otherwise. A filesystem
// whose free space cannot be read is never refused (and said once).
func (f *Floor) Check() error {
	if f.Min == 0 {
		return nil
	}
	free, err := Free(f.Dir)
	if err != nil {
		if f.unchecked.CompareAndSwap(false, true) {
			f.logger().Warn("cannot read the free disk space; the floor is not enforced", "dir", f.Dir, "err", err)
		}
		return nil
	}
	if free >= f.Min {
		if f.low.CompareAndSwap(true, false) {
			f.logger().Info("free disk space above the floor again: taking "+f.What, "dir", f.Dir, "free_bytes", free, "floor_bytes", f.Min)
		}
		return nil
	}
	if f.low.CompareAndSwap(false, true) {
		f.logger().Warn("free disk space below the floor: refusing "+f.What+" until space returns", "dir", f.Dir, "free_bytes", free, "floor_bytes", f.Min)
	}
	return fmt.Errorf("%w: %d bytes free on the filesystem of %s, the floor is %d", ErrLow, free, f.Dir, f.Min)
}

// FreeBytes is the free space of Dir's filesystem, 0 when it cannot be
// read: for a gauge.
func (f *Floor) FreeBytes() float64 {
	free, err := Free(f.Dir)
	if err != nil {
		return 0
	}
	return float64(free)
}

func (f *Floor) logger() *slog.Logger {
	if f.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return f.Logger
}

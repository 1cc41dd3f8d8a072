package tsdb

import (
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/prometheus/model/labels"
)

// Cell is one cell of a cuboid.
type Cell struct {
	ID     uint32
	Values []string // in schema.Cuboid.Labels order
}

// Cells returns the cells of a cuboid whose labels satisfy every matcher,
// sorted by Values. A matcher on a label the cuboid does not have is
// evaluated against the empty string, as Prometheus does for a series that
// lacks the label. Matchers on "__name__" are ignored: the caller maps
// metric names to families.
func (db *DB) Cells(family string, cuboid schema.CuboidID, ms []*labels.Matcher) ([]Cell, error) {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return nil, ErrClosed
	}
	d, err := db.dict(family, cuboid)
	if err != nil {
		return nil, err
	}

	type bound struct {
		slot int
		m    *labels.Matcher
	}
	var bounds [schema.MaxLevels * 2]bound
	matchers := bounds[:0]
	for _, m := range ms {
		if m.Name == labels.MetricName {
			continue
		}
		slot := slices.Index(d.labels, m.Name)
		if slot < 0 {
			if !m.Matches("") {
				return nil, nil
			}
			continue
		}
		matchers = append(matchers, bound{slot, m})
	}

	all := d.snapshot()
	var ids []uint32
cells:
	for id, values := range all {
		for _, b := range matchers {
			if !b.m.Matches(values[b.slot]) {
				continue cells
			}
		}
		ids = append(ids, uint32(id))
	}
	if len(ids) == 0 {
		return nil, nil
	}
	slices.SortFunc(ids, func(x, y uint32) int { return slices.Compare(all[x], all[y]) })

	// Hand out copies so that a caller that edits a cell cannot change the
	// dictionary; one backing array keeps it to two allocations.
	out := make([]Cell, len(ids))
	values := make([]string, len(ids)*len(d.labels))
	for i, id := range ids {
		v := values[i*len(d.labels) : (i+1)*len(d.labels) : (i+1)*len(d.labels)]
		copy(v, all[id])
		out[i] = Cell{ID: id, Values: v}
	}
	return out, nil
}

// Step is the aggregate of one cell over one step of a resolution.
type Step struct {
	T     int64 // unix ms of the step's start
	Sum   float64
	Count uint64
}

// Steps appends to dst the stored steps of one cell at resolution index res
// (0 = finest, as in Schema.Resolutions) whose start T lies in [mint, maxt],
// ascending by T, and returns it. Steps never written are absent.
func (db *DB) Steps(res int, family string, cuboid schema.CuboidID, cell uint32, mint, maxt int64, dst []Step) ([]Step, error) {
	db.state.RLock()
	defer db.state.RUnlock()
	if db.state.closed {
		return dst, ErrClosed
	}
	if res < 0 || res >= len(db.res) {
		return dst, fmt.Errorf("%w: resolution %d of %d", ErrBadInput, res, len(db.res))
	}
	d, err := db.dict(family, cuboid)
	if err != nil {
		return dst, err
	}
	if mint > maxt {
		return dst, nil
	}
	r := db.res[res]
	lo := makeDataKey(r.stepSec, d.fam, cuboid, cell, r.Row(mint))
	hi := makeDataKey(r.stepSec, d.fam, cuboid, cell, r.Row(maxt))
	// Keys are fixed-width, so hi followed by a zero byte is the first key
	// after hi, whatever its row: no overflow at the largest row.
	var upper [dataKeyLen + 1]byte
	copy(upper[:], hi[:])
	iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: lo[:], UpperBound: upper[:]})
	if err != nil {
		return dst, fmt.Errorf("tsdb: cannot read steps: %w", err)
	}
	dst, err = readSteps(iter, r, mint, maxt, dst)
	err = errors.Join(err, iter.Close())
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			db.metrics.corruptions.Inc()
		}
		return dst, fmt.Errorf("tsdb: cannot read steps: %w", err)
	}
	return dst, nil
}

// readSteps decodes the rows iter yields.
func readSteps(iter *pebble.Iterator, r resolution, mint, maxt int64, dst []Step) ([]Step, error) {
	var dec rowDecoder
	for valid := iter.First(); valid; valid = iter.Next() {
		k, err := parseDataKey(iter.Key())
		if err != nil {
			return dst, fmt.Errorf("%w: data key %x: %v", ErrCorrupt, iter.Key(), err)
		}
		v, err := iter.ValueAndErr()
		if err != nil {
			return dst, err
		}
		base := k.row * r.rowSpanMs
		dec.init(v)
		for {
			slot, sum, count, ok := dec.next()
			if !ok {
				break
			}
			t := base + int64(slot)*r.stepMs
			if t < mint {
				continue
			}
			if t > maxt {
				break
			}
			dst = append(dst, Step{T: t, Sum: sum, Count: count})
		}
		if dec.err != nil {
			return dst, corruptRowError(iter.Key(), dec.err)
		}
	}
	return dst, iter.Error()
}

// dict returns the cell dictionary of a cuboid.
func (db *DB) dict(family string, cuboid schema.CuboidID) (*cellDict, error) {
	fs := db.families[family]
	if fs == nil {
		return nil, fmt.Errorf("%w: unknown family %q", ErrBadInput, family)
	}
	d := fs.cuboid(cuboid)
	if d == nil {
		return nil, fmt.Errorf("%w: family %q has no cuboid %d", ErrBadInput, family, cuboid)
	}
	return d, nil
}

package tsdb

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// loadHead loads the source records and the written marks, then replays
// the staged batches into the head: every entry but those of a row whose
// mark says it is written. The head is then what it was before the store
// last closed or crashed (docs/format/tsdb.md, "The head").
func (db *DB) loadHead() error {
	err := db.eachKey(prefixSource, func(k, v []byte) error {
		s, err := decodeSource(v)
		if err != nil {
			return fmt.Errorf("source record %x: %w", k, err)
		}
		db.sources[string(k[1:])] = s
		return nil
	})
	if err != nil {
		return err
	}
	h := db.head
	fine := db.res[0]
	otherStep := uint32(0)
	err = db.eachKey(prefixWritten, func(k, v []byte) error {
		step, row, err := parseWrittenKey(k)
		if err != nil {
			return err
		}
		seq, n := binary.Uvarint(v)
		if n <= 0 || n != len(v) {
			return fmt.Errorf("%w: written mark %x holds %x", ErrCorrupt, k, v)
		}
		if step != fine.stepSec {
			otherStep = step
			return nil
		}
		h.written[row] = seq
		// A mark may outlive the staged batches it names (the writer
		// deletes them after the rows): new batches number on above it.
		h.nextSeq = max(h.nextSeq, seq+1)
		return nil
	})
	if err != nil {
		return err
	}

	var entries []stagedEntry
	var add []headEntry
	replayed, skipped, expired, batches := 0, 0, 0, 0
	first := true
	now := db.opts.now()
	rows := make([]int64, len(db.res))
	keep := make([]bool, len(db.res))
	err = db.eachKey(prefixStaged, func(k, v []byte) error {
		seq, err := parseStagedKey(k)
		if err != nil {
			return err
		}
		if otherStep != 0 {
			return fmt.Errorf("tsdb: %s holds staged batches written under a finest resolution of %ds, and the schema's is %ds: open it once with the old resolutions so that it writes them, then change them", db.opts.Dir, otherStep, fine.stepSec)
		}
		if first {
			h.stagedLow, first = seq, false
		}
		h.nextSeq = max(h.nextSeq, seq+1)
		batches++
		if entries, err = decodeStaged(entries[:0], v); err != nil {
			return fmt.Errorf("staged batch %x: %w", k, err)
		}
		add = add[:0]
		for _, e := range entries {
			fs := db.byID[e.fam]
			if fs == nil {
				skipped++ // a family that left the schema: not served
				continue
			}
			row := fine.Row(fine.StepStart(e.time))
			if mark, ok := h.written[row]; ok && seq <= mark {
				continue // written before the store closed
			}
			d := fs.cuboid(e.cuboid)
			if d == nil || int(e.cell) >= len(d.cells) || d.cells[e.cell] == nil {
				if d != nil && !db.retainedRows(row, now.UnixMilli(), rows, keep) {
					// Past every retention: the writer would write none of
					// it, and a retention pass may have forgotten the cell.
					expired++
					continue
				}
				return fmt.Errorf("%w: staged batch %x names cell %d of family %d cuboid %d, which the dictionary lacks", ErrCorrupt, k, e.cell, e.fam, e.cuboid)
			}
			add = append(add, headEntry{fi: uint16(fs.idx), cuboid: e.cuboid, cell: e.cell, time: e.time, sum: e.sum, count: e.count})
		}
		replayed += len(add)
		h.add(db, seq, add, now)
		return nil
	})
	if err != nil {
		return err
	}
	if batches > 0 {
		db.log.Info("replayed the head", "staged_batches", batches, "deltas", replayed, "skipped_families", skipped, "expired", expired, "groups", len(h.open), "bytes", h.bytes)
	}
	db.metrics.headBytes.Set(float64(h.bytes))
	return nil
}

// eachKey calls fn with every key under prefix and its value, in order;
// fn must not keep them. An error of fn stops the walk and is returned,
// wrapped as a corruption when it is not one already.
func (db *DB) eachKey(prefix byte, fn func(k, v []byte) error) error {
	iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: []byte{prefix}, UpperBound: []byte{prefix + 1}})
	if err != nil {
		return fmt.Errorf("tsdb: cannot read keys %02x: %w", prefix, err)
	}
	for valid := iter.First(); valid; valid = iter.Next() {
		v, err := iter.ValueAndErr()
		if err == nil {
			err = fn(iter.Key(), v)
		}
		if err != nil {
			return errors.Join(err, iter.Close())
		}
	}
	if err := errors.Join(iter.Error(), iter.Close()); err != nil {
		return fmt.Errorf("tsdb: cannot read keys %02x: %w", prefix, err)
	}
	return nil
}

// upgradeFrom2 turns a store of format version 2 into version 3: its
// idempotency keys, one pair per batch applied (0x03 and 0x04), become one
// source record per source (0x07). A version 2 key is the combiner's flush
// identity, the source followed by a zero byte, the window start and the
// sequence (8 bytes each); a key of another shape names no source and is
// dropped. Rows, presence and dictionaries are the same in both versions.
func (db *DB) upgradeFrom2() error {
	sources := map[string]*source{}
	dropped := 0
	err := db.eachKey(prefixIdemKey, func(k, v []byte) error {
		key := k[1:]
		if len(key) < 17 || key[len(key)-17] != 0 || len(v) != 8 {
			dropped++
			return nil
		}
		name := string(key[:len(key)-17])
		s := sources[name]
		if s == nil {
			s = &source{}
			sources[name] = s
		}
		s.seqs.Mark(binary.BigEndian.Uint64(key[len(key)-8:]))
		s.lastMS = max(s.lastMS, unflipSign(binary.BigEndian.Uint64(v)))
		return nil
	})
	if err != nil {
		return err
	}
	b := db.pdb.NewBatch()
	defer b.Close()
	for name, s := range sources {
		if err := b.Set(appendSourceKey(nil, name), appendSource(nil, s), nil); err != nil {
			return err
		}
	}
	if err := errors.Join(
		b.DeleteRange([]byte{prefixIdemTime}, []byte{prefixIdemKey + 1}, nil),
		b.Set(metaFormatKey, binary.AppendUvarint(nil, formatVersion), nil),
	); err != nil {
		return err
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("tsdb: cannot upgrade the store to format %d: %w", formatVersion, err)
	}
	db.log.Info("upgraded the store", "dir", db.opts.Dir, "from", 2, "to", formatVersion, "sources", len(sources), "keys_without_source", dropped)
	return nil
}

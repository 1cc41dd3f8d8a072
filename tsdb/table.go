package tsdb

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// The writer writes a group as sstables that it ingests into Pebble at
// once, rather than as a batch: a group's rows are megabytes, and a batch goes
// through Pebble's write-ahead log, whose files Pebble keeps for reuse at
// the size of the largest batch they held (docs/format/tsdb.md, "Why the
// writer ingests a table"). Ingestion is atomic, and durable once it
// returns.

// groupTable collects the writes of one group, in any order, for ingest.
type groupTable struct {
	ops  []tableOp
	data []byte // the keys and values of ops
}

// tableOp is one point write: its key and value are data[k:v] and
// data[v:end].
type tableOp struct {
	k, v, end int
	kind      opKind
}

type opKind uint8

const (
	opSet opKind = iota
	opMerge
	opDelete
)

// keepTableBytes bounds the room an emptied table keeps for the next
// group: a group written in parts of a large live head may take hundreds of
// megabytes once, which the writer must not hold from then on.
const keepTableBytes = 16 << 20

func (t *groupTable) reset() {
	if cap(t.data) > keepTableBytes {
		*t = groupTable{}
		return
	}
	t.ops, t.data = t.ops[:0], t.data[:0]
}

func (t *groupTable) add(kind opKind, key, value []byte) {
	k := len(t.data)
	t.data = append(t.data, key...)
	v := len(t.data)
	t.data = append(t.data, value...)
	t.ops = append(t.ops, tableOp{k: k, v: v, end: len(t.data), kind: kind})
}

func (t *groupTable) Set(key, value []byte)   { t.add(opSet, key, value) }
func (t *groupTable) Merge(key, value []byte) { t.add(opMerge, key, value) }
func (t *groupTable) Delete(key []byte)       { t.add(opDelete, key, nil) }

func (t *groupTable) key(op tableOp) []byte { return t.data[op.k:op.v] }

// empty reports whether the table holds no write.
func (t *groupTable) empty() bool { return len(t.ops) == 0 }

// ingestPrefix names the files the writer builds its tables in, in Pebble's
// directory; ingest links them into the store and the names are removed.
// Open removes any that a crash left.
const ingestPrefix = "dimsum-group.ingest"

// ingest writes t as sstables, synced, and ingests them into Pebble at
// once. The writes go into one table per kind of key (presence, written
// marks, rows): Pebble flushes its memtable before an ingest whose table
// spans keys the memtable holds, and holds every commit behind that flush,
// while the memtable most often holds only Apply's staged batches, source
// records and dictionary entries, and the deletions of staged batches,
// which the tables do not span.
func (db *DB) ingest(t *groupTable) error {
	slices.SortFunc(t.ops, func(a, b tableOp) int { return bytes.Compare(t.key(a), t.key(b)) })
	for i := 1; i < len(t.ops); i++ {
		if bytes.Equal(t.key(t.ops[i-1]), t.key(t.ops[i])) {
			return fmt.Errorf("tsdb: the group writes key %x twice", t.key(t.ops[i]))
		}
	}
	var paths []string
	defer func() {
		for _, p := range paths {
			db.popts.FS.Remove(p)
		}
	}()
	o := db.popts.MakeWriterOptions(0, db.pdb.TableFormat())
	var w *sstable.Writer
	create := func() error {
		path := filepath.Join(db.opts.Dir, fmt.Sprintf("%s.%d", ingestPrefix, len(paths)))
		f, err := db.popts.FS.Create(path, vfs.WriteCategoryUnspecified)
		if err != nil {
			return fmt.Errorf("tsdb: cannot create the group's table: %w", err)
		}
		paths = append(paths, path)
		w = sstable.NewWriter(objstorageprovider.NewFileWritable(f), o)
		return nil
	}
	// finish closes, and so syncs, the table being written.
	finish := func() error {
		err := w.Close()
		w = nil
		if err != nil {
			return fmt.Errorf("tsdb: cannot write the group's table: %w", err)
		}
		return nil
	}
	for i, op := range t.ops {
		key, value := t.key(op), t.data[op.v:op.end]
		if i == 0 || key[0] != t.key(t.ops[i-1])[0] {
			if w != nil {
				if err := finish(); err != nil {
					return err
				}
			}
			if err := create(); err != nil {
				return err
			}
		}
		var err error
		switch op.kind {
		case opSet:
			err = w.Set(key, value)
		case opMerge:
			err = w.Merge(key, value)
		default:
			err = w.Delete(key)
		}
		if err != nil {
			w.Close()
			return fmt.Errorf("tsdb: cannot write the group's table: %w", err)
		}
	}
	if w != nil {
		if err := finish(); err != nil {
			return err
		}
	}
	if err := db.pdb.Ingest(context.Background(), paths); err != nil {
		return fmt.Errorf("tsdb: cannot ingest the group's tables: %w", err)
	}
	return nil
}

// removeIngestLeft removes the tables a crash left half built in dir.
func removeIngestLeft(fs vfs.FS, dir string) error {
	names, err := fs.List(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a new store
	}
	if err != nil {
		return fmt.Errorf("tsdb: cannot list %s files: %w", ingestPrefix, err)
	}
	for _, name := range names {
		if !strings.HasPrefix(name, ingestPrefix+".") {
			continue
		}
		p := filepath.Join(dir, name)
		if err := fs.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("tsdb: cannot remove %s: %w", p, err)
		}
	}
	return nil
}

package tsdb

import (
	"encoding/binary"
	"testing"

	"github.com/cockroachdb/pebble/v2"
)

// formatOf returns the version the store in dir records.
func formatOf(t *testing.T, dir string) uint64 {
	t.Helper()
	pdb, err := pebble.Open(dir, rawOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer pdb.Close()
	v, closer, err := pdb.Get(metaFormatKey)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	got, _ := binary.Uvarint(v)
	return got
}

// TestUpgradeFrom3 opens a store of version 3 (which differs from 4 only in
// having no alias rows) and requires its data readable and its record 4.
func TestUpgradeFrom3(t *testing.T) {
	s := testSchema(t)
	dir := t.TempDir()
	db := openTest(t, dir, s)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	now := testNow.UnixMilli()
	if _, err := db.Apply(BatchID{}, []Delta{{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: 3, Count: 2}}); err != nil {
		t.Fatal(err)
	}
	closeTest(t, db)
	rawSet(t, dir, metaFormatKey, binary.AppendUvarint(nil, 3))

	db = openTest(t, dir, s)
	steps, err := db.Steps(0, "requests", finest, 0, now-1000, now, nil)
	closeTest(t, db)
	if err != nil || len(steps) != 1 || steps[0].Sum != 3 || steps[0].Count != 2 {
		t.Fatalf("after the upgrade: steps %v, err %v", steps, err)
	}
	if got := formatOf(t, dir); got != formatVersion {
		t.Fatalf("format record %d, want %d", got, formatVersion)
	}
}

// TestUpgradeFrom2 turns a store's source record back into version 2's
// idempotency keys and requires Open to fold them into a source record
// again: a batch applied before the upgrade is a repeat after it.
func TestUpgradeFrom2(t *testing.T) {
	s := testSchema(t)
	dir := t.TempDir()
	db := openTest(t, dir, s)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	now := testNow.UnixMilli()
	delta := []Delta{{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: 1, Count: 1}}
	if _, err := db.Apply(BatchID{Source: "agg-1", Seq: 5}, delta); err != nil {
		t.Fatal(err)
	}
	closeTest(t, db)

	// Version 2 kept a key pair a batch: by time (0x03) and by key (0x04),
	// the key being the source, a zero byte, the window start and the
	// sequence. A key of another shape names no source and is dropped.
	pdb, err := pebble.Open(dir, rawOptions())
	if err != nil {
		t.Fatal(err)
	}
	key := append([]byte{prefixIdemKey}, "agg-1\x00"...)
	key = binary.BigEndian.AppendUint64(key, uint64(now))
	key = binary.BigEndian.AppendUint64(key, 5)
	b := pdb.NewBatch()
	for _, err := range []error{
		b.Delete(appendSourceKey(nil, "agg-1"), nil),
		b.Set(key, binary.BigEndian.AppendUint64(nil, flipSign(now)), nil),
		b.Set([]byte{prefixIdemKey, 'x'}, []byte{1}, nil),
		b.Set(append([]byte{prefixIdemTime}, key[1:]...), nil, nil),
		b.Set(metaFormatKey, binary.AppendUvarint(nil, 2), nil),
		b.Commit(pebble.Sync),
		pdb.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}

	db = openTest(t, dir, s)
	for seq, want := range map[uint64]bool{5: false, 6: true} {
		if applied, err := db.Apply(BatchID{Source: "agg-1", Seq: seq}, delta); err != nil || applied != want {
			t.Fatalf("after the upgrade, sequence %d: applied %v, err %v; want %v", seq, applied, err, want)
		}
	}
	closeTest(t, db)
	if got := formatOf(t, dir); got != formatVersion {
		t.Fatalf("format record %d, want %d", got, formatVersion)
	}
	pdb, err = pebble.Open(dir, rawOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer pdb.Close()
	iter, err := pdb.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixIdemTime}, UpperBound: []byte{prefixIdemKey + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer iter.Close()
	if iter.First() {
		t.Fatalf("version 2's key %x is left", iter.Key())
	}
}

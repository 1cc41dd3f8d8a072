package tsdb

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dimsum/dimsum/schema"
)

// TestUnsyncedCrash applies batches with ApplyDictUnsynced into a store on
// a file system that can crash, and takes at random moments the state a
// machine crash would leave: every file as last synced, with none or half
// of what was written since. After each crash, every batch applied before a
// Sync, or before a Flush whose writer wrote the rows it feeds, must still
// be there, its identity remembered; the others may be lost whole, never in
// part, so that applying them again, as the aggregator that keeps them
// does, leaves the store exact, with nothing read as corrupt.
func TestUnsyncedCrash(t *testing.T) {
	rng := seeded(t)
	s := testSchema(t)
	fs := vfs.NewCrashableMem()
	db := openOn(t, fs, s)
	m := &model{s: s, now: testNow.UnixMilli(), steps: map[modelKey]Step{}}
	durable := -1 // the last batch that must survive a crash
	next := 0
	for round := range 8 {
		n := 1 + rng.IntN(40)
		for i := next; i < next+n; i++ {
			key, deltas := crashBatch(s, i)
			dict, dds := dictOf(deltas)
			if applied, err := db.ApplyDictUnsynced(key, dict, dds); err != nil || !applied {
				t.Fatalf("batch %d: applied %v, %v", i, applied, err)
			}
			m.apply(deltas)
			switch rng.IntN(12) {
			case 0:
				if err := db.Sync(); err != nil {
					t.Fatal(err)
				}
				durable = i
			case 1:
				// The writer writes every group, and with the rows the
				// batches that fed them.
				if err := db.Flush(); err != nil {
					t.Fatal(err)
				}
				durable = i
			}
		}
		next += n
		percent := 50 * rng.IntN(2)
		crashed := fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: percent, RNG: rand.New(rand.NewPCG(rng.Uint64(), 0))})
		closeTest(t, db)
		fs = crashed
		db = openOn(t, fs, s)
		lost := 0
		for i := next - 1; i > durable; i-- {
			key, deltas := crashBatch(s, i)
			applied, err := db.Apply(key, deltas)
			if err != nil {
				t.Fatal(err)
			}
			if applied {
				lost++
			}
		}
		for i := max(0, durable-8); i <= durable; i++ {
			key, deltas := crashBatch(s, i)
			if applied, err := db.Apply(key, deltas); err != nil || applied {
				t.Fatalf("round %d: batch %d, durable before the crash, was lost (applied again: %v, %v)", round, i, applied, err)
			}
		}
		verify(t, db, m, rng)
		t.Logf("round %d: batches 0 to %d, the first %d durable; the crash with %d%% of the unsynced writes lost %d", round, next-1, durable+1, percent, lost)
		durable = next - 1 // Apply synced what it applied again
	}
	closeTest(t, db)
}

// The two crashes around a group's write that TestUnsyncedCrash meets only
// by chance: one that loses the deletion of the staged batches the group
// wrote (replay must skip them by their marks), and a restart on marks
// whose staged batches are all gone, after which new batches in the same
// rows must not be taken for written ones.
func TestUnsyncedCrashAroundWrite(t *testing.T) {
	s := testSchema(t)
	rng := rand.New(rand.NewPCG(7, 7))
	crash := func(fs *vfs.MemFS, db *DB) (*vfs.MemFS, *DB) {
		t.Helper()
		crashed := fs.CrashClone(vfs.CrashCloneCfg{})
		closeTest(t, db)
		return crashed, openOn(t, crashed, s)
	}
	m := &model{s: s, now: testNow.UnixMilli(), steps: map[modelKey]Step{}}
	fs := vfs.NewCrashableMem()
	db := openOn(t, fs, s)
	for i := range 5 {
		key, deltas := crashBatch(s, i)
		dict, dds := dictOf(deltas)
		if _, err := db.ApplyDictUnsynced(key, dict, dds); err != nil {
			t.Fatal(err)
		}
		m.apply(deltas)
	}
	if err := db.Flush(); err != nil {
		t.Fatal(err)
	}
	// The deletion of the written staged batches was not synced.
	fs, db = crash(fs, db)
	verify(t, db, m, rng)
	for i := range 5 {
		key, deltas := crashBatch(s, i)
		if applied, err := db.Apply(key, deltas); err != nil || applied {
			t.Fatalf("batch %d, written before the crash, applied again: %v, %v", i, applied, err)
		}
	}
	// A new batch's group deletes every staged batch, for good once
	// synced; the marks stay.
	key, deltas := crashBatch(s, 5)
	if _, err := db.Apply(key, deltas); err != nil {
		t.Fatal(err)
	}
	m.apply(deltas)
	if err := db.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := db.Sync(); err != nil {
		t.Fatal(err)
	}
	fs, db = crash(fs, db)
	// New batches into the same rows, staged only.
	for i := range 5 {
		_, deltas := crashBatch(s, i)
		if _, err := db.Apply(BatchID{Source: "again", Seq: uint64(i)}, deltas); err != nil {
			t.Fatal(err)
		}
		m.apply(deltas)
	}
	_, db = crash(fs, db)
	verify(t, db, m, rng)
	closeTest(t, db)
}

// openOn opens a store of schema s in fs, its clock at testNow, with no
// periodic retention pass.
func openOn(t *testing.T, fs vfs.FS, s *schema.Schema) *DB {
	t.Helper()
	db, err := Open(Options{Dir: "/store", Schema: s, RetentionInterval: -1, now: func() time.Time { return testNow }, fs: fs})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

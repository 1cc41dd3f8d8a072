package tsdb

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
)

// TestCorruptRow writes undecodable values under a data key behind the
// DB's back and requires Steps to report corruption naming the key, never
// zeros.
func TestCorruptRow(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	now := testNow.UnixMilli()
	delta := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: 5, Count: 1}
	for _, tc := range []struct {
		name    string
		garbage []byte
		// mergeOnTop adds a valid operand above the garbage, so that the
		// merge operator meets it rather than the row decoder.
		mergeOnTop bool
	}{
		{"bad magic", []byte{0xff, 0x01, 0x02}, false},
		{"empty", []byte{}, false},
		{"truncated", []byte{rowMagic, slotsAll, 0x05}, false},
		{"slot out of range", []byte{rowMagic, slotsEntries, 0xff, 0x7f, 0x01}, false},
		{"bad magic under an operand", []byte{0xff, 0x01, 0x02}, true},
		{"truncated under an operand", []byte{rowMagic, slotsList}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := openTest(t, t.TempDir(), s)
			defer closeTest(t, db)
			if _, err := db.Apply(BatchID{}, []Delta{delta}); err != nil {
				t.Fatal(err)
			}
			// The finest steps live in the rows of the next resolution.
			r := db.res[0].keys()
			key := makeDataKey(r.stepSec, r.Row(now), db.families["requests"].id, finest, 0)
			if err := db.pdb.Set(key[:], tc.garbage, pebble.Sync); err != nil {
				t.Fatal(err)
			}
			if tc.mergeOnTop {
				if _, err := db.Apply(BatchID{}, []Delta{delta}); err != nil {
					t.Fatal(err)
				}
				// Written, the operand lies on the garbage; the write
				// itself reads nothing and succeeds.
				if err := db.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			steps, err := db.Steps(0, "requests", finest, 0, now-3600e3, now, nil)
			if !isCorruptNaming(err, key[:]) {
				t.Fatalf("got steps %v, err %v; want an error wrapping ErrCorrupt naming %x", steps, err, key)
			}
			// The coarsest resolution is untouched.
			if steps, err := db.Steps(2, "requests", finest, 0, now-3600e3, now, nil); err != nil || len(steps) != 1 {
				t.Fatalf("resolution 2: %v, %v", steps, err)
			}
		})
	}
}

// TestCorruptDataKey writes a key in the data range that is not a data key
// behind the DB's back: a scan that walks over it reports corruption naming
// it.
func TestCorruptDataKey(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	now := testNow.UnixMilli()
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	deltas := []Delta{
		{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", "GET"}, Time: now, Sum: 1, Count: 1},
		{Family: "requests", Cuboid: finest, Values: []string{"d1", "h2", "GET"}, Time: now, Sum: 1, Count: 1},
	}
	if _, err := db.Apply(BatchID{}, deltas); err != nil {
		t.Fatal(err)
	}
	r := db.res[0].keys() // where the finest steps are stored
	cell0 := makeDataKey(r.stepSec, r.Row(now), db.families["requests"].id, finest, 0)
	key := append(cell0[:], 0x01) // between the keys of cells 0 and 1
	if err := db.pdb.Set(key, []byte{}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	err := db.Scan(0, "requests", finest, nil, now-3600e3, now, func(uint32, []Step) error { return nil })
	if !isCorruptNaming(err, key) {
		t.Fatalf("got %v, want ErrCorrupt naming %x", err, key)
	}
}

// TestCorruptPresence writes an undecodable presence bitmap behind the DB's
// back: the retention pass, the label API over a time range and a write of
// the head that must extend the bitmap report corruption naming its key.
func TestCorruptPresence(t *testing.T) {
	s := testSchema(t)
	code := cuboidOf(t, s, "errors", "code")
	now := testNow.UnixMilli()
	db := openTest(t, t.TempDir(), s)
	// Close cannot write the head either.
	defer func() { _ = db.Close() }()
	// The first pass after Open reads every bitmap: it is done before the
	// corruption.
	if _, err := db.RunRetention(); err != nil {
		t.Fatal(err)
	}
	delta := Delta{Family: "errors", Cuboid: code, Values: []string{"500"}, Time: now - 11*3600e3, Sum: 1, Count: 1}
	if _, err := db.Apply(BatchID{}, []Delta{delta}); err != nil {
		t.Fatal(err)
	}
	r := db.res[1]
	key := presenceKey{r.stepSec, r.Row(delta.Time), db.families["errors"].id, code}.append(nil)
	if err := db.pdb.Set(key, []byte{0x3b, 0x30, 0xff}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	clear(db.presence.cache)
	if _, err := db.RunRetention(); err != nil {
		t.Fatal(err) // the finest row expired; the corrupt bitmap is not read
	}
	db.opts.now = func() time.Time { return testNow.Add(3 * 24 * time.Hour) }
	_, err := db.RunRetention()
	if !isCorruptNaming(err, key) {
		t.Fatalf("retention: got %v, want ErrCorrupt naming %x", err, key)
	}
	db.opts.now = func() time.Time { return testNow }
	_, err = db.LabelValues("errors", code, "code", delta.Time, delta.Time, 0, nil)
	if !isCorruptNaming(err, key) {
		t.Fatalf("label values: got %v, want ErrCorrupt naming %x", err, key)
	}
	delta.Values = []string{"502"}
	if _, err := db.Apply(BatchID{}, []Delta{delta}); err != nil {
		t.Fatal(err)
	}
	if err := db.Flush(); !isCorruptNaming(err, key) {
		t.Fatalf("flush: got %v, want ErrCorrupt naming %x", err, key)
	}
	// The head keeps what it could not write, and reads see it.
	cells, err := db.Cells("errors", code, nil)
	if err != nil || len(cells) != 2 {
		t.Fatalf("cells %v, %v", cells, err)
	}
	steps, err := db.Steps(1, "errors", code, cells[1].ID, 0, now, nil)
	if err != nil || len(steps) != 1 || steps[0].Sum != 1 {
		t.Fatalf("steps of the cell left in the head: %v, %v", steps, err)
	}
}

// TestOpenRefuses covers stores Open must not use.
func TestOpenRefuses(t *testing.T) {
	s := testSchema(t)
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, dir string)
		want    string
		corrupt bool
		// foreign cases start from an empty directory rather than a store
		// created with the test schema.
		foreign bool
	}{
		{
			name: "unknown format version",
			prepare: func(t *testing.T, dir string) {
				rawSet(t, dir, metaFormatKey, []byte{1})
			},
			want: "format version 1; this binary reads only version 4",
		},
		{
			name: "a newer format version",
			prepare: func(t *testing.T, dir string) {
				rawSet(t, dir, metaFormatKey, []byte{5})
			},
			want: "format version 5; this binary reads only version 4",
		},
		{
			name: "garbage format record",
			prepare: func(t *testing.T, dir string) {
				rawSet(t, dir, metaFormatKey, []byte{0xff})
			},
			corrupt: true,
		},
		{
			name: "foreign pebble store",
			prepare: func(t *testing.T, dir string) {
				pdb, err := pebble.Open(dir, rawOptions())
				if err != nil {
					t.Fatal(err)
				}
				if err := errors.Join(pdb.Set([]byte("x"), []byte("y"), pebble.Sync), pdb.Close()); err != nil {
					t.Fatal(err)
				}
			},
			want:    "without a dimsum format record",
			foreign: true,
		},
		{
			name: "garbage cell dictionary entry",
			prepare: func(t *testing.T, dir string) {
				rawSet(t, dir, appendCellKey(nil, 0, 0, 0), []byte{0x05})
			},
			corrupt: true,
		},
		{
			name: "changed dimensions",
			prepare: func(t *testing.T, dir string) {
				// The same family name with other dimensions.
				other, err := schema.Parse([]byte(strings.Replace(testSchemaYAML, "[dc/host, txn]", "[dc/host, method]", 1)))
				if err != nil {
					t.Fatal(err)
				}
				closeTest(t, openTest(t, dir, other))
			},
			want:    "changed its kind or dimensions",
			foreign: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if !tc.foreign {
				closeTest(t, openTest(t, dir, s))
			}
			tc.prepare(t, dir)
			db, err := Open(Options{Dir: dir, Schema: s})
			if err == nil {
				db.Close()
				t.Fatal("Open succeeded")
			}
			if tc.corrupt && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("got %v, want ErrCorrupt", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// rawSet writes a key behind the DB's back.
func rawSet(t *testing.T, dir string, key, value []byte) {
	t.Helper()
	pdb, err := pebble.Open(dir, rawOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(pdb.Set(key, value, pebble.Sync), pdb.Close()); err != nil {
		t.Fatal(err)
	}
}

// rawOptions open a store without the DB, quietly.
func rawOptions() *pebble.Options {
	return &pebble.Options{Merger: rowMerger, Logger: pebbleLogger{slog.New(slog.DiscardHandler)}}
}

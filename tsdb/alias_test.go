package tsdb

import (
	"errors"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestAliasRows follows one host's cells through the life of their rows: a
// coarse cell with one child is stored as an alias of it, keeps reading its
// child's row while its deltas are its child's, and gets its whole row once
// they are not, also after a reopen, which knows the aliases only from the
// stored rows.
func TestAliasRows(t *testing.T) {
	s := testSchema(t)
	fam := s.Family("requests")
	dir := t.TempDir()
	db := openTest(t, dir, s)
	defer func() { _ = db.Close() }()
	now := testNow.UnixMilli()
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	dcHost := cuboidOf(t, s, "requests", "dc", "host")
	dc := cuboidOf(t, s, "requests", "dc")
	txn := cuboidOf(t, s, "requests", "txn")

	// want holds each cuboid's total count and sum, over every cell.
	want := map[schema.CuboidID][2]float64{}
	apply := func(txnValue string, at int64, sum float64) {
		t.Helper()
		d := Delta{Family: "requests", Cuboid: finest, Values: []string{"d1", "h1", txnValue}, Time: at, Sum: sum, Count: 1}
		deltas := rolledUp(fam, d)
		if _, err := db.Apply(BatchID{}, deltas); err != nil {
			t.Fatal(err)
		}
		for _, d := range deltas {
			w := want[d.Cuboid]
			want[d.Cuboid] = [2]float64{w[0] + 1, w[1] + d.Sum}
		}
		if err := db.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	check := func(when string) {
		t.Helper()
		for _, c := range fam.Cuboids() {
			for res := range db.res {
				var count, sum float64
				err := db.Scan(res, "requests", c.ID, nil, now-3600e3, now+3600e3, func(_ uint32, steps []Step) error {
					for _, st := range steps {
						count += float64(st.Count)
						sum += st.Sum
					}
					return nil
				})
				if err != nil {
					t.Fatalf("%s: cuboid %v at resolution %d: %v", when, c.Labels, res, err)
				}
				if w := want[c.ID]; count != w[0] || sum != w[1] {
					t.Fatalf("%s: cuboid %v at resolution %d reads count %v sum %v, want %v", when, c.Labels, res, count, sum, w)
				}
			}
		}
	}
	isAliasRow := func(res int, cuboid uint16, cell uint32) bool {
		t.Helper()
		r := db.res[res]
		k := makeDataKey(r.stepSec, r.Row(now), db.families["requests"].id, 0, cell)
		k[15], k[16] = byte(cuboid>>8), byte(cuboid)
		v, closer, err := db.pdb.Get(k[:])
		if err != nil {
			t.Fatalf("row %x: %v", k, err)
		}
		defer closer.Close()
		return isAlias(v)
	}

	apply("GET", now, 2.5)
	check("one child")
	for _, c := range fam.Cuboids() {
		for res := 1; res < len(db.res); res++ {
			if got, want := isAliasRow(res, uint16(c.ID), 0), c.ID != finest; got != want {
				t.Fatalf("cuboid %v at resolution %d: alias row %v, want %v", c.Labels, res, got, want)
			}
		}
	}
	if got := testutil.ToFloat64(db.metrics.aliasRows); got != float64(2*(len(fam.Cuboids())-1)) {
		t.Fatalf("%v alias rows written, want one per coarse cuboid and stored resolution", got)
	}

	// A second transaction: the host's cell has two children now, and
	// its rows become whole; the datacenter's still has one host.
	apply("POST", now+1000, 4)
	check("two transactions")
	if isAliasRow(1, uint16(dcHost), 0) || !isAliasRow(1, uint16(dc), 0) {
		t.Fatalf("after a second transaction: host cell alias %v, datacenter alias %v; want false, true", isAliasRow(1, uint16(dcHost), 0), isAliasRow(1, uint16(dc), 0))
	}
	if got := testutil.ToFloat64(db.metrics.aliasesMaterialized); got == 0 {
		t.Fatal("no alias row materialized")
	}

	// Reopened, the writer learns the aliases from the rows: a delta its
	// cells' children also get leaves them aliases, and no row reads
	// twice or fails to merge.
	closeTest(t, db)
	db = openTest(t, dir, s)
	apply("GET", now+2000, 1)
	check("after a reopen")
	if !isAliasRow(1, uint16(txn), 0) || testutil.ToFloat64(db.metrics.aliasesMaterialized) != 0 {
		t.Fatalf("after a reopen: transaction cell alias %v, %v materialized; want an alias, none materialized", isAliasRow(1, uint16(txn), 0), testutil.ToFloat64(db.metrics.aliasesMaterialized))
	}
	if err := db.pdb.Compact(t.Context(), []byte{0}, []byte{0xff}, false); err != nil {
		t.Fatal(err)
	}
	check("compacted")
}

// TestAliasRowCorrupt requires a read of an alias row that names no stored
// row, or that does not parse, to fail as corruption naming the key.
func TestAliasRowCorrupt(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	dcHost := cuboidOf(t, s, "requests", "dc", "host")
	now := testNow.UnixMilli()
	for _, tc := range []struct {
		name  string
		value []byte
	}{
		{"names a missing row", appendAlias(nil, aliasRef{cuboid: finest, cell: 7})},
		{"names a coarser cuboid", appendAlias(nil, aliasRef{cuboid: dcHost, cell: 0})},
		{"truncated", []byte{aliasMagic, 0x80}},
		{"trailing bytes", append(appendAlias(nil, aliasRef{cuboid: finest, cell: 0}), 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := openTest(t, t.TempDir(), s)
			defer closeTest(t, db)
			d := Delta{Family: "requests", Cuboid: dcHost, Values: []string{"d1", "h1"}, Time: now, Sum: 1, Count: 1}
			if _, err := db.Apply(BatchID{}, []Delta{d}); err != nil {
				t.Fatal(err)
			}
			if err := db.Flush(); err != nil {
				t.Fatal(err)
			}
			r := db.res[1]
			key := makeDataKey(r.stepSec, r.Row(now), db.families["requests"].id, dcHost, 0)
			if err := db.pdb.Set(key[:], tc.value, pebble.Sync); err != nil {
				t.Fatal(err)
			}
			for _, cells := range [][]uint32{{0}, nil} { // one cell by seeks, every cell by cursors
				err := db.Scan(1, "requests", dcHost, cells, now-3600e3, now, func(uint32, []Step) error { return nil })
				if !isCorruptNaming(err, key[:]) {
					t.Fatalf("cells %v: got %v, want an error wrapping ErrCorrupt naming %x", cells, err, key)
				}
			}
		})
	}
}

// TestParseAlias round-trips alias rows at the bounds of their fields.
func TestParseAlias(t *testing.T) {
	for _, want := range []aliasRef{{0, 0}, {1, 300}, {65535, 1<<32 - 1}} {
		got, err := parseAlias(appendAlias(nil, want))
		if err != nil || got != want {
			t.Fatalf("%v: got %v, %v", want, got, err)
		}
	}
	for _, v := range [][]byte{nil, {aliasMagic}, {rowMagic, 0, 0}, {aliasMagic, 0x80, 0x80, 0x04, 0}, {aliasMagic, 1, 0x80, 0x80, 0x80, 0x80, 0x10}} {
		if _, err := parseAlias(v); !errors.Is(err, errAliasMalformed) {
			t.Fatalf("%x: got %v, want errAliasMalformed", v, err)
		}
	}
}

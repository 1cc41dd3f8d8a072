package tsdb

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dimsum/dimsum/schema"
)

// TestCellIndex runs random puts and deletes against a Go map, with few
// distinct numbers so that probes collide, wrap around the end of the
// slots and pass deleted cells, at every key width.
func TestCellIndex(t *testing.T) {
	for _, width := range []int{0, 1, 3, len(cellKey{})} {
		t.Run(fmt.Sprintf("width=%d", width), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(width), 9))
			x := newCellIndex(width)
			want := map[cellKey]uint32{}
			randomKey := func() cellKey {
				var k cellKey
				for i := range width {
					k[i] = uint32(rng.IntN(4))
				}
				return k
			}
			check := func(step int) {
				t.Helper()
				if x.n != len(want) {
					t.Fatalf("step %d: %d cells, want %d", step, x.n, len(want))
				}
				for k, id := range want {
					if got, ok := x.get(&k); !ok || got != id {
						t.Fatalf("step %d: get(%v) = %d, %v, want %d", step, k[:width], got, ok, id)
					}
				}
				held := 0
				for i := 0; i <= x.mask && x.slots != nil; i++ {
					if s := x.slot(i); s[0] != 0 {
						held++
						var k cellKey
						copy(k[:], s[1:])
						if id, ok := want[k]; !ok || id != s[0]-1 {
							t.Fatalf("step %d: slot %d holds %v → %d, want absent or %d", step, i, k[:width], s[0]-1, id)
						}
					}
				}
				if held != len(want) {
					t.Fatalf("step %d: %d slots held, want %d", step, held, len(want))
				}
			}
			for step := range 3000 {
				k := randomKey()
				_, had := want[k]
				switch {
				case rng.IntN(3) == 0:
					x.delete(&k)
					delete(want, k)
				case !had:
					id := uint32(rng.IntN(1 << 20))
					x.put(&k, id)
					want[k] = id
				}
				_, held := want[k]
				if _, ok := x.get(&k); ok != held {
					t.Fatalf("step %d: get(%v) found=%v after the change", step, k[:width], ok)
				}
				if step%50 == 0 {
					check(step)
				}
			}
			check(-1)
			// Absent keys are not found, in a table that held many.
			for k := range want {
				x.delete(&k)
				delete(want, k)
			}
			check(-2)
			if _, ok := x.get(&cellKey{}); ok {
				t.Fatal("an emptied index finds a cell")
			}
		})
	}
}

// checkValues compares the store's interned values with what its
// committed cells hold: every value some cell holds has a number, counted
// once per label slot holding it, and no other value has one.
func checkValues(t *testing.T, db *DB) {
	t.Helper()
	want := map[string]int{}
	for _, fs := range db.fams {
		for _, d := range fs.cuboids {
			for _, values := range d.cells {
				for _, v := range values {
					want[v]++
				}
			}
		}
	}
	vt := db.values
	if len(vt.nums) != len(want) {
		t.Errorf("%d values interned, %d held: %v", len(vt.nums), len(want), vt.nums)
	}
	for v, n := range want {
		num, ok := vt.nums[v]
		if !ok || vt.strs[num] != v || vt.refs[num] != n {
			t.Errorf("value %q: interned %v as %d, %q held %d times, want %d", v, ok, num, vt.strs[num], vt.refs[num], n)
		}
	}
	free := 0
	for _, r := range vt.refs {
		if r == 0 {
			free++
		}
	}
	if free != len(vt.free) {
		t.Errorf("%d numbers held by no cell, %d free", free, len(vt.free))
	}
}

// TestInternedValues follows the interned values through new cells, a
// batch rolled back, a retention pass that forgets cells, and a reopen.
func TestInternedValues(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	dcs := cuboidOf(t, s, "requests", "dc")
	code := cuboidOf(t, s, "errors", "code")
	clock := testNow
	dir := t.TempDir()
	db := openTestAt(t, dir, s, func() time.Time { return clock })
	defer func() { _ = db.Close() }()
	at := func(values ...string) Delta {
		return Delta{Family: "requests", Cuboid: finest, Values: values, Time: clock.UnixMilli(), Sum: 1, Count: 1}
	}
	apply := func(deltas ...Delta) {
		t.Helper()
		if _, err := db.Apply(BatchID{}, deltas); err != nil {
			t.Fatal(err)
		}
		if err := db.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	apply(at("d1", "h1", "GET"), at("d1", "h2", "GET"), at("d1", "h1", "GET"),
		Delta{Family: "requests", Cuboid: dcs, Values: []string{"d1"}, Time: clock.UnixMilli()},
		Delta{Family: "errors", Cuboid: code, Values: []string{"GET"}, Time: clock.UnixMilli()})
	checkValues(t, db)
	if got := len(db.values.nums); got != 4 {
		t.Fatalf("%d values interned, want 4 (d1, h1, h2, GET)", got)
	}

	// A batch whose last cell cannot get an ID is rolled back: its first
	// new cell and the values only it held are forgotten.
	ed := db.families["errors"].cuboids[code]
	ed.next = math.MaxUint32
	_, err := db.Apply(BatchID{}, []Delta{at("d2", "h3", "POST"), {Family: "errors", Cuboid: code, Values: []string{"500"}, Time: clock.UnixMilli()}})
	if err == nil || !strings.Contains(err.Error(), "no cell ID left") {
		t.Fatalf("a batch with no cell ID left: %v", err)
	}
	ed.next = 1
	checkValues(t, db)
	if got := len(db.values.nums); got != 4 {
		t.Fatalf("%d values interned after a rollback, want 4", got)
	}

	// A day on, only h2's cell gets data: the retention pass forgets the
	// others, and with them h1 and the errors cell's values.
	clock = clock.Add(3 * 24 * time.Hour)
	apply(at("d1", "h2", "GET"), Delta{Family: "requests", Cuboid: dcs, Values: []string{"d1"}, Time: clock.UnixMilli()})
	clock = clock.Add(31 * 24 * time.Hour)
	apply(at("d1", "h2", "GET"), Delta{Family: "requests", Cuboid: dcs, Values: []string{"d1"}, Time: clock.UnixMilli()})
	if st, err := db.RunRetention(); err != nil || st.Cells != 2 {
		t.Fatalf("retention pass: %+v, %v; want 2 cells forgotten", st, err)
	}
	checkValues(t, db)
	if got, want := len(db.values.nums), 3; got != want {
		t.Fatalf("%d values interned after the pass, want %d (d1, h2, GET)", got, want)
	}
	// A new value takes a freed number, and a forgotten cell comes back
	// with the lowest free ID.
	freed := slices.Clone(db.values.free)
	apply(at("d1", "h9", "GET"))
	checkValues(t, db)
	if n := db.values.nums["h9"]; !slices.Contains(freed, n) {
		t.Fatalf("h9 took number %d, not one of the freed %v", n, freed)
	}
	cells, err := db.Cells("requests", finest, nil)
	if err != nil || fmt.Sprint(cells) != "[{1 [d1 h2 GET]} {0 [d1 h9 GET]}]" {
		t.Fatalf("cells %v, %v; want h9's cell at ID 0, the lowest free", cells, err)
	}
	closeTest(t, db)
	db = openTestAt(t, dir, s, func() time.Time { return clock })
	checkValues(t, db)
	apply(at("d1", "h9", "GET"), at("d1", "h2", "GET"))
	if got, err := db.Cells("requests", finest, nil); err != nil || fmt.Sprint(got) != fmt.Sprint(cells) {
		t.Fatalf("cells after a reopen: %v, %v; want %v", got, err, cells)
	}
}

// TestApplyDict applies a flush-like batch, its strings indexes into one
// dictionary, and checks it reads as the same deltas through Apply, and
// that an index outside the dictionary is refused whole.
func TestApplyDict(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	dcs := cuboidOf(t, s, "requests", "dc")
	now := testNow.UnixMilli()
	dict := []string{"requests", "d1", "h1", "GET", "h2", "errors", "500"}
	code := cuboidOf(t, s, "errors", "code")
	deltas := []DictDelta{
		{Family: 0, Cuboid: finest, Values: []uint32{1, 2, 3}, Time: now, Sum: 1, Count: 1},
		{Family: 0, Cuboid: finest, Values: []uint32{1, 4, 3}, Time: now, Sum: 2, Count: 2},
		{Family: 5, Cuboid: code, Values: []uint32{6}, Time: now, Sum: 3, Count: 3},
		{Family: 0, Cuboid: dcs, Values: []uint32{1}, Time: now, Sum: 3, Count: 3},
		{Family: 0, Cuboid: finest, Values: []uint32{1, 2, 3}, Time: now, Sum: 4, Count: 4},
	}
	read := func(db *DB) string {
		t.Helper()
		var out []string
		for _, fc := range []struct {
			fam    string
			cuboid schema.CuboidID
		}{{"requests", finest}, {"requests", dcs}, {"errors", code}} {
			cells, err := db.Cells(fc.fam, fc.cuboid, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cells {
				steps, err := db.Steps(0, fc.fam, fc.cuboid, c.ID, math.MinInt64, math.MaxInt64, nil)
				if err != nil {
					t.Fatal(err)
				}
				out = append(out, fmt.Sprint(fc.fam, c, steps))
			}
		}
		return strings.Join(out, "\n")
	}
	viaDict := openTest(t, t.TempDir(), s)
	defer closeTest(t, viaDict)
	if applied, err := viaDict.ApplyDict(BatchID{Source: "a", Seq: 1}, dict, deltas); err != nil || !applied {
		t.Fatalf("ApplyDict: %v, %v", applied, err)
	}
	viaApply := openTest(t, t.TempDir(), s)
	defer closeTest(t, viaApply)
	var plain []Delta
	for _, d := range deltas {
		var values []string
		for _, v := range d.Values {
			values = append(values, dict[v])
		}
		plain = append(plain, Delta{Family: dict[d.Family], Cuboid: d.Cuboid, Values: values, Time: d.Time, Sum: d.Sum, Count: d.Count})
	}
	if _, err := viaApply.Apply(BatchID{}, plain); err != nil {
		t.Fatal(err)
	}
	if got, want := read(viaDict), read(viaApply); got != want || got == "" {
		t.Fatalf("ApplyDict reads\n%s\nApply reads\n%s", got, want)
	}

	for _, tc := range []struct {
		name   string
		change func(d *DictDelta)
		want   string
	}{
		{"family outside", func(d *DictDelta) { d.Family = 7 }, "family index 7 outside the dictionary of 7 strings"},
		{"value outside", func(d *DictDelta) { d.Values = []uint32{1, 9, 3} }, fmt.Sprintf(`family "requests" cuboid %d: value index 9 outside the dictionary of 7 strings`, finest)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := openTest(t, t.TempDir(), s)
			defer closeTest(t, db)
			bad := slices.Clone(deltas)
			tc.change(&bad[len(bad)-1])
			_, err := db.ApplyDict(BatchID{Source: "a", Seq: 1}, dict, bad)
			if !errors.Is(err, ErrBadInput) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), fmt.Sprintf("delta %d", len(bad)-1)) {
				t.Fatalf("got %v, want ErrBadInput naming delta %d and %q", err, len(bad)-1, tc.want)
			}
			if got := read(db); got != "" {
				t.Fatalf("a refused batch wrote\n%s", got)
			}
		})
	}
}

// TestCellIDAllocs pins Apply's per-delta work at zero allocations once
// the cells exist: checking a delta, resolving its values and finding its
// cell.
func TestCellIDAllocs(t *testing.T) {
	s := testSchema(t)
	finest := cuboidOf(t, s, "requests", "dc", "host", "txn")
	db := openTest(t, t.TempDir(), s)
	defer closeTest(t, db)
	dict := []string{"requests", "d1", "d2", "GET", "POST"}
	var deltas []DictDelta
	for h := range 200 {
		dict = append(dict, fmt.Sprintf("h%d", h))
		for _, x := range []uint32{3, 4} {
			deltas = append(deltas, DictDelta{Family: 0, Cuboid: finest, Values: []uint32{1 + uint32(h%2), uint32(len(dict) - 1), x}, Time: testNow.UnixMilli(), Sum: 1, Count: 1})
		}
	}
	if _, err := db.ApplyDict(BatchID{}, dict, deltas); err != nil {
		t.Fatal(err)
	}
	db.apply.Lock()
	defer db.apply.Unlock()
	b := db.pdb.NewBatch()
	defer b.Close()
	a := &db.apply
	a.nums = make([]uint32, len(dict))
	allocs := testing.AllocsPerRun(20, func() {
		a.run = familyRun{}
		clear(a.nums)
		for i := range deltas {
			d := &deltas[i]
			if err := db.check(dict, d); err != nil {
				t.Fatal(err)
			}
			cell, err := db.cellID(b, db.family(dict, d.Family).cuboids[d.Cuboid], dict, d, nil)
			if err != nil || cell != uint32(i) {
				t.Fatalf("delta %d: cell %d, %v", i, cell, err)
			}
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations a batch of %d deltas of existing cells, want 0", allocs, len(deltas))
	}
	if b.Count() != 0 {
		t.Errorf("the batch holds %d writes, want none: every cell existed", b.Count())
	}
}

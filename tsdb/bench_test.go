package tsdb

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/dimsum/dimsum/schema"
)

// benchDeltas returns one window's partial cube over the default schema:
// hosts x transactions x statuses finest cells, rolled up into every
// cuboid, as an aggregator flushes it.
func benchDeltas(s *schema.Schema, hosts, txns, statuses int, t int64) []Delta {
	fam := s.Family("requests")
	type cellKey [5]string
	var deltas []Delta
	for _, c := range fam.Cuboids() {
		seen := map[cellKey]bool{}
		for h := range hosts {
			for x := range txns {
				for st := range statuses {
					full := []string{fmt.Sprintf("dc%d", h%3), fmt.Sprintf("c%d", h%7), fmt.Sprintf("host%04d", h), fmt.Sprintf("GET /api/%d", x), fmt.Sprint(200 + st)}
					var k cellKey
					values := make([]string, len(c.Slots))
					for i, slot := range c.Slots {
						values[i] = full[slot]
						k[slot] = full[slot]
					}
					if seen[k] {
						continue
					}
					seen[k] = true
					deltas = append(deltas, Delta{Family: "requests", Cuboid: c.ID, Values: values, Time: t, Sum: 3, Count: 3})
				}
			}
		}
	}
	return deltas
}

// BenchmarkApply applies one window's partial cube per iteration, each
// window 10s after the previous one, into every resolution of the default
// schema (10s, 1m, 1h), and times the writer's writes with it: the head is
// flushed before the timer stops. BenchmarkStoredSize measures what the
// data takes on disk. dict=true applies the deltas as a combiner does, by
// ApplyDict with one dictionary of the batch's distinct strings; dict=false
// by Apply, each delta with its strings.
func BenchmarkApply(b *testing.B) {
	for _, sync := range []bool{false, true} {
		for _, dict := range []bool{false, true} {
			b.Run(fmt.Sprintf("sync=%v/dict=%v", sync, dict), func(b *testing.B) {
				benchApply(b, sync, dict)
			})
		}
	}
}

func benchApply(b *testing.B, sync, byDict bool) {
	s := schema.Default()
	now := testNow
	db, err := Open(Options{Dir: b.TempDir(), Schema: s, NoSync: !sync, now: func() time.Time { return now }})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	start := now.Add(-7 * 24 * time.Hour).UnixMilli()
	deltas := benchDeltas(s, 20, 10, 3, start)
	dict, dds := dictOf(deltas)
	apply := func(id BatchID) error {
		var err error
		if byDict {
			for j := range dds {
				dds[j].Time, dds[j].Sum, dds[j].Count = deltas[j].Time, deltas[j].Sum, deltas[j].Count
			}
			_, err = db.ApplyDict(id, dict, dds)
		} else {
			_, err = db.Apply(id, deltas)
		}
		return err
	}
	// Create the cells first: the steady state has them all.
	if err := apply(BatchID{}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range b.N {
		t := start + int64(i%50000)*10000 // stay within the finest retention
		for j := range deltas {
			setWindow(rng, &deltas[j], t)
		}
		if err := apply(BatchID{Source: "bench", Seq: uint64(i)}); err != nil {
			b.Fatal(err)
		}
	}
	// What the head still holds is written within the timing.
	if err := db.Flush(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N*len(deltas))/b.Elapsed().Seconds(), "deltas/s")
	b.ReportMetric(float64(len(deltas)), "deltas/op")
}

// BenchmarkApplyLate applies one window's partial cube per iteration to
// rows already written, 10s apart over a day six days back (past the finest
// retention, so that every group is due at once), and writes each group
// before the next Apply. together=true applies a window whole, as a
// combiner's flush holds it: a parent and its only child gain the same
// deltas, and their alias rows stay. together=false applies each window in
// two batches, every delta in one of them at random, so that a parent's
// deltas and its child's often land in different groups, as writes out of
// order do: aliases are materialized. One status value, as on the sparse
// backfill, so that the cuboids with status repeat those without it. An op
// is one window; materialized/op counts the alias rows the writer replaced
// with whole rows.
func BenchmarkApplyLate(b *testing.B) {
	for _, together := range []bool{true, false} {
		b.Run(fmt.Sprintf("together=%v", together), func(b *testing.B) {
			s := schema.Default()
			db := openTest(b, b.TempDir(), s)
			defer closeTest(b, db)
			start := testNow.Add(-6 * 24 * time.Hour).UnixMilli()
			deltas := benchDeltas(s, 20, 10, 1, start)
			rng := rand.New(rand.NewPCG(3, 4))
			parts := make([][]Delta, 2)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				t := start + int64(i%8640)*10000
				parts[0], parts[1] = parts[0][:0], parts[1][:0]
				for _, d := range deltas {
					d.Time = t
					p := 0
					if !together {
						p = rng.IntN(2)
					}
					parts[p] = append(parts[p], d)
				}
				for _, part := range parts {
					if len(part) == 0 {
						continue
					}
					if _, err := db.Apply(BatchID{}, part); err != nil {
						b.Fatal(err)
					}
					if err := db.Flush(); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N*len(deltas))/b.Elapsed().Seconds(), "deltas/s")
			b.ReportMetric(testutil.ToFloat64(db.metrics.aliasesMaterialized)/float64(b.N), "materialized/op")
		})
	}
}

// dictOf returns deltas in ApplyDict's form, with one dictionary of their
// distinct strings, as a combiner's flush holds them.
func dictOf(deltas []Delta) ([]string, []DictDelta) {
	var dict []string
	index := map[string]uint32{}
	ref := func(s string) uint32 {
		i, ok := index[s]
		if !ok {
			i = uint32(len(dict))
			index[s] = i
			dict = append(dict, s)
		}
		return i
	}
	out := make([]DictDelta, len(deltas))
	for i, d := range deltas {
		out[i] = DictDelta{Family: ref(d.Family), Cuboid: d.Cuboid, Time: d.Time, Sum: d.Sum, Count: d.Count}
		for _, v := range d.Values {
			out[i].Values = append(out[i].Values, ref(v))
		}
	}
	return dict, out
}

// BenchmarkSteps reads one cell over a day at each resolution of the
// default schema, from a compacted store holding two days of 10s steps for a
// few hundred cells.
func BenchmarkSteps(b *testing.B) {
	s := schema.Default()
	now := testNow
	db, err := Open(Options{Dir: b.TempDir(), Schema: s, NoSync: true, now: func() time.Time { return now }})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	start := fillBench(b, db, benchDeltas(s, 5, 4, 2, 0), now.UnixMilli(), 2*24*360)
	finest := s.Family("requests").Finest().ID
	mint, maxt := start, start+24*3600e3-1
	for res := range s.Resolutions {
		b.Run(fmt.Sprintf("res=%v", s.Resolutions[res].Step), func(b *testing.B) {
			var dst []Step
			b.ReportAllocs()
			n := 0
			for range b.N {
				dst, err = db.Steps(res, "requests", finest, 3, mint, maxt, dst[:0])
				if err != nil {
					b.Fatal(err)
				}
				n += len(dst)
			}
			if n == 0 {
				b.Fatal("no steps read")
			}
			b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "steps/s")
			b.ReportMetric(float64(n)/float64(b.N), "steps/op")
		})
	}
}

// BenchmarkMerge folds a full merged row and an operand holding every
// slot, as reads and compactions do.
func BenchmarkMerge(b *testing.B) {
	var full []slotValue
	for slot := range schema.StepsPerRow {
		full = append(full, slotValue{slot, float64(slot * 3), uint64(slot)})
	}
	row, operand := denseOf(full).appendTo(nil), encodeRow(full...)
	key := []byte("key")
	mergeRows(b, key, row, operand)
	b.ReportMetric(float64(b.N*2*schema.StepsPerRow)/b.Elapsed().Seconds(), "steps/s")
	b.ReportMetric(float64(len(row))/schema.StepsPerRow, "B/step")
}

// BenchmarkMergeLone passes one folded hosted row (the 1m steps of six
// hours and their 10s positions) through the merge operator alone, as a
// compaction does when it moves a row that has no other operand.
func BenchmarkMergeLone(b *testing.B) {
	row, fine := randomHosted(rand.New(rand.NewPCG(3, 4)), 6)
	value := appendHosted(nil, row, fine)
	mergeRows(b, []byte("key"), value)
	b.ReportMetric(float64(len(value)), "B/row")
}

// BenchmarkMergeHosted folds two hosted rows, as a compaction does when
// a row has two operands.
func BenchmarkMergeHosted(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	r1, f1 := randomHosted(rng, 6)
	r2, f2 := randomHosted(rng, 6)
	mergeRows(b, []byte("key"), appendHosted(nil, r1, f1), appendHosted(nil, r2, f2))
}

// mergeRows runs b.N merges of one key's operands, newest first, as
// compactions do: Merge of the first, MergeOlder of the others, Finish.
func mergeRows(b *testing.B, key []byte, ops ...[]byte) {
	b.ReportAllocs()
	for range b.N {
		vm, err := rowMerger.Merge(key, ops[0])
		if err != nil {
			b.Fatal(err)
		}
		for _, op := range ops[1:] {
			if err := vm.MergeOlder(op); err != nil {
				b.Fatal(err)
			}
		}
		_, closer, err := vm.Finish(true)
		if err != nil {
			b.Fatal(err)
		}
		closer.Close()
	}
}

// fillBench applies windows batches of deltas, one every 10s up to now,
// with varying counts, then writes the head and compacts the store; it
// returns the first window's time.
func fillBench(b *testing.B, db *DB, deltas []Delta, now int64, windows int) int64 {
	start := now - int64(windows)*10000
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range windows {
		for j := range deltas {
			setWindow(rng, &deltas[j], start+int64(i)*10000)
		}
		if _, err := db.Apply(BatchID{}, deltas); err != nil {
			b.Fatal(err)
		}
	}
	if err := db.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := db.pdb.Compact(context.Background(), []byte{0}, []byte{0xff}, false); err != nil {
		b.Fatal(err)
	}
	return start
}

// sstBytes is the size of db's sstables: what the data takes on disk once
// the write-ahead log is recycled.
func sstBytes(db *DB) int64 {
	m := db.pdb.Metrics()
	return m.Total().TablesSize
}

// setWindow moves a delta to window t with a new, varying count: constant
// values would compress to nothing and flatter the size figures.
func setWindow(rng *rand.Rand, d *Delta, t int64) {
	d.Time = t
	d.Count = uint64(rng.IntN(40))
	d.Sum = float64(d.Count * uint64(1+rng.IntN(3)))
}

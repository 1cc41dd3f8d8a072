package tsdb

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/dimsum/dimsum/schema"
	"github.com/prometheus/prometheus/model/labels"
)

// keyLayout orders the fields of a data key; BenchmarkKeyLayout compares
// the candidates on the two access patterns a query makes: a short range
// over many cells, and a long range over a few.
type keyLayout struct {
	name string
	key  func(row int64, cuboid uint16, cell uint32) []byte
}

var keyLayouts = []keyLayout{
	// Format v1: step | family | cuboid | cell | row.
	{"cell-major", func(row int64, cuboid uint16, cell uint32) []byte {
		k := []byte{prefixData, 0, 0, 0, 10, 0, 1}
		k = binary.BigEndian.AppendUint16(k, cuboid)
		k = binary.BigEndian.AppendUint32(k, cell)
		return binary.BigEndian.AppendUint64(k, flipSign(row))
	}},
	// step | family | cuboid | row | cell.
	{"time-major", func(row int64, cuboid uint16, cell uint32) []byte {
		k := []byte{prefixData, 0, 0, 0, 10, 0, 1}
		k = binary.BigEndian.AppendUint16(k, cuboid)
		k = binary.BigEndian.AppendUint64(k, flipSign(row))
		return binary.BigEndian.AppendUint32(k, cell)
	}},
	// Format v2: step | row | family | cuboid | cell.
	{"time-partitioned", func(row int64, cuboid uint16, cell uint32) []byte {
		k := makeDataKey(10, row, 1, schema.CuboidID(cuboid), cell)
		return k[:]
	}},
}

// BenchmarkKeyLayout writes the same rows under each candidate key layout
// into a raw Pebble store (the row merge operator, compacted): two cuboids
// of 2,000 cells, 120 rows each (30 days of 6h rows at 1m), every row
// holding 24 steps. It then reads, in key order, seeking only over keys it
// does not want:
//
//   - panel: 10 cells of one cuboid over all 120 rows (a Grafana panel over
//     30 days);
//   - top-N: every cell of one cuboid over the last 2 rows (the hosts of the
//     last hour).
func BenchmarkKeyLayout(b *testing.B) {
	const cells, rows, cuboids = 2000, 120, 2
	var slots []slotValue
	for s := range 24 {
		slots = append(slots, slotValue{s * 15, float64(s * 7), uint64(s)})
	}
	value := encodeRow(slots...)
	for _, l := range keyLayouts {
		dir := b.TempDir()
		cache := pebble.NewCache(DefaultCacheSize)
		pdb, err := pebble.Open(dir, pebbleOptions(cache, slog.New(slog.DiscardHandler)))
		if err != nil {
			b.Fatal(err)
		}
		for row := range int64(rows) {
			batch := pdb.NewBatch()
			for c := range uint16(cuboids) {
				for cell := range uint32(cells) {
					if err := batch.Merge(l.key(row, c, cell), value, nil); err != nil {
						b.Fatal(err)
					}
				}
			}
			if err := batch.Commit(pebble.NoSync); err != nil {
				b.Fatal(err)
			}
		}
		if err := pdb.Compact(context.Background(), []byte{0}, []byte{0xff}, false); err != nil {
			b.Fatal(err)
		}
		var panel, topN [][]byte
		for i := range 10 {
			for row := range int64(rows) {
				panel = append(panel, l.key(row, 1, uint32(i*cells/10+7)))
			}
		}
		for cell := range uint32(cells) {
			for row := int64(rows - 2); row < rows; row++ {
				topN = append(topN, l.key(row, 1, cell))
			}
		}
		for _, p := range []struct {
			name  string
			keys  [][]byte
			cells int
		}{{"panel", panel, 10}, {"top-N", topN, cells}} {
			slices.SortFunc(p.keys, bytes.Compare)
			b.Run(fmt.Sprintf("layout=%s/read=%s", l.name, p.name), func(b *testing.B) {
				b.ReportAllocs()
				steps := 0
				for range b.N {
					n, err := readKeys(pdb, p.keys)
					if err != nil {
						b.Fatal(err)
					}
					steps += n
				}
				b.ReportMetric(float64(b.N*p.cells)/b.Elapsed().Seconds(), "cells/s")
				b.ReportMetric(float64(steps)/b.Elapsed().Seconds(), "steps/s")
			})
		}
		cache.Unref()
		if err := pdb.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// readKeys reads the rows of sorted keys with one iterator, stepping with
// Next to an adjacent key and seeking otherwise, and returns the steps
// decoded.
func readKeys(pdb *pebble.DB, keys [][]byte) (int, error) {
	iter, err := pdb.NewIter(nil)
	if err != nil {
		return 0, err
	}
	defer iter.Close()
	var dec rowDecoder
	steps := 0
	valid := false
	for _, k := range keys {
		if valid && bytes.Compare(iter.Key(), k) < 0 {
			valid = iter.Next()
		}
		if !valid || bytes.Compare(iter.Key(), k) < 0 {
			valid = iter.SeekGE(k)
		}
		if !valid || !bytes.Equal(iter.Key(), k) {
			continue
		}
		for dec.init(iter.Value()); ; steps++ {
			if _, _, _, ok := dec.next(); !ok {
				break
			}
		}
		if dec.err != nil {
			return 0, dec.err
		}
	}
	return steps, iter.Error()
}

// BenchmarkScan reads every finest cell of the default schema's requests
// family over the last hour at 10s from a store holding two hours of it
// (10,000 finest cells, every cuboid written; the hour spans two rows),
// with one Scan, against a Steps call per cell.
func BenchmarkScan(b *testing.B) {
	s := schema.Default()
	now := testNow
	db, err := Open(Options{Dir: b.TempDir(), Schema: s, NoSync: true, RetentionInterval: -1, now: func() time.Time { return now }})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	fillBench(b, db, benchDeltas(s, 200, 10, 5, 0), now.UnixMilli(), 400)
	finest := s.Family("requests").Finest().ID
	all, err := db.Cells("requests", finest, nil)
	if err != nil {
		b.Fatal(err)
	}
	mint, maxt := now.UnixMilli()-3600e3, now.UnixMilli()
	report := func(b *testing.B, cells, steps int) {
		if steps == 0 {
			b.Fatal("no steps read")
		}
		b.ReportMetric(float64(cells)/b.Elapsed().Seconds(), "cells/s")
		b.ReportMetric(float64(steps)/b.Elapsed().Seconds(), "steps/s")
	}
	b.Run("read=scan", func(b *testing.B) {
		b.ReportAllocs()
		cells, steps := 0, 0
		for range b.N {
			err := db.Scan(0, "requests", finest, nil, mint, maxt, func(_ uint32, st []Step) error {
				cells++
				steps += len(st)
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		report(b, cells, steps)
	})
	b.Run("read=steps-per-cell", func(b *testing.B) {
		b.ReportAllocs()
		cells, steps := 0, 0
		var dst []Step
		for range b.N {
			for _, c := range all {
				dst, err = db.Steps(0, "requests", finest, c.ID, mint, maxt, dst[:0])
				if err != nil {
					b.Fatal(err)
				}
				cells++
				steps += len(dst)
			}
		}
		report(b, cells, steps)
	})
}

// BenchmarkPostings evaluates regular-expression matchers over a cuboid of
// 1,000,000 cells (10,000 hosts in 10 datacenters, 100 transactions) with
// the postings, against matching every cell as format v1 did.
func BenchmarkPostings(b *testing.B) {
	s, err := schema.Parse([]byte(`
resolutions: ["10s:1d"]
families:
  - name: requests
    dimensions: [dc/host, txn]
`))
	if err != nil {
		b.Fatal(err)
	}
	db, err := Open(Options{Dir: b.TempDir(), Schema: s, NoSync: true, RetentionInterval: -1, now: func() time.Time { return testNow }})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	finest := s.Family("requests").Finest().ID
	const hosts, txns = 10000, 100
	var deltas []Delta
	for h := range hosts {
		for x := range txns {
			deltas = append(deltas, Delta{Family: "requests", Cuboid: finest, Values: []string{fmt.Sprintf("dc%d", h%10), fmt.Sprintf("host%05d", h), fmt.Sprintf("GET /api/%d", x)}, Time: testNow.UnixMilli(), Sum: 1, Count: 1})
		}
		if len(deltas) >= 100000 {
			if _, err := db.Apply(BatchID{}, deltas); err != nil {
				b.Fatal(err)
			}
			deltas = deltas[:0]
		}
	}
	d := db.families["requests"].cuboid(finest)
	if n := d.live.GetCardinality(); n != hosts*txns {
		b.Fatalf("%d cells", n)
	}
	for _, tc := range []struct {
		name string
		m    *labels.Matcher
	}{
		{"prefix", labels.MustNewMatcher(labels.MatchRegexp, "host", "host00.*")},
		{"set", labels.MustNewMatcher(labels.MatchRegexp, "txn", "GET /api/(1|22|33)")},
		{"suffix", labels.MustNewMatcher(labels.MatchRegexp, "host", ".*7")},
		{"not-regexp", labels.MustNewMatcher(labels.MatchNotRegexp, "dc", "dc[1-8]")},
	} {
		ms := []*labels.Matcher{tc.m}
		b.Run(fmt.Sprintf("matcher=%s/eval=postings", tc.name), func(b *testing.B) {
			b.ReportAllocs()
			selected := uint64(0)
			for range b.N {
				d.mu.RLock()
				selected = d.match(ms).GetCardinality()
				d.mu.RUnlock()
			}
			b.ReportMetric(float64(selected), "cells-selected")
			b.ReportMetric(float64(b.N)*hosts*txns/b.Elapsed().Seconds(), "cells/s")
		})
		b.Run(fmt.Sprintf("matcher=%s/eval=every-cell", tc.name), func(b *testing.B) {
			slot := slices.Index(d.labels, tc.m.Name)
			selected := 0
			for range b.N {
				selected = 0
				d.mu.RLock()
				for _, values := range d.cells {
					if tc.m.Matches(values[slot]) {
						selected++
					}
				}
				d.mu.RUnlock()
			}
			b.ReportMetric(float64(selected), "cells-selected")
			b.ReportMetric(float64(b.N)*hosts*txns/b.Elapsed().Seconds(), "cells/s")
		})
	}
}

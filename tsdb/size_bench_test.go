package tsdb

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/storage"
	promtsdb "github.com/prometheus/prometheus/tsdb"

	"github.com/dimsum/dimsum/schema"
)

// sizeResolutions are the default schema's resolutions, each measured in a
// store of its own so that every one holds full rows: 360 steps of the
// workload, a row's span, at that step.
var sizeResolutions = []string{"10s:8d", "1m:35d", "1h:400d"}

// BenchmarkStoredSize writes 360 steps of the storage workload
// (workload_test.go) into a store per resolution through Apply, compacts
// it, and reports what a stored cell-step (a step of one cell, of any
// cuboid, that has data) takes on disk:
//
//   - B/cell-step: the data rows' sstable bytes;
//   - total-B/cell-step: every sstable byte, the cell dictionary included,
//     which a longer retention spreads over more steps;
//   - B/finest-sample (10s only): the data rows' bytes, all 16 cuboids,
//     over the samples the Prometheus peer below stores for the same data.
//
// The peer, prometheus/res=10s, appends the finest cuboid of the same data
// to a Prometheus TSDB as cumulative counters, one sample per finest cell
// per step from the cell's first event on, compacts its head into a block
// on disk and reports the block's bytes per sample.
//
// Run with -benchtime=1x: an iteration builds a whole store.
func BenchmarkStoredSize(b *testing.B) {
	for _, res := range sizeResolutions {
		step, _, _ := strings.Cut(res, ":")
		b.Run("dimsum/res="+step, func(b *testing.B) {
			for range b.N {
				benchStoredSize(b, res)
			}
		})
	}
	b.Run("prometheus/res=10s", func(b *testing.B) {
		for range b.N {
			benchPrometheusSize(b)
		}
	})
}

func benchStoredSize(b *testing.B, res string) {
	s, err := schema.Parse(fmt.Appendf(nil, `
resolutions: [%q]
families:
  - name: requests
    kind: counter
    dimensions: [datacenter/cluster/host, transaction, status]
`, res))
	if err != nil {
		b.Fatal(err)
	}
	r := s.Resolutions[0]
	now := testNow
	db, err := Open(Options{Dir: b.TempDir(), Schema: s, NoSync: true, now: func() time.Time { return now }})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()

	w := newSizeWorkload(s)
	stepMs := r.Step.Milliseconds()
	start := (r.Row(now.UnixMilli()) - 1) * r.RowSpan().Milliseconds()
	first := make([]int, len(w.rate)) // the step of each finest cell's first event, plus one
	var finest []uint64
	var deltas []Delta
	stored := 0
	for i := range schema.StepsPerRow {
		t := start + int64(i)*stepMs
		finest = w.step(t, stepMs, finest)
		for f, n := range finest {
			if n > 0 && first[f] == 0 {
				first[f] = i + 1
			}
		}
		deltas = w.deltas(t, deltas[:0])
		if _, err := db.Apply(BatchID{}, deltas); err != nil {
			b.Fatal(err)
		}
		stored += len(deltas)
	}
	if err := db.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := db.pdb.Compact(context.Background(), []byte{0}, []byte{0xff}, false); err != nil {
		b.Fatal(err)
	}
	if got := storedCellSteps(b, db, s); got != stored {
		b.Fatalf("read back %d cell-steps, wrote %d", got, stored)
	}
	rows, err := db.pdb.EstimateDiskUsage([]byte{prefixData}, []byte{prefixData + 1})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(rows)/float64(stored), "B/cell-step")
	b.ReportMetric(float64(sstBytes(db))/float64(stored), "total-B/cell-step")
	b.ReportMetric(float64(stored), "cell-steps")
	if r.Step == 10*time.Second {
		b.ReportMetric(float64(rows)/float64(promSamples(first)), "B/finest-sample")
	}
}

// storedCellSteps reads back every step of every cell.
func storedCellSteps(b *testing.B, db *DB, s *schema.Schema) int {
	n := 0
	var steps []Step
	for _, c := range s.Family("requests").Cuboids() {
		cells, err := db.Cells("requests", c.ID, nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, cell := range cells {
			steps, err = db.Steps(0, "requests", c.ID, cell.ID, 0, testNow.UnixMilli(), steps[:0])
			if err != nil {
				b.Fatal(err)
			}
			n += len(steps)
		}
	}
	return n
}

// promSamples counts the samples of the Prometheus peer: one per step from
// each finest cell's first event on. first holds that step plus one, or 0.
func promSamples(first []int) int {
	n := 0
	for _, f := range first {
		if f > 0 {
			n += schema.StepsPerRow - (f - 1)
		}
	}
	return n
}

func benchPrometheusSize(b *testing.B) {
	opts := promtsdb.DefaultOptions()
	db, err := promtsdb.Open(b.TempDir(), nil, nil, opts, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	w := newSizeWorkload(schema.Default())
	const stepMs = 10000
	start := testNow.UnixMilli()/3600e3*3600e3 - 3600e3
	lsets := make([]labels.Labels, len(w.finest))
	for f, v := range w.finest {
		lsets[f] = labels.FromStrings("__name__", "requests_total", "datacenter", v[0], "cluster", v[1], "host", v[2], "transaction", v[3], "status", v[4])
	}
	refs := make([]storage.SeriesRef, len(w.finest))
	totals := make([]uint64, len(w.finest))
	started := make([]bool, len(w.finest))
	var finest []uint64
	samples := 0
	var maxt int64
	for i := range schema.StepsPerRow {
		t := start + int64(i)*stepMs
		finest = w.step(t, stepMs, finest)
		app := db.Appender(context.Background())
		// The sample of a step stands at its end, when its count is
		// complete.
		maxt = t + stepMs
		for f, n := range finest {
			totals[f] += n
			if n > 0 {
				started[f] = true
			}
			if !started[f] {
				continue
			}
			refs[f], err = app.Append(refs[f], lsets[f], maxt, float64(totals[f]))
			if err != nil {
				b.Fatal(err)
			}
			samples++
		}
		if err := app.Commit(); err != nil {
			b.Fatal(err)
		}
	}
	if err := db.CompactHead(promtsdb.NewRangeHead(db.Head(), start, maxt)); err != nil {
		b.Fatal(err)
	}
	var size int64
	for _, block := range db.Blocks() {
		size += block.Size()
	}
	if size == 0 {
		b.Fatal("no block written")
	}
	b.ReportMetric(float64(size)/float64(samples), "B/sample")
	b.ReportMetric(float64(samples), "samples")
}

package loadtest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb"

	"github.com/dimsum/dimsum/publisher"
)

// BenchmarkBackfillPrometheusTSDB is the in-process peer of a backfill
// (`dimsum load -series N -backfill D`, and loadtest/backfill-bench.sh): it
// appends the same samples, as cumulative counters, one series per finest
// series, to a Prometheus TSDB in time order, then compacts its head into
// one block on disk. It reports the append rate (samples/s, without the
// compaction) and the block's bytes per sample.
//
// Run with -benchtime=1x: an iteration builds a whole store.
func BenchmarkBackfillPrometheusTSDB(b *testing.B) {
	for _, tc := range []struct {
		series   int
		backfill time.Duration
	}{{2_500, 6 * time.Hour}, {10_000, 24 * time.Hour}} {
		b.Run(fmt.Sprintf("series=%d/backfill=%s", tc.series, tc.backfill), func(b *testing.B) {
			for range b.N {
				benchPrometheusBackfill(b, tc.series, tc.backfill)
			}
		})
	}
}

func benchPrometheusBackfill(b *testing.B, series int, backfill time.Duration) {
	opts := Options{Series: series, Backfill: backfill}
	opts.ensureDefaults()
	if err := opts.validate(); err != nil {
		b.Fatal(err)
	}
	db, err := tsdb.Open(b.TempDir(), nil, nil, tsdb.DefaultOptions(), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	w := newSeriesWorkload(opts, time.Now())
	lsets := make([]labels.Labels, series)
	refs := make([]storage.SeriesRef, series)
	totals := make([]float64, series)
	evs := make([]publisher.Event, 0, series)
	start := time.Now()
	for step := range opts.Events / series {
		evs = w.chunk(evs[:0], uint64(step*series), series, time.Time{})
		app := db.Appender(context.Background())
		for s := range evs {
			e := &evs[s]
			if step == 0 {
				lsets[s] = labels.FromStrings(append([]string{"__name__", opts.Family + "_total"}, e.Labels...)...)
			}
			totals[s] += e.Value
			if refs[s], err = app.Append(refs[s], lsets[s], e.TimestampMS, totals[s]); err != nil {
				b.Fatal(err)
			}
		}
		if err := app.Commit(); err != nil {
			b.Fatal(err)
		}
	}
	appended := time.Since(start)
	if err := db.CompactHead(tsdb.NewRangeHead(db.Head(), w.first, w.last())); err != nil {
		b.Fatal(err)
	}
	var size int64
	for _, block := range db.Blocks() {
		size += block.Size()
	}
	if size == 0 {
		b.Fatal("no block written")
	}
	b.ReportMetric(float64(opts.Events)/appended.Seconds(), "samples/s")
	b.ReportMetric(float64(size)/float64(opts.Events), "B/sample")
}

package query

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/storage"
	promtsdb "github.com/prometheus/prometheus/tsdb"
)

// TestInstantWindowContract checks what docs/grafana.md promises of an
// instant sum_over_time(x_delta[R]) at any time t: it counts exactly the
// events stamped in [floor(t-R), ceil(t)), floor and ceil rounding to the
// steps of the resolution the range reads. The reference is the Prometheus
// engine over the raw events, each a sample of a Prometheus TSDB series,
// asked sum_over_time over that window: [W] at ceil(t) - 1ms, with
// W = ceil(t) - floor(t-R), covers [floor(t-R), ceil(t)) to the millisecond.
func TestInstantWindowContract(t *testing.T) {
	s := testSchema(t) // 10s:8d, 1m:35d
	db := openStore(t, s)
	raw, err := promtsdb.Open(t.TempDir(), nil, nil, promtsdb.DefaultOptions(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()

	// Events at random milliseconds over three hours, two hosts; the raw
	// series holds one sample per millisecond with events, their sum.
	rng := rand.New(rand.NewPCG(5, 8))
	from := time.Now().Add(-4 * time.Hour).Truncate(time.Hour).UnixMilli()
	perMs := map[string]map[int64]float64{"a": {}, "b": {}}
	for range 20_000 {
		h := []string{"a", "b"}[rng.IntN(2)]
		ts, v := from+rng.Int64N(3*3600_000), float64(1+rng.IntN(3))
		putAll(t, db, s, h, ts, v)
		perMs[h][ts] += v
	}
	app := raw.Appender(context.Background())
	for h, byMs := range perMs {
		lset := labels.FromStrings(labels.MetricName, "raw", "host", h)
		for _, ts := range slices.Sorted(func(yield func(int64) bool) {
			for ts := range byMs {
				if !yield(ts) {
					return
				}
			}
		}) {
			if _, err := app.Append(0, lset, ts, byMs[ts]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := app.Commit(); err != nil {
		t.Fatal(err)
	}

	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 1e8, Timeout: time.Minute, LookbackDelta: 5 * time.Minute})
	instant := func(q storage.Queryable, qs string, at int64) float64 {
		t.Helper()
		qry, err := engine.NewInstantQuery(context.Background(), q, nil, qs, time.UnixMilli(at))
		if err != nil {
			t.Fatal(err)
		}
		defer qry.Close()
		vec, err := qry.Exec(context.Background()).Vector()
		if err != nil || len(vec) != 1 {
			t.Fatalf("%s at %d: %v, %v", qs, at, vec, err)
		}
		return vec[0].F
	}
	qa := NewQueryable(s, db, Limits{}, nil)
	exact, edge := 0, 0
	for _, window := range []time.Duration{90 * time.Second, 10 * time.Minute, 30 * time.Minute, time.Hour} {
		res := s.Resolutions[Resolution(s.Resolutions, 0, window.Milliseconds(), 0, 0)]
		step, w := res.Step.Milliseconds(), window.Milliseconds()
		for _, t0 := range []int64{
			from + 2*3600_000,          // a step end at every resolution
			from + 2*3600_000 + 7_777,  // within a step at both
			from + 2*3600_000 + 40_000, // a 10s step end, within a 1m step
			from + 2*3600_000 + w%step + 1,
			from + 3*3600_000 - 1, // t-R+1, where the engine's range starts, a step end
		} {
			lo, hi := res.StepStart(t0-w), -res.StepStart(-t0)
			got := instant(qa, fmt.Sprintf("sum(sum_over_time(x_delta[%s]))", window), t0)
			want := instant(raw, fmt.Sprintf("sum(sum_over_time(raw[%dms]))", hi-lo), hi-1)
			if got != want {
				t.Errorf("sum_over_time(x_delta[%s]) at %d: %v; the events in [%d, %d) (steps of %ds) are %v", window, t0-from, got, lo-from, hi-from, step/1000, want)
			}
			// The events of exactly (t-R, t], which a stat panel's user
			// may expect: equal only when both ends are step ends.
			plain := instant(raw, fmt.Sprintf("sum(sum_over_time(raw[%s]))", window), t0)
			if lo == t0-w && hi == t0 {
				exact++
			} else if plain != got {
				edge++
			}
		}
	}
	if exact == 0 || edge == 0 {
		t.Errorf("%d evaluations on step ends and %d off them that count more than (t-R, t]: the test covers both or neither", exact, edge)
	}
}

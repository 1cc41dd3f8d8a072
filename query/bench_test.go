package query

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/storage"
	promtsdb "github.com/prometheus/prometheus/tsdb"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

// The PromQL benchmarks compare dimsum with the Prometheus engine over
// Prometheus' own TSDB on one workload: 10,000 finest series (4 datacenters
// x 10 clusters x 25 hosts x 10 transactions, one status) with a count every
// minute for the last 24 hours, and one every hour for the 30 days before.
// Prometheus holds each series as a counter sampled at every step end;
// dimsum holds the same counts as deltas in its finest cuboid and in the
// datacenter cuboid, which is all these queries read (an aggregator writes
// every cuboid; the others change nothing here). Setup takes a minute or
// two, once per process.
const (
	benchDCs, benchClusters, benchHosts, benchTxns = 4, 10, 25, 10
	benchMinutes                                   = 24 * 60
	benchHourDays                                  = 30
)

// benchWorld is the workload loaded into both stores.
type benchWorld struct {
	now    time.Time
	qa     *Queryable
	prom   *promtsdb.DB
	engine *promql.Engine
	dir    string
	db     *tsdb.DB
}

// close removes both stores.
func (w *benchWorld) close() {
	w.db.Close()
	w.prom.Close()
	os.RemoveAll(w.dir)
}

// TestMain removes the benchmark stores, which outlive any one benchmark.
func TestMain(m *testing.M) {
	code := m.Run()
	if world != nil {
		world.close()
	}
	os.Exit(code)
}

var (
	worldOnce sync.Once
	world     *benchWorld
	worldErr  error
)

func loadWorld(b *testing.B) *benchWorld {
	b.Helper()
	worldOnce.Do(func() { world, worldErr = buildWorld() })
	if worldErr != nil {
		b.Fatal(worldErr)
	}
	return world
}

func buildWorld() (*benchWorld, error) {
	s, err := schema.Parse([]byte(`
resolutions: ["1m:35d", "1h:400d"]
families:
  - name: requests
    dimensions: [datacenter/cluster/host, transaction, status]
`))
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "dimsum-promql-bench-")
	if err != nil {
		return nil, err
	}
	db, err := tsdb.Open(tsdb.Options{Dir: dir + "/dimsum", Schema: s, NoSync: true})
	if err != nil {
		return nil, err
	}
	popts := promtsdb.DefaultOptions()
	popts.RetentionDuration = 0 // keep all 31 days
	prom, err := promtsdb.Open(dir+"/prometheus", nil, nil, popts, nil)
	if err != nil {
		return nil, err
	}
	now := time.Now().Truncate(time.Hour)
	fam := s.Family("requests")
	finest := fam.Finest().ID
	var dcCuboid schema.CuboidID
	for _, c := range fam.Cuboids() {
		if fmt.Sprint(c.Labels) == "[datacenter]" {
			dcCuboid = c.ID
		}
	}

	// Sample times: hourly for 30 days, then every minute for 24 hours.
	var times []int64
	first := now.Add(-benchMinutes*time.Minute - benchHourDays*24*time.Hour)
	for t := first; t.Before(now.Add(-benchMinutes * time.Minute)); t = t.Add(time.Hour) {
		times = append(times, t.UnixMilli())
	}
	for t := now.Add(-benchMinutes * time.Minute); t.Before(now); t = t.Add(time.Minute) {
		times = append(times, t.UnixMilli())
	}

	rng := rand.New(rand.NewPCG(1, 1))
	type cell struct {
		values []string
		lset   labels.Labels
		ref    storage.SeriesRef
		total  float64
	}
	var cells []*cell
	for dc := range benchDCs {
		for cl := range benchClusters {
			for h := range benchHosts {
				for tx := range benchTxns {
					v := []string{fmt.Sprintf("dc%d", dc), fmt.Sprintf("dc%d-c%d", dc, cl), fmt.Sprintf("dc%d-c%d-h%d", dc, cl, h), fmt.Sprintf("tx%d", tx), "200"}
					cells = append(cells, &cell{
						values: v,
						lset:   labels.FromStrings("__name__", "requests_total", "datacenter", v[0], "cluster", v[1], "host", v[2], "transaction", v[3], "status", v[4]),
						// A large start keeps Prometheus' extrapolation
						// away from the counter's zero point, as dimsum's
						// synthesis does.
						total: 1e6,
					})
				}
			}
		}
	}
	var deltas []tsdb.Delta
	for _, t := range times {
		app := prom.Appender(context.Background())
		dcSums := make([]float64, benchDCs)
		for i, c := range cells {
			v := float64(rng.IntN(4))
			dcSums[i/(len(cells)/benchDCs)] += v
			// A count of the step [t, t+1m) stands at the step's end in
			// both stores.
			c.total += v
			if c.ref, err = app.Append(c.ref, c.lset, t+time.Minute.Milliseconds(), c.total); err != nil {
				return nil, err
			}
			if v > 0 {
				deltas = append(deltas, tsdb.Delta{Family: "requests", Cuboid: finest, Values: c.values, Time: t, Sum: v, Count: uint64(v)})
			}
		}
		if err := app.Commit(); err != nil {
			return nil, err
		}
		for dc, v := range dcSums {
			deltas = append(deltas, tsdb.Delta{Family: "requests", Cuboid: dcCuboid, Values: []string{fmt.Sprintf("dc%d", dc)}, Time: t, Sum: v, Count: uint64(v)})
		}
		if len(deltas) > 200_000 {
			if _, err := db.Apply(tsdb.BatchID{}, deltas); err != nil {
				return nil, err
			}
			deltas = deltas[:0]
		}
	}
	if _, err := db.Apply(tsdb.BatchID{}, deltas); err != nil {
		return nil, err
	}
	if err := prom.Compact(context.Background()); err != nil {
		return nil, err
	}
	return &benchWorld{
		now:  now,
		qa:   NewQueryable(s, db, Limits{MaxSamples: 5e8}, func() time.Time { return now }),
		prom: prom,
		engine: promql.NewEngine(promql.EngineOpts{
			MaxSamples: 5e8, Timeout: 10 * time.Minute, LookbackDelta: 5 * time.Minute,
		}),
		dir: dir,
		db:  db,
	}, nil
}

// run evaluates a range query and returns its result.
func (w *benchWorld) run(b *testing.B, qa storage.Queryable, qs string, start, end time.Time, step time.Duration) promql.Matrix {
	q, err := w.engine.NewRangeQuery(context.Background(), qa, nil, qs, start, end, step)
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	res := q.Exec(context.Background())
	if res.Err != nil {
		b.Fatal(res.Err)
	}
	m, err := res.Matrix()
	if err != nil {
		b.Fatal(err)
	}
	// The engine reuses the points once the query is closed.
	out := make(promql.Matrix, len(m))
	for i, s := range m {
		out[i] = promql.Series{Metric: s.Metric, Floats: append([]promql.FPoint(nil), s.Floats...)}
	}
	return out
}

// BenchmarkPromQL runs each query on both stores. The dimsum figure includes
// planning; before timing, the two answers are checked to agree.
func BenchmarkPromQL(b *testing.B) {
	w := loadWorld(b)
	day := w.now.Add(-24 * time.Hour)
	month := day.Add(-benchHourDays * 24 * time.Hour)
	for _, bc := range []struct {
		name       string
		query      string
		start, end time.Time
		step       time.Duration
	}{
		{"coarse-24h-1m", `sum by (datacenter) (rate(requests_total[5m]))`, day.Add(5 * time.Minute), w.now, time.Minute},
		{"one-host-24h-1m", `rate(requests_total{host="dc1-c3-h7"}[5m])`, day.Add(5 * time.Minute), w.now, time.Minute},
		{"coarse-30d-1h", `sum by (datacenter) (rate(requests_total[2h]))`, month.Add(2 * time.Hour), day, time.Hour},
	} {
		expr, err := promqlParser.ParseExpr(bc.query)
		if err != nil {
			b.Fatal(err)
		}
		plan(w.qa.schema, expr)
		planned := expr.String()
		ours := w.run(b, w.qa, planned, bc.start, bc.end, bc.step)
		theirs := w.run(b, w.prom, bc.query, bc.start, bc.end, bc.step)
		if err := agree(ours, theirs); err != nil {
			b.Fatalf("%s: the stores disagree: %v", bc.name, err)
		}
		b.Run(bc.name+"/dimsum", func(b *testing.B) {
			for b.Loop() {
				expr, _ := promqlParser.ParseExpr(bc.query)
				plan(w.qa.schema, expr)
				w.run(b, w.qa, expr.String(), bc.start, bc.end, bc.step)
			}
		})
		b.Run(bc.name+"/prometheus", func(b *testing.B) {
			for b.Loop() {
				w.run(b, w.prom, bc.query, bc.start, bc.end, bc.step)
			}
		})
	}
}

// agree checks that two answers hold the same series and values.
func agree(a, b promql.Matrix) error {
	if len(a) != len(b) || len(a) == 0 {
		return fmt.Errorf("%d series against %d", len(a), len(b))
	}
	for i := range a {
		if !labels.Equal(a[i].Metric, b[i].Metric) || len(a[i].Floats) != len(b[i].Floats) {
			return fmt.Errorf("series %s (%d points) against %s (%d points)", a[i].Metric, len(a[i].Floats), b[i].Metric, len(b[i].Floats))
		}
		for j, p := range a[i].Floats {
			q := b[i].Floats[j]
			if p.T != q.T || !nearlyEqual(p.F, q.F) {
				return fmt.Errorf("series %s point %d: %v@%d against %v@%d", a[i].Metric, j, p.F, p.T, q.F, q.T)
			}
		}
	}
	return nil
}

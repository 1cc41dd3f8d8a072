package tsdb

import (
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/dimsum/dimsum/schema"
)

// Workload of the storage-size benchmarks: the requests family of the
// default schema as a fleet of web servers counts it from its access logs.
//
//   - 3 datacenters x 4 clusters x 20 hosts = 240 hosts, each host's traffic
//     within ±30% of the mean;
//   - 30 transactions with Zipf popularity (exponent 1: the first takes 25%
//     of the traffic, the last 0.8%);
//   - statuses 200, 404, 500 and 503 with shares 93%, 4%, 2.5% and 0.5%;
//   - 120,000 events per 10s step over the fleet at the daily mean, with a
//     daily cycle of ±40%;
//   - every event has value 1, so a step's sum equals its count.
//
// A finest cell's count in a step is Poisson-distributed around its share of
// the traffic: status-200 cells see about 3 to 150 events a step, error
// cells of rare transactions see one every few minutes. The 28,800 finest
// cells roll up into 39,680 cells over the 16 cuboids.
const (
	sizeDatacenters   = 3
	sizeClusters      = 4 // per datacenter
	sizeHosts         = 20
	sizeTransactions  = 30
	sizeEventsPerStep = 120000 // per 10s, over the fleet
	sizeDailySwing    = 0.4
)

var (
	sizeStatuses     = []string{"200", "404", "500", "503"}
	sizeStatusShares = []float64{0.93, 0.04, 0.025, 0.005}
)

// sizeWorkload generates the workload's steps, rolled up into every cuboid.
type sizeWorkload struct {
	fam     *schema.Family
	cuboids []schema.Cuboid
	rng     *rand.Rand
	// finest holds the label values of each finest cell, in the order of
	// the family's labels (datacenter, cluster, host, transaction, status).
	finest [][]string
	// rate is each finest cell's mean number of events in a 10s step.
	rate []float64
	// cellOf[c][f] is the index, within cuboid c, of finest cell f's cell.
	cellOf [][]int32
	// values[c][i] are the label values of cell i of cuboid c.
	values [][][]string
	// acc[c][i] is the count of cell i of cuboid c in the step being made.
	acc [][]uint64
}

func newSizeWorkload(s *schema.Schema) *sizeWorkload {
	w := &sizeWorkload{fam: s.Family("requests"), rng: rand.New(rand.NewPCG(3, 5))}
	w.cuboids = w.fam.Cuboids()
	var harmonic float64
	for k := 1; k <= sizeTransactions; k++ {
		harmonic += 1 / float64(k)
	}
	hosts := sizeDatacenters * sizeClusters * sizeHosts
	for dc := range sizeDatacenters {
		for cl := range sizeClusters {
			for h := range sizeHosts {
				weight := 0.7 + 0.6*w.rng.Float64()
				for x := range sizeTransactions {
					for st, status := range sizeStatuses {
						w.finest = append(w.finest, []string{
							fmt.Sprintf("dc%d", dc),
							fmt.Sprintf("dc%d-c%d", dc, cl),
							fmt.Sprintf("dc%d-c%d-h%02d", dc, cl, h),
							fmt.Sprintf("/api/v1/op%02d", x),
							status,
						})
						share := weight / float64(hosts) / (float64(x+1) * harmonic) * sizeStatusShares[st]
						w.rate = append(w.rate, sizeEventsPerStep*share)
					}
				}
			}
		}
	}
	for _, c := range w.cuboids {
		index := map[string]int32{}
		var cellOf []int32
		var values [][]string
		for _, full := range w.finest {
			v := make([]string, len(c.Slots))
			for i, slot := range c.Slots {
				v[i] = full[slot]
			}
			k := fmt.Sprint(v)
			id, ok := index[k]
			if !ok {
				id = int32(len(values))
				index[k] = id
				values = append(values, v)
			}
			cellOf = append(cellOf, id)
		}
		w.cellOf = append(w.cellOf, cellOf)
		w.values = append(w.values, values)
		w.acc = append(w.acc, make([]uint64, len(values)))
	}
	return w
}

// step draws the finest counts of one step of the given length (a multiple
// of 10s) starting at t (unix ms), rolls them up into w.acc, and returns the
// finest counts.
func (w *sizeWorkload) step(t int64, step int64, finest []uint64) []uint64 {
	day := float64(t%86400000) / 86400000
	scale := float64(step) / 10000 * (1 + sizeDailySwing*math.Sin(2*math.Pi*day))
	finest = finest[:0]
	for _, acc := range w.acc {
		clear(acc)
	}
	for f, rate := range w.rate {
		n := poisson(w.rng, rate*scale)
		finest = append(finest, n)
		if n == 0 {
			continue
		}
		for c, acc := range w.acc {
			acc[w.cellOf[c][f]] += n
		}
	}
	return finest
}

// deltas appends the non-empty cells of the step last made by step, as
// deltas at time t.
func (w *sizeWorkload) deltas(t int64, dst []Delta) []Delta {
	for c, acc := range w.acc {
		for i, n := range acc {
			if n == 0 {
				continue
			}
			dst = append(dst, Delta{Family: "requests", Cuboid: w.cuboids[c].ID, Values: w.values[c][i], Time: t, Sum: float64(n), Count: n})
		}
	}
	return dst
}

// poisson draws a Poisson-distributed count of mean lambda: by Knuth's
// product of uniforms for small means, by the normal approximation for
// large ones, where it is within a fraction of a percent.
func poisson(rng *rand.Rand, lambda float64) uint64 {
	if lambda < 30 {
		limit, p := math.Exp(-lambda), rng.Float64()
		n := uint64(0)
		for p > limit {
			p *= rng.Float64()
			n++
		}
		return n
	}
	return uint64(max(0, math.Round(lambda+math.Sqrt(lambda)*rng.NormFloat64())))
}

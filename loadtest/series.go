package loadtest

import (
	"fmt"
	"math"
	"time"

	"github.com/dimsum/dimsum/publisher"
)

// seriesWorkload is the shape of a fleet's per-minute counters: every finest
// series (a host and a transaction, one status) gets exactly one event a
// Step, the count of its requests in that step, as a log-to-metrics pipeline
// emits them. Event idx belongs to step idx / Series and series
// idx % Series, so a step's events go out together, host after host.
//
// Each series keeps its own offset within the step (the second its
// pipeline emits at) and its own rate: a Poisson count whose mean falls
// with the transaction's Zipf rank and varies by host. Values derive from
// the seed and the event's index alone.
type seriesWorkload struct {
	opts   Options
	hosts  [][3]string
	txns   []string
	stepMS int64
	// first is the start of the first step, in unix ms: Backfill before the
	// run's start, aligned on Step, or the run's start when live.
	first int64
	// offsets holds each series' offset within its step, in ms.
	offsets []int64
	// counts holds, per series, a table of its count's quantiles: a
	// uniform 10-bit number picks the count.
	counts [][]uint16
	labels []string
}

// quantileBits is the resolution of the count tables: 1,024 quantiles.
const quantileBits = 10

func newSeriesWorkload(opts Options, start time.Time) *seriesWorkload {
	w := &seriesWorkload{opts: opts, stepMS: opts.Step.Milliseconds()}
	base := newWorkload(opts) // the transaction names
	w.txns = base.txns
	hosts := opts.Series / opts.Transactions
	clusters := opts.Datacenters * opts.ClustersPerDC
	for h := range hosts {
		c := h % clusters
		dc := fmt.Sprintf("dc%d", c/opts.ClustersPerDC+1)
		cl := fmt.Sprintf("%s-c%d", dc, c%opts.ClustersPerDC+1)
		w.hosts = append(w.hosts, [3]string{dc, cl, fmt.Sprintf("%s-h%04d", cl, h/clusters+1)})
	}
	w.first = start.UnixMilli()
	if opts.Backfill > 0 {
		w.first -= opts.Backfill.Milliseconds()
	}
	w.first -= mod(w.first, w.stepMS)
	tables := map[float64][]uint16{}
	for s := range opts.Series {
		w.offsets = append(w.offsets, int64(mix(opts.Seed, uint64(s))%uint64(opts.Step/time.Second))*1000)
		// Hosts come in four sizes, transactions in Zipf popularity.
		mean := 10 / float64(s%opts.Transactions+1) * (0.5 + 0.5*float64(s/opts.Transactions%4))
		if tables[mean] == nil {
			tables[mean] = poissonQuantiles(mean)
		}
		w.counts = append(w.counts, tables[mean])
	}
	return w
}

// steps is how many steps the run covers.
func (w *seriesWorkload) steps() int { return w.opts.Events / w.opts.Series }

// last is the end of the last step the run covers, in unix ms.
func (w *seriesWorkload) last() int64 { return w.first + int64(w.steps())*w.stepMS }

// chunk appends the n events from index first on. A backfill stamps them
// at their step's time; a live run at now, which the schedule keeps within
// their step.
func (w *seriesWorkload) chunk(dst []publisher.Event, first uint64, n int, now time.Time) []publisher.Event {
	for idx := first; idx < first+uint64(n); idx++ {
		s := int(idx % uint64(w.opts.Series))
		ts := now.UnixMilli()
		if w.opts.Backfill > 0 {
			ts = w.first + int64(idx/uint64(w.opts.Series))*w.stepMS + w.offsets[s]
		}
		h, t := w.hosts[s/w.opts.Transactions], w.txns[s%w.opts.Transactions]
		if len(w.labels) < labelsPerEvent {
			w.labels = make([]string, labelsPerEvent*4096)
		}
		l := w.labels[:labelsPerEvent:labelsPerEvent]
		w.labels = w.labels[labelsPerEvent:]
		l[0], l[1], l[2], l[3], l[4], l[5] = "datacenter", h[0], "cluster", h[1], "host", h[2]
		l[6], l[7], l[8], l[9] = "transaction", t, "status", "200"
		count := w.counts[s][mix(w.opts.Seed, idx)>>(64-quantileBits)]
		dst = append(dst, publisher.Event{Family: w.opts.Family, TimestampMS: ts, Value: float64(count), Labels: l})
	}
	return dst
}

// poissonQuantiles returns the Poisson(mean) count at the middle of each of
// 1,024 equal slices of probability.
func poissonQuantiles(mean float64) []uint16 {
	q := make([]uint16, 1<<quantileBits)
	k, p := 0, math.Exp(-mean)
	cdf := p
	for i := range q {
		for u := (float64(i) + 0.5) / float64(len(q)); cdf < u && k < math.MaxUint16; {
			k++
			p *= mean / float64(k)
			cdf += p
		}
		q[i] = uint16(k)
	}
	return q
}

// mix is SplitMix64's finalizer over the seed and x: a well-spread 64-bit
// hash, so a value depends on its event's index alone.
func mix(seed, x uint64) uint64 {
	z := seed*0x9e3779b97f4a7c15 + x
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

func mod(a, b int64) int64 { return (a%b + b) % b }

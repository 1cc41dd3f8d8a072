package loadtest

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"time"

	"github.com/dimsum/dimsum/publisher"
)

// workload generates the events of a run from the seed alone: the chunk
// from a given index on is the same in every run with the same options,
// timestamps aside.
type workload struct {
	opts    Options
	dcs     []string
	hosts   [][3]string // datacenter, cluster, host
	txns    []string
	weights []float64 // cumulative Zipf weights of txns
	// labels holds 10 strings a event, handed out in chunks, so that an
	// event's labels cost no allocation of their own.
	labels []string
}

func newWorkload(opts Options) *workload {
	w := &workload{opts: opts}
	for d := range opts.Datacenters {
		dc := fmt.Sprintf("dc%d", d+1)
		w.dcs = append(w.dcs, dc)
		for c := range opts.ClustersPerDC {
			cl := fmt.Sprintf("%s-c%d", dc, c+1)
			for h := range opts.HostsPerCluster {
				w.hosts = append(w.hosts, [3]string{dc, cl, fmt.Sprintf("%s-h%03d", cl, h+1)})
			}
		}
	}
	verbs := []string{"get", "put", "list", "search", "checkout", "login", "view", "update", "delete", "pay"}
	nouns := []string{"item", "cart", "user", "order", "listing", "offer", "feed", "image", "review", "bid"}
	sum := 0.0
	for t := range opts.Transactions {
		w.txns = append(w.txns, verbs[t%len(verbs)]+"_"+nouns[(t/len(verbs))%len(nouns)]+suffix(t/(len(verbs)*len(nouns))))
		sum += 1 / float64(t+1) // Zipf with exponent 1
		w.weights = append(w.weights, sum)
	}
	return w
}

func suffix(n int) string {
	if n == 0 {
		return ""
	}
	return strconv.Itoa(n + 1)
}

// labelsPerEvent is the number of label strings of an event: five pairs.
const labelsPerEvent = 10

// chunk appends n events, drawn from the seed and first, stamped at now (a
// LateFraction of them up to LateBound earlier).
func (w *workload) chunk(dst []publisher.Event, first uint64, n int, now time.Time) []publisher.Event {
	r := rand.New(rand.NewPCG(w.opts.Seed, first))
	nowMS := now.UnixMilli()
	total := w.weights[len(w.weights)-1]
	late := w.opts.LateBound.Milliseconds()
	for range n {
		h := w.hosts[r.IntN(len(w.hosts))]
		t, _ := slices.BinarySearch(w.weights, r.Float64()*total)
		t = min(t, len(w.txns)-1)
		status := "200"
		switch p := r.Float64(); {
		case p < 0.02:
			status = "500"
		case p < 0.05:
			status = "404"
		}
		ts := nowMS
		if r.Float64() < w.opts.LateFraction {
			ts -= 1 + r.Int64N(late)
		}
		if len(w.labels) < labelsPerEvent {
			w.labels = make([]string, labelsPerEvent*4096)
		}
		l := w.labels[:labelsPerEvent:labelsPerEvent]
		w.labels = w.labels[labelsPerEvent:]
		l[0], l[1], l[2], l[3], l[4], l[5] = "datacenter", h[0], "cluster", h[1], "host", h[2]
		l[6], l[7], l[8], l[9] = "transaction", w.txns[t], "status", status
		dst = append(dst, publisher.Event{Family: w.opts.Family, TimestampMS: ts, Value: float64(1 + r.IntN(3)), Labels: l})
	}
	return dst
}

// datacenter is the datacenter label of an event the workload made.
func datacenter(e *publisher.Event) string { return e.Labels[1] }

// diurnal is the rate factor at elapsed time d into the run: a simulated day
// of opts.Day begins at opts.StartHour, and the rate swings by
// ±opts.Diurnal around its mean, peaking at 15:00 and lowest at 03:00, as
// the traffic of one region does.
func (o *Options) diurnal(d time.Duration) float64 {
	return 1 + o.Diurnal*math.Cos(o.phase(d))
}

// due is how many events an open-loop run should have sent d into the run:
// the integral of Rate × diurnal from 0 to d.
func (o *Options) due(d time.Duration) float64 {
	day := o.Day.Seconds()
	swing := o.Diurnal * day / (2 * math.Pi) * (math.Sin(o.phase(d)) - math.Sin(o.phase(0)))
	return o.Rate * (d.Seconds() + swing)
}

// phase is the angle of the simulated hour d into the run, 0 at 15:00.
func (o *Options) phase(d time.Duration) float64 {
	hour := o.StartHour + 24*d.Seconds()/o.Day.Seconds()
	return 2 * math.Pi * (hour - 15) / 24
}

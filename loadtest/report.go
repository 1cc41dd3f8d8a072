package loadtest

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"math/bits"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dimsum/dimsum/publisher"
)

// Report is what a run sent, what the nodes said of it and, with Verify,
// what they read back.
type Report struct {
	Events   uint64 `json:"events"`   // events given to the publisher
	Accepted uint64 `json:"accepted"` // events acknowledged and counted
	Rejected uint64 `json:"rejected"` // events a node refused
	// Rejects counts refused events by reason; Dropped counts events the
	// publisher did not send, by reason.
	Rejects map[string]uint64 `json:"rejects"`
	Dropped map[string]uint64 `json:"dropped"`
	Retries uint64            `json:"retries"`
	// Backpressured counts the retries a node asked for, with a delay,
	// because its store was behind (among Retries).
	Backpressured uint64 `json:"backpressured"`
	Failovers     uint64 `json:"failovers"`
	Duplicates    uint64 `json:"duplicate_batches"`
	// Totals is the sum of accepted values per family; ByDatacenter the
	// same per family and datacenter. They are what Verify expects to read.
	Totals       map[string]float64            `json:"totals"`
	ByDatacenter map[string]map[string]float64 `json:"by_datacenter"`
	Duration     time.Duration                 `json:"duration_ns"`
	TargetRate   float64                       `json:"target_rate,omitempty"`
	// Latency holds percentiles of the time from an event's Add to its
	// batch's acknowledgement, over acknowledged events.
	Latency Latency `json:"ack_latency"`
	// Server holds the nodes' own ingest counters over the run, summed
	// over the nodes; nil when /metrics could not be scraped.
	Server *ServerFigures `json:"server,omitempty"`
	// ReadBack holds what Verify read through PromQL, like Totals.
	ReadBack *ReadBack `json:"read_back,omitempty"`
}

// Latency percentiles, each within 1/32 of the true value.
type Latency struct {
	P50  time.Duration `json:"p50_ns"`
	P99  time.Duration `json:"p99_ns"`
	P999 time.Duration `json:"p999_ns"`
	Max  time.Duration `json:"max_ns"`
}

// ReadBack is what the nodes answered to Verify's queries.
type ReadBack struct {
	Events       uint64                        `json:"events"` // events the nodes hold over the run (the slice API's count), or their accepted counters without slices
	Totals       map[string]float64            `json:"totals"`
	ByDatacenter map[string]map[string]float64 `json:"by_datacenter"`
	Verified     bool                          `json:"verified"`
	// SettledIn is the time from the run's start to the read that matched:
	// the events per second the store settled is Accepted over it.
	SettledIn time.Duration `json:"settled_in_ns"`
	// Warnings are what the last answers said they may lack.
	Warnings []string `json:"warnings,omitempty"`
}

// SettledRate is the events per second from the run's start until they
// were all readable; 0 when they never were.
func (r Report) SettledRate() float64 {
	if r.ReadBack == nil || !r.ReadBack.Verified {
		return 0
	}
	return float64(r.Accepted) / r.ReadBack.SettledIn.Seconds()
}

// Rate is the events acknowledged per second; 0 for a run that sent
// nothing, as one that could not begin.
func (r Report) Rate() float64 {
	if r.Duration <= 0 {
		return 0
	}
	return float64(r.Accepted) / r.Duration.Seconds()
}

// MarshalJSON adds the achieved rate to the figures.
func (r Report) MarshalJSON() ([]byte, error) {
	type plain Report
	return json.Marshal(struct {
		plain
		Rate        float64 `json:"rate"`
		SettledRate float64 `json:"settled_rate,omitempty"`
	}{plain(r), r.Rate(), r.SettledRate()})
}

// String renders the report for people.
func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sent %d events in %s: %.0f events/s acknowledged", r.Events, r.Duration.Round(time.Millisecond), r.Rate())
	if r.TargetRate > 0 {
		fmt.Fprintf(&b, " (open loop, mean target %.0f)", r.TargetRate)
	}
	fmt.Fprintf(&b, "\nack latency p50 %s, p99 %s, p999 %s, max %s\n", r.Latency.P50, r.Latency.P99, r.Latency.P999, r.Latency.Max)
	fmt.Fprintf(&b, "accepted %d, rejected %d\n", r.Accepted, r.Rejected)
	for _, reason := range slices.Sorted(maps.Keys(r.Rejects)) {
		fmt.Fprintf(&b, "  rejected %s: %d\n", reason, r.Rejects[reason])
	}
	for _, reason := range slices.Sorted(maps.Keys(r.Dropped)) {
		fmt.Fprintf(&b, "dropped %s: %d\n", reason, r.Dropped[reason])
	}
	if r.Retries > 0 || r.Failovers > 0 || r.Duplicates > 0 {
		fmt.Fprintf(&b, "retries %d (%d asked for by a node behind), failovers %d, batches acknowledged as duplicates %d\n", r.Retries, r.Backpressured, r.Failovers, r.Duplicates)
	}
	for _, fam := range slices.Sorted(maps.Keys(r.Totals)) {
		fmt.Fprintf(&b, "total %s: %s\n", fam, num(r.Totals[fam]))
		for _, dc := range slices.Sorted(maps.Keys(r.ByDatacenter[fam])) {
			fmt.Fprintf(&b, "  datacenter=%s: %s\n", dc, num(r.ByDatacenter[fam][dc]))
		}
	}
	if s := r.Server; s != nil {
		fmt.Fprintf(&b, "server: accepted %d, rejected %d, late %d, duplicate batches %d\n", s.Accepted, s.Rejected, s.Late, s.Duplicates)
		fmt.Fprintf(&b, "server memory: heap in use %d MiB (%d MiB before), %d live cells: about %.0f B a live cell\n",
			s.HeapBytes>>20, s.HeapBytesBefore>>20, s.LiveCells, s.BytesPerLiveCell())
	}
	if rb := r.ReadBack; rb != nil {
		verdict := "verified: the nodes hold exactly what was acknowledged"
		if !rb.Verified {
			verdict = "NOT verified"
		}
		fmt.Fprintf(&b, "%s (events %d", verdict, rb.Events)
		for _, fam := range slices.Sorted(maps.Keys(rb.Totals)) {
			fmt.Fprintf(&b, ", %s %s", fam, num(rb.Totals[fam]))
		}
		b.WriteString(")\n")
		for _, w := range rb.Warnings {
			fmt.Fprintf(&b, "  the answers said: %s\n", w)
		}
		if rb.Verified {
			fmt.Fprintf(&b, "settled (all readable) %s after the start: %.0f events/s\n", rb.SettledIn.Round(time.Millisecond), r.SettledRate())
		}
	}
	return b.String()
}

func num(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// recorder keeps what the publisher reports of each batch.
type recorder struct {
	family string
	mu     sync.Mutex
	totals map[string]float64 // accepted values per datacenter
	hist   histogram
}

func newRecorder(family string) *recorder {
	return &recorder{family: family, totals: map[string]float64{}}
}

// result is the publisher's OnResult: it totals the accepted events and
// times every acknowledged one.
func (r *recorder) result(res *publisher.Result) {
	if res.Err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	rejects := res.Rejects
	for i := range res.Events {
		if len(rejects) > 0 && int(rejects[0].Index) == i {
			rejects = rejects[1:]
			continue
		}
		r.totals[datacenter(&res.Events[i])] += res.Events[i].Value
		r.hist.add(res.Waited(i))
	}
}

// fill completes a report with the recorder's totals and the publisher's
// counts.
func (r *recorder) fill(rep *Report, s publisher.Stats) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rep.Events = s.Added
	rep.Accepted = s.Sent
	rep.Rejects = s.Rejected
	rep.Rejected = sum(s.Rejected)
	rep.Dropped = s.Dropped
	rep.Retries, rep.Backpressured, rep.Failovers, rep.Duplicates = s.Retries, s.Backpressured, s.Failovers, s.Duplicates
	rep.ByDatacenter = map[string]map[string]float64{r.family: maps.Clone(r.totals)}
	rep.Totals = map[string]float64{r.family: sumValues(r.totals)}
	rep.Latency = Latency{P50: r.hist.quantile(0.5), P99: r.hist.quantile(0.99), P999: r.hist.quantile(0.999), Max: r.hist.max}
}

// histogram counts durations in log-linear buckets: 32 a power of two, so a
// quantile is within 1/32 of the truth. It takes no allocation an event.
type histogram struct {
	counts [64 * subBuckets]uint64
	n      uint64
	max    time.Duration
}

const subBits = 5
const subBuckets = 1 << subBits

func bucketOf(d time.Duration) int {
	v := uint64(max(d, 0))
	if v < subBuckets {
		return int(v)
	}
	e := bits.Len64(v) - 1 - subBits // the shift that leaves subBits+1 bits
	return (e+1)*subBuckets + int(v>>e) - subBuckets
}

// bucketTop is the largest duration of bucket i.
func bucketTop(i int) time.Duration {
	if i < subBuckets {
		return time.Duration(i)
	}
	e := i/subBuckets - 1
	m := uint64(i%subBuckets + subBuckets)
	return time.Duration((m+1)<<e - 1)
}

func (h *histogram) add(d time.Duration) {
	h.counts[bucketOf(d)]++
	h.n++
	h.max = max(h.max, d)
}

// quantile returns the top of the bucket holding quantile q.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(bucketTop(i), h.max)
		}
	}
	return h.max
}

// WriteFile writes the report as JSON.
func (r Report) WriteFile(name string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(name, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("loadtest: cannot write the report: %w", err)
	}
	return nil
}

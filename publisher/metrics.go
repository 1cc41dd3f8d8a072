package publisher

import (
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// The causes of a drop, as the dropped metric's reason label shows them.
const (
	dropBufferFull = iota // the buffer was full under DropHead or DropTail
	dropFailed            // a push failed with an error no retry mends
	dropUnsent            // Close's deadline passed first
	numDropReasons
)

var dropReasons = [numDropReasons]string{"buffer_full", "failed", "unsent"}

// RefusedReason is the reject reason of the events of a batch the node
// refused whole (gRPC InvalidArgument).
const RefusedReason = "batch_refused"

// counters hold what a publisher did; Stats and the metrics read them.
type counters struct {
	added, sent, batches, duplicates, retries, failovers, backpressured atomic.Uint64
	dropped                                                             [numDropReasons]atomic.Uint64

	mu       sync.Mutex
	rejected map[string]uint64 // by reason
}

func (c *counters) reject(rs []*wirepb.Reject) {
	if len(rs) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rejected == nil {
		c.rejected = map[string]uint64{}
	}
	for _, r := range rs {
		c.rejected[wire.ReasonName(r.Reason)]++
	}
}

func (c *counters) refuse(n uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rejected == nil {
		c.rejected = map[string]uint64{}
	}
	c.rejected[RefusedReason] += n
}

// Stats is what a publisher has done so far. Once Close has returned,
// Added = Sent + the sum of Rejected + the sum of Dropped.
type Stats struct {
	Added uint64 // events given to Add (not those Add returned an error for)
	Sent  uint64 // events a node acknowledged and counted
	// Rejected counts refused events by reason: the node's reason
	// (wire.ReasonName) for single events, RefusedReason for a batch
	// refused whole.
	Rejected map[string]uint64
	// Dropped counts events not sent, by cause: buffer_full (the policy
	// dropped them), failed (an error no retry mends) and unsent (Close's
	// deadline passed).
	Dropped    map[string]uint64
	Batches    uint64 // batches acknowledged
	Duplicates uint64 // of those, acknowledged as counted before
	Retries    uint64 // failed attempts that were retried
	// Backpressured counts the retries a node asked for, with a delay,
	// because it was taking less than it was sent (among Retries).
	Backpressured uint64
	Failovers     uint64 // moves to the next node
	Buffered      int    // events in the ring buffer now
}

// Stats returns what the publisher has done so far.
func (p *Publisher) Stats() Stats {
	s := Stats{
		Added:         p.stats.added.Load(),
		Sent:          p.stats.sent.Load(),
		Batches:       p.stats.batches.Load(),
		Duplicates:    p.stats.duplicates.Load(),
		Retries:       p.stats.retries.Load(),
		Backpressured: p.stats.backpressured.Load(),
		Failovers:     p.stats.failovers.Load(),
		Rejected:      map[string]uint64{},
		Dropped:       map[string]uint64{},
	}
	for i, r := range dropReasons {
		if n := p.stats.dropped[i].Load(); n > 0 {
			s.Dropped[r] = n
		}
	}
	p.stats.mu.Lock()
	for r, n := range p.stats.rejected {
		s.Rejected[r] = n
	}
	p.stats.mu.Unlock()
	p.mu.Lock()
	s.Buffered = p.mu.n
	p.mu.Unlock()
	return s
}

var (
	addedDesc = prometheus.NewDesc("dimsum_publisher_events_added_total",
		"Events given to the publisher.", nil, nil)
	sentDesc = prometheus.NewDesc("dimsum_publisher_events_sent_total",
		"Events a node acknowledged and counted.", nil, nil)
	rejectedDesc = prometheus.NewDesc("dimsum_publisher_events_rejected_total",
		"Events a node refused, by reason; batch_refused when it refused the whole batch. Never retried.", []string{"reason"}, nil)
	droppedDesc = prometheus.NewDesc("dimsum_publisher_events_dropped_total",
		"Events not sent, by reason: buffer_full (the buffer policy), failed (an error no retry mends), unsent (the close deadline passed).", []string{"reason"}, nil)
	batchesDesc = prometheus.NewDesc("dimsum_publisher_batches_sent_total",
		"Batches a node acknowledged.", nil, nil)
	duplicatesDesc = prometheus.NewDesc("dimsum_publisher_batches_duplicate_total",
		"Acknowledged batches the node had counted before: retries after a lost reply.", nil, nil)
	retriesDesc = prometheus.NewDesc("dimsum_publisher_push_retries_total",
		"Failed push attempts that were retried.", nil, nil)
	backpressuredDesc = prometheus.NewDesc("dimsum_publisher_push_backpressured_total",
		"Retried push attempts that a node refused for back-pressure, asking to come back after a delay (among the retries).", nil, nil)
	failoversDesc = prometheus.NewDesc("dimsum_publisher_failovers_total",
		"Moves to the next node of the destination after a failed attempt.", nil, nil)
	bufferedDesc = prometheus.NewDesc("dimsum_publisher_buffered_events",
		"Events waiting in the ring buffer.", nil, nil)
)

// collector exports Stats as metrics, so that the two never disagree.
type collector struct{ p *Publisher }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{addedDesc, sentDesc, rejectedDesc, droppedDesc, batchesDesc, duplicatesDesc, retriesDesc, backpressuredDesc, failoversDesc, bufferedDesc} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	s := c.p.Stats()
	counter := func(d *prometheus.Desc, v uint64, lvs ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), lvs...)
	}
	counter(addedDesc, s.Added)
	counter(sentDesc, s.Sent)
	for r, n := range s.Rejected {
		counter(rejectedDesc, n, r)
	}
	for _, r := range dropReasons {
		counter(droppedDesc, s.Dropped[r], r)
	}
	counter(batchesDesc, s.Batches)
	counter(duplicatesDesc, s.Duplicates)
	counter(retriesDesc, s.Retries)
	counter(backpressuredDesc, s.Backpressured)
	counter(failoversDesc, s.Failovers)
	ch <- prometheus.MustNewConstMetric(bufferedDesc, prometheus.GaugeValue, float64(s.Buffered))
}

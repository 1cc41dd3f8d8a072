package aggregator

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	accepted       prometheus.Counter
	rejected       *prometheus.CounterVec
	late           prometheus.Counter
	batchesRefused prometheus.Counter
	duplicates     prometheus.Counter
	forgotten      prometheus.Counter
	flushes        prometheus.Counter
	flushedCells   prometheus.Counter
	flushErrors    prometheus.Counter
	openWindows    prometheus.Gauge
	liveCells      prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		accepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_events_accepted_total",
			Help: "Events validated and counted into the in-memory cube.",
		}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_aggregator_events_rejected_total",
			Help: "Events refused, by reason; each was reported to its publisher.",
		}, []string{"reason"}),
		late: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_events_late_total",
			Help: "Accepted events whose window had already closed; they went out as late deltas.",
		}),
		batchesRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_batches_refused_total",
			Help: "Whole batches refused for exceeding the batch size limit.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_batches_duplicate_total",
			Help: "Batches acknowledged without counting because their identity was counted before: retries of a batch whose reply was lost.",
		}),
		forgotten: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_batches_beyond_dedupe_window_total",
			Help: "Batches counted although their sequence was too far behind their source's newest to tell a retry from a first attempt.",
		}),
		flushes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_flushes_total",
			Help: "Partial cubes taken by a combiner.",
		}),
		flushedCells: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_flushed_cells_total",
			Help: "Cells in the partial cubes taken by a combiner.",
		}),
		flushErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_flush_errors_total",
			Help: "Failed flush attempts; each is retried with backoff, unless the combiner refused the flush as malformed.",
		}),
		openWindows: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dimsum_aggregator_open_windows",
			Help: "Windows held in memory, waiting for their grace period to pass.",
		}),
		liveCells: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dimsum_aggregator_live_cells",
			Help: "Cells of every cuboid in the windows held in memory, as of the last look for closed windows.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.accepted, m.rejected, m.late, m.batchesRefused, m.duplicates, m.forgotten, m.flushes, m.flushedCells, m.flushErrors, m.openWindows, m.liveCells)
	}
	return m
}

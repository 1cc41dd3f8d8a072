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
	flushLag       prometheus.Histogram
	flushErrors    prometheus.Counter
	forwarded      *prometheus.CounterVec // events, by outcome
	forwardErrors  prometheus.Counter
	openWindows    prometheus.Gauge
	liveCells      prometheus.Gauge

	batchesBackpressured *prometheus.CounterVec
	batchesLowDisk       prometheus.Counter
	handoffPending       *prometheus.GaugeVec
	walSync              prometheus.Histogram
	replayedRecords      prometheus.Counter
	replayedEvents       prometheus.Counter
	replaySkipped        prometheus.Counter
}

// newMetrics builds the metrics; walBytes reads the log's size,
// pendingBytes the memory of the outbox and walFree the free space of the
// log's filesystem when they are gathered.
func newMetrics(reg prometheus.Registerer, walBytes, pendingBytes, walFree func() float64) *metrics {
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
		flushLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dimsum_aggregator_flush_lag_seconds",
			Help:    "Time from a window's end to a combiner replica taking its partial cube: grace, flush interval and delivery, and for late events or a replica that was down, how late.",
			Buckets: prometheus.ExponentialBuckets(0.25, 2, 14), // 0.25s to about 34m
		}),
		flushErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_flush_errors_total",
			Help: "Failed flush attempts; each is retried with backoff, unless the combiner refused the flush as malformed.",
		}),
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_aggregator_forwarded_events_total",
			Help: "Events of batches taken here that another aggregator owns, by outcome: queued (logged here and acknowledged to the publisher), delivered (the owner took them), refused (the owner rejected them; each is logged), handed_over (their owner was declared dead and they went on to its keys' new owners).",
		}, []string{"outcome"}),
		forwardErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_forward_errors_total",
			Help: "Failed attempts to deliver a forwarded batch to its owner; each is retried with backoff, unless the owner refused it as malformed.",
		}),
		openWindows: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dimsum_aggregator_open_windows",
			Help: "Windows held in memory, waiting for their grace period to pass.",
		}),
		liveCells: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dimsum_aggregator_live_cells",
			Help: "Cells of every cuboid in the windows held in memory, as of the last look for closed windows.",
		}),
		batchesBackpressured: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_aggregator_batches_backpressured_total",
			Help: "Batches refused for back-pressure, by reason: log_full (the write-ahead log over wal_max_bytes: windows waited for a combiner that did not take them), behind (the flushes waiting for the combiners over max_pending_bytes: they take less than the aggregator does).",
		}, []string{"reason"}),
		batchesLowDisk: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_batches_low_disk_total",
			Help: "Batches refused because the write-ahead log's filesystem had less free space than the floor (min_free_bytes).",
		}),
		handoffPending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "dimsum_aggregator_handoff_pending_requests",
			Help: "Requests waiting for a destination to take them (hinted handoff), by destination: flushes for a combiner replica, forwarded batches for the aggregator that owns them.",
		}, []string{"replica"}),
		walSync: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dimsum_aggregator_wal_sync_seconds",
			Help:    "How long a Push waited for its batch to reach the disk, its share of a group commit included.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		replayedRecords: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_wal_replayed_records_total",
			Help: "Write-ahead log records replayed at start.",
		}),
		replayedEvents: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_wal_replayed_events_total",
			Help: "Events counted again from the write-ahead log at start.",
		}),
		replaySkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_aggregator_wal_replay_skipped_events_total",
			Help: "Logged events left out at replay because the schema or the options changed and no longer take them; each is logged.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.accepted, m.rejected, m.late, m.batchesRefused, m.duplicates, m.forgotten, m.flushes, m.flushedCells, m.flushLag, m.flushErrors, m.forwarded, m.forwardErrors, m.openWindows, m.liveCells,
			m.batchesBackpressured, m.batchesLowDisk, m.handoffPending, m.walSync, m.replayedRecords, m.replayedEvents, m.replaySkipped,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "dimsum_aggregator_wal_bytes",
				Help: "Size of the write-ahead log on disk, with what is appended but not yet written.",
			}, walBytes),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "dimsum_aggregator_pending_bytes",
				Help: "Memory of the flushes no replica has taken yet; past max_pending_bytes, pushes are refused.",
			}, pendingBytes),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "dimsum_aggregator_wal_free_bytes",
				Help: "Free space of the write-ahead log's filesystem; below min_free_bytes, batches are refused.",
			}, walFree))
	}
	return m
}

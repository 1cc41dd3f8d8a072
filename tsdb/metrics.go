package tsdb

import "github.com/prometheus/client_golang/prometheus"

// metrics are the DB's Prometheus metrics. They are always updated; they are
// registered only when Options.Registerer is set, and Close unregisters them
// so that a store can be reopened against the same registry.
type metrics struct {
	reg        prometheus.Registerer
	collectors []prometheus.Collector

	applies             prometheus.Counter
	duplicates          prometheus.Counter
	applyErrors         prometheus.Counter
	deltas              prometheus.Counter
	expired             prometheus.Counter
	operands            prometheus.Counter
	aliasRows           prometheus.Counter
	aliasesMaterialized prometheus.Counter
	cellsCreated        prometheus.Counter
	cells               prometheus.Gauge
	corruptions         prometheus.Counter
	applyDurations      prometheus.Histogram

	beyondDedupe     prometheus.Counter
	applyWaits       prometheus.Counter
	applyWaitSeconds prometheus.Counter
	stagedBytes      prometheus.Counter
	headBytes        prometheus.Gauge
	groupsWritten    *prometheus.CounterVec
	writeErrors      prometheus.Counter
	writeDurations   prometheus.Histogram

	retentionPasses    prometheus.Counter
	retentionErrors    prometheus.Counter
	retentionDurations prometheus.Histogram
	rowsDeleted        prometheus.Counter
	cellsForgotten     prometheus.Counter
	sourcesForgotten   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		reg: reg,
		applies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_applies_total",
			Help: "Batches of deltas applied to the store.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_apply_duplicates_total",
			Help: "Batches not applied because their idempotency key had been applied before (retries).",
		}),
		applyErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_apply_errors_total",
			Help: "Batches refused for bad input or failed to commit.",
		}),
		deltas: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_deltas_applied_total",
			Help: "Deltas (cell-steps of a partial cube) added to the head.",
		}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_deltas_expired_total",
			Help: "Deltas skipped because they were older than the longest retention.",
		}),
		operands: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_merge_operands_written_total",
			Help: "Row merge operands written by the writer: one per cell and resolution of each group written.",
		}),
		aliasRows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_alias_rows_written_total",
			Help: "Rows written as an alias of a child cell's row, whose deltas were the same, instead of as rows of their own.",
		}),
		aliasesMaterialized: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_alias_rows_materialized_total",
			Help: "Alias rows replaced by the whole row they stood for, once their cell gained deltas its child lacked.",
		}),
		cellsCreated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_cells_created_total",
			Help: "Cells added to the cell dictionaries.",
		}),
		cells: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dimsum_tsdb_cells",
			Help: "Live cells in the in-memory cell dictionaries of the schema's families.",
		}),
		corruptions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_corruptions_total",
			Help: "Reads that found a value that cannot be decoded.",
		}),
		applyDurations: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dimsum_tsdb_apply_duration_seconds",
			Help:    "Time an Apply takes, including the wait for the fsync.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		beyondDedupe: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_batches_beyond_dedupe_window_total",
			Help: "Batches applied though their sequence was too far behind their source's newest to tell whether they were retries.",
		}),
		applyWaits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_apply_waits_total",
			Help: "Applies that waited because the head held more than its limit (head_max_bytes).",
		}),
		applyWaitSeconds: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_apply_wait_seconds_total",
			Help: "Time Applies spent waiting for room in the head.",
		}),
		stagedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_staged_bytes_total",
			Help: "Bytes of staged batches written: the head's log.",
		}),
		headBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dimsum_tsdb_head_bytes",
			Help: "Memory the head's open rows hold.",
		}),
		groupsWritten: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dimsum_tsdb_head_groups_written_total",
			Help: "Groups (every cell of one row of the finest resolution) the writer wrote, by reason: closed (the row's span ended), memory (the head held too much), flush (Flush or Close), retry (an earlier attempt failed).",
		}, []string{"reason"}),
		writeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_head_write_errors_total",
			Help: "Group writes that failed; the group stays in the head and is retried.",
		}),
		writeDurations: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dimsum_tsdb_head_write_duration_seconds",
			Help:    "Time the writer takes to encode and commit one group.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		retentionPasses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_retention_passes_total",
			Help: "Retention passes completed.",
		}),
		retentionErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_retention_errors_total",
			Help: "Retention passes that failed; the next pass retries their work.",
		}),
		retentionDurations: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dimsum_tsdb_retention_duration_seconds",
			Help:    "Time a retention pass takes, during which Apply and the writer wait.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
		rowsDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_retention_rows_deleted_total",
			Help: "Rows of one (resolution, family, cuboid) deleted by retention, each with all its cells' data.",
		}),
		cellsForgotten: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_cells_forgotten_total",
			Help: "Cells removed from the dictionaries and postings because retention left them no data.",
		}),
		sourcesForgotten: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_sources_forgotten_total",
			Help: "Source records forgotten because their source applied nothing for the idempotency horizon.",
		}),
	}
	m.collectors = []prometheus.Collector{
		m.applies, m.duplicates, m.applyErrors, m.deltas, m.expired, m.operands, m.aliasRows, m.aliasesMaterialized,
		m.cellsCreated, m.cells, m.corruptions, m.applyDurations,
		m.beyondDedupe, m.applyWaits, m.applyWaitSeconds, m.stagedBytes, m.headBytes,
		m.groupsWritten, m.writeErrors, m.writeDurations,
		m.retentionPasses, m.retentionErrors, m.retentionDurations, m.rowsDeleted,
		m.cellsForgotten, m.sourcesForgotten,
	}
	if reg == nil {
		return m, nil
	}
	for i, c := range m.collectors {
		if err := reg.Register(c); err != nil {
			for _, done := range m.collectors[:i] {
				reg.Unregister(done)
			}
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) unregister() {
	if m.reg == nil {
		return
	}
	for _, c := range m.collectors {
		m.reg.Unregister(c)
	}
}

package tsdb

import "github.com/prometheus/client_golang/prometheus"

// metrics are the DB's Prometheus metrics. They are always updated; they are
// registered only when Options.Registerer is set, and Close unregisters them
// so that a store can be reopened against the same registry.
type metrics struct {
	reg        prometheus.Registerer
	collectors []prometheus.Collector

	applies        prometheus.Counter
	duplicates     prometheus.Counter
	applyErrors    prometheus.Counter
	deltas         prometheus.Counter
	expired        prometheus.Counter
	operands       prometheus.Counter
	cellsCreated   prometheus.Counter
	cells          prometheus.Gauge
	corruptions    prometheus.Counter
	applyDurations prometheus.Histogram

	retentionPasses    prometheus.Counter
	retentionErrors    prometheus.Counter
	retentionDurations prometheus.Histogram
	rowsDeleted        prometheus.Counter
	cellsForgotten     prometheus.Counter
	idempotencyPruned  prometheus.Counter
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
			Name: "dimsum_tsdb_cell_steps_written_total",
			Help: "Cell-steps written, counted once per resolution.",
		}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_cell_steps_expired_total",
			Help: "Cell-steps skipped because they were older than the retention of their resolution, counted once per resolution.",
		}),
		operands: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_merge_operands_written_total",
			Help: "Row merge operands written; each folds the cell-steps of one batch that fall in one row.",
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
			Help:    "Time a retention pass takes, during which Apply waits.",
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
		idempotencyPruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_tsdb_idempotency_keys_pruned_total",
			Help: "Idempotency keys forgotten because they are older than the idempotency horizon.",
		}),
	}
	m.collectors = []prometheus.Collector{
		m.applies, m.duplicates, m.applyErrors, m.deltas, m.expired, m.operands,
		m.cellsCreated, m.cells, m.corruptions, m.applyDurations,
		m.retentionPasses, m.retentionErrors, m.retentionDurations, m.rowsDeleted,
		m.cellsForgotten, m.idempotencyPruned,
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

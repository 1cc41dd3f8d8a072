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
			Help: "Cells in the in-memory cell dictionaries of the schema's families.",
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
	}
	m.collectors = []prometheus.Collector{
		m.applies, m.duplicates, m.applyErrors, m.deltas, m.expired, m.operands,
		m.cellsCreated, m.cells, m.corruptions, m.applyDurations,
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

package combiner

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	applied    prometheus.Counter
	duplicates prometheus.Counter
	refused    prometheus.Counter
	cells      prometheus.Counter
	unready    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		applied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_combiner_flushes_applied_total",
			Help: "Partial cubes merged into the global cube.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_combiner_flushes_duplicate_total",
			Help: "Flushes acknowledged without writing because their identity was applied before.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_combiner_flushes_refused_total",
			Help: "Flushes refused because they do not fit the schema.",
		}),
		cells: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_combiner_cells_applied_total",
			Help: "Cells merged into the global cube, counted once per flush.",
		}),
		unready: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dimsum_combiner_flushes_unready_total",
			Help: "Flushes refused, to be retried, because the store was not ready: its disk below the free-space floor, or the store failed.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.applied, m.duplicates, m.refused, m.cells, m.unready)
	}
	return m
}

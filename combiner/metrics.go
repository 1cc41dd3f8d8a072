package combiner

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	applied    prometheus.Counter
	duplicates prometheus.Counter
	refused    prometheus.Counter
	cells      prometheus.Counter
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
	}
	if reg != nil {
		reg.MustRegister(m.applied, m.duplicates, m.refused, m.cells)
	}
	return m
}

package aggregator

import "github.com/dimsum/dimsum/internal/dedupe"

// seqWindow remembers which batches of one publisher source were counted
// (dedupe.Seqs), and when the source last pushed. A publisher keeps only a
// few batches in flight and retries one within seconds, so a repeat lies
// far inside the window; a repeat of a batch older than that is counted
// again (see docs/architecture.md).
type seqWindow struct {
	dedupe.Seqs
	// lastMS is when the source last pushed (unix ms), for forgetting
	// sources that went quiet.
	lastMS int64
}

// markLocked checks a batch identity (source, seq) against the sources
// seen in the last MaxLateness and marks it. A batch without an identity is
// always new.
func (a *Aggregator) markLocked(source string, seq uint64, nowMS int64) dedupe.Verdict {
	if source == "" || seq == 0 {
		return dedupe.New
	}
	w := a.mu.sources[source]
	if w == nil {
		w = &seqWindow{}
		a.mu.sources[source] = w
	}
	w.lastMS = nowMS
	return w.Mark(seq)
}

// forgetSources drops the windows of sources that have not pushed for
// MaxLateness. A retry that late would find its events too old anyway, so
// memory is bounded by the sources active within MaxLateness.
func (a *Aggregator) forgetSources(nowMS int64) {
	horizon := nowMS - a.opts.MaxLateness.Milliseconds()
	a.mu.Lock()
	defer a.mu.Unlock()
	for s, w := range a.mu.sources {
		if w.lastMS < horizon {
			delete(a.mu.sources, s)
		}
	}
}

package aggregator

// dedupeWindow is how many of a source's most recent batch sequences are
// remembered. A publisher keeps only a few batches in flight and retries
// one within seconds, so a repeat lies far inside it; a repeat of a batch
// older than that is counted again (see docs/architecture.md).
const dedupeWindow = 1024

// seqWindow remembers which batches of one publisher source were counted:
// every sequence up to high, by a bit for each of the last dedupeWindow.
// It costs about 150 bytes a source, whatever the source sends.
type seqWindow struct {
	high uint64 // the highest sequence counted
	bits [dedupeWindow / 64]uint64
	// lastMS is when the source last pushed (unix ms), for forgetting
	// sources that went quiet.
	lastMS int64
}

// seqVerdict is what a batch identity says of a batch.
type seqVerdict int

const (
	seqNew       seqVerdict = iota // count it
	seqRepeat                      // counted before: acknowledge, count nothing
	seqForgotten                   // too far behind high to tell: count it
)

// mark records seq and says whether it was seen before.
func (w *seqWindow) mark(seq uint64, nowMS int64) seqVerdict {
	w.lastMS = nowMS
	switch {
	case seq > w.high:
		if seq-w.high >= dedupeWindow {
			w.bits = [dedupeWindow / 64]uint64{}
		} else {
			for s := w.high + 1; s < seq; s++ {
				w.bits[s/64%uint64(len(w.bits))] &^= 1 << (s % 64)
			}
		}
		w.high = seq
	case w.high-seq >= dedupeWindow:
		return seqForgotten
	case w.bits[seq/64%uint64(len(w.bits))]&(1<<(seq%64)) != 0:
		return seqRepeat
	}
	w.bits[seq/64%uint64(len(w.bits))] |= 1 << (seq % 64)
	return seqNew
}

// markLocked checks a batch identity (source, seq) against the sources
// seen in the last MaxLateness and marks it. A batch without an identity is
// always new.
func (a *Aggregator) markLocked(source string, seq uint64, nowMS int64) seqVerdict {
	if source == "" || seq == 0 {
		return seqNew
	}
	w := a.mu.sources[source]
	if w == nil {
		w = &seqWindow{}
		a.mu.sources[source] = w
	}
	return w.mark(seq, nowMS)
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

package aggregator

import "time"

// Crash stops a as SIGKILL would: no flush, no further record, and the
// senders stop where they are. What was appended reaches the log file, as
// it would have had the process lived a moment longer; every acknowledged
// batch was synced before its reply anyway.
func Crash(a *Aggregator) {
	a.mu.Lock()
	a.mu.closed = true
	a.mu.Unlock()
	close(a.stop)
	<-a.done
	a.drain(time.Now())
	if a.wal != nil {
		a.wal.Close()
	}
}

// CrashAfterCut takes the windows whose grace has passed out of the cube and
// logs the cut, then crashes before the intent is logged.
func CrashAfterCut(a *Aggregator) {
	a.flushMu.Lock()
	a.mu.Lock()
	now := a.opts.Now().UnixMilli()
	_, rec := a.cutLocked(now, false)
	if _, err := a.wal.Append(recCut, appendCut(nil, rec)); err != nil {
		panic(err)
	}
	a.mu.Unlock()
	a.flushMu.Unlock()
	Crash(a)
}

// Flush runs one loop flush: the windows whose grace has passed go out.
func Flush(a *Aggregator) { a.flush(false) }

// HeldRequestBytes is the size of the requests a's intents still hold.
func HeldRequestBytes(a *Aggregator) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for it := range a.mu.intents {
		for _, e := range it.entries {
			if e.flush != nil {
				n += len(e.flush.Data)
			}
		}
	}
	return n
}

// PendingBytes is the size of the flushes no destination has taken yet.
func PendingBytes(a *Aggregator) int64 { return a.out.bytes.Load() }

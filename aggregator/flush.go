package aggregator

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/dimsum/dimsum/wal"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// cutCells is how many cells the windows whose grace has passed may gain
// before the flush loop cuts them without waiting for its tick: a backfill
// fills such windows as fast as it sends, and a second of it at 300,000
// events a second made some two hundred windows, 750,000 cells. At about
// 150 bytes a cell this bounds them to some 40 MB, whatever the rate.
const cutCells = 1 << 18

// loop flushes closed windows until Close.
func (a *Aggregator) loop() {
	defer close(a.done)
	for {
		jitter := time.Duration(rand.Int64N(int64(a.opts.FlushInterval)/10 + 1))
		select {
		case <-a.stop:
			return
		case <-a.cutNow:
		case <-time.After(a.opts.FlushInterval + jitter):
		}
		a.forgetSources(a.opts.Now().UnixMilli())
		a.flush(false)
	}
}

// ready is a window taken out of the cube to be flushed.
type ready struct {
	start int64
	w     *window
}

// cutLocked takes out of the cube every window whose grace has passed at
// now, or every window when final, and returns them in window order with
// the record that says which they were.
func (a *Aggregator) cutLocked(now int64, final bool) ([]ready, cutRecord) {
	c := cutRecord{upto: now - a.step - a.opts.Grace.Milliseconds(), final: final}
	a.mu.cuttable = 0
	for start := range a.mu.windows {
		if final || start <= c.upto {
			c.starts = append(c.starts, start)
		}
	}
	return a.takeLocked(c.starts), c
}

// takeLocked takes the windows starting at starts out of the cube, in window
// order. Replay takes the windows a cut record lists, so it takes what the
// live process took whatever the options are now.
func (a *Aggregator) takeLocked(starts []int64) []ready {
	var todo []ready
	hint := 0
	for _, start := range starts {
		if w := a.mu.windows[start]; w != nil {
			todo = append(todo, ready{start: start, w: w})
			delete(a.mu.windows, start)
			hint = max(hint, len(w.aggs))
		}
	}
	if len(todo) > 0 {
		a.mu.hint = hint
	}
	slices.SortFunc(todo, func(x, y ready) int { return cmp.Compare(x.start, y.start) })
	return todo
}

// flush sends every window whose grace has passed (all of them when final).
// With a log, the cut is logged at the moment the windows leave the cube,
// and the requests built from them, with their destinations, are logged and
// synced before any goes out: a restart sends the same requests under the
// same identities to the replicas that did not confirm them, or, if the
// crash came between the two records, puts the windows back into the cube.
func (a *Aggregator) flush(final bool) {
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	shards := max(a.opts.Sink.Shards(), 1)
	replicas := make([][]string, shards)
	for s := range replicas {
		if replicas[s] = a.opts.Sink.Replicas(uint32(s)); len(replicas[s]) == 0 {
			a.opts.Logger.Error("no combiner holds a shard: windows stay in memory", "shard", s, "shards", shards)
			return
		}
	}
	now := a.opts.Now().UnixMilli()

	a.mu.Lock()
	todo, rec := a.cutLocked(now, final)
	cut := cutMark{upto: rec.upto, final: final}
	if len(todo) > 0 && a.wal != nil {
		pos, err := a.wal.Append(recCut, appendCut(nil, rec))
		if err != nil {
			a.opts.Logger.Error("cannot log a cut; its windows go out unlogged", "err", err)
		}
		cut.pos = pos
	}
	// The windows cut keep the numbers of the registry they were made in.
	values, keys, numbering := a.mu.values, a.mu.reg.keys, a.mu.reg.numbering
	cells := 0
	for _, r := range todo {
		cells += len(r.w.aggs)
	}
	a.compactLocked(cells)
	open, live := len(a.mu.windows), 0
	for _, w := range a.mu.windows {
		live += len(w.aggs)
	}
	a.mu.Unlock()
	// The gauges change once the cut's requests are queued (and counted in
	// the pending gauge), so that no moment shows the cut's cells neither
	// live nor pending.
	defer func() {
		a.metrics.openWindows.Set(float64(open))
		a.metrics.liveCells.Set(float64(live))
	}()
	if len(todo) == 0 {
		return
	}

	var reqs []*wirepb.FlushRequest
	for _, r := range todo {
		reqs = append(reqs, a.flushRequests(r.start, r.w, keys, numbering, values, shards)...)
	}
	a.recycle(todo)
	a.mu.Lock()
	for _, req := range reqs {
		req.Sequence = a.mu.seq
		a.mu.seq++
	}
	a.mu.Unlock()
	entries := make([]*entry, len(reqs))
	for i, req := range reqs {
		if a.inProcess(replicas[req.Shard]) {
			wire.WholeSums(req)
		}
		f, err := wire.EncodeFlush(req)
		if err != nil {
			// A message of well-formed fields always marshals.
			panic(err)
		}
		entries[i] = &entry{kind: entryFlush, dests: replicas[req.Shard], flush: f}
	}
	var payload []byte
	if a.wal != nil {
		var err error
		if payload, err = appendIntent(nil, cut.pos, entries); err != nil {
			a.opts.Logger.Error("cannot log an intent; its requests go out unlogged", "err", err)
		}
	}
	a.mu.Lock()
	var pos wal.Pos
	var err error
	if payload != nil {
		pos, err = a.wal.Append(recIntent, payload)
	}
	it := a.newIntent(pos, cut, entries)
	a.mu.intents[it] = struct{}{}
	if it.remaining == 0 {
		a.completeLocked(it)
	}
	a.mu.Unlock()
	if payload != nil && err == nil {
		err = a.wal.Sync(pos)
	}
	if err != nil {
		a.opts.Logger.Error("cannot log an intent; its requests go out unlogged", "err", err)
	}
	a.enqueue(it)
}

// flushTimeout bounds one attempt to send a request to a destination;
// finalFlushTimeout bounds how long Close waits for the destinations to
// take what is left.
const (
	flushTimeout      = 10 * time.Second
	finalFlushTimeout = 30 * time.Second
)

// inProcess reports whether every one of replicas is a combiner in this
// process (InProcess).
func (a *Aggregator) inProcess(replicas []string) bool {
	s, ok := a.opts.Sink.(InProcess)
	if !ok {
		return false
	}
	for _, r := range replicas {
		if !s.InProcess(r) {
			return false
		}
	}
	return true
}

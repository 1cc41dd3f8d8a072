package tsdb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/dimsum/dimsum/schema"
)

// Error classes. Callers tell them apart with errors.Is.
var (
	// ErrBadInput marks a request that names an unknown family, cuboid or
	// resolution, or carries malformed deltas. Nothing was written.
	ErrBadInput = errors.New("tsdb: bad input")
	// ErrCorrupt marks a stored value that cannot be decoded. The error
	// names the key in hex. A corrupt value is never read as zero.
	ErrCorrupt = errors.New("tsdb: corrupt")
	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("tsdb: closed")
)

// DB is the global cube persisted in Pebble. Its methods are safe for
// concurrent use: Apply calls are serialized, and Cells and Steps run
// concurrently with Apply and with each other.
type DB struct {
	opts    Options
	log     *slog.Logger
	pdb     *pebble.DB
	popts   *pebble.Options // pdb's, with Pebble's defaults: the writer's tables follow them
	metrics *metrics

	// families are the schema's families by name, byID by their stored
	// ID and fams in schema order (familyState.idx); fixed after Open.
	families map[string]*familyState
	byID     map[uint16]*familyState
	fams     []*familyState
	// cuboidBase holds, per family index, the number of cuboids of the
	// families before it: a (family, cuboid) pair's index among all.
	cuboidBase []int
	// res holds, per schema resolution, its step and row span in the units
	// the hot paths need; maxRetentionMs is the longest retention, latestMs
	// the latest time whose rows' ends are still an int64 at every
	// resolution.
	res            []resolution
	maxRetentionMs int64
	latestMs       int64

	// head holds the open rows of the finest resolution (head.go).
	head *head
	// sources holds what each source of batches applied, for Apply's
	// dedupe; guarded by apply.
	sources map[string]*source
	// values interns the label values of every cell of every cellDict;
	// guarded by apply.
	values *valueTable

	state struct {
		sync.RWMutex
		// closed is set by Close; every method checks it under the lock
		// so that none uses Pebble after it is closed.
		closed bool
	}

	// apply serializes Apply and owns its scratch space, reused so that a
	// batch costs no allocation per delta.
	apply struct {
		sync.Mutex
		entries []headEntry
		grouped []headEntry // entries grouped by cuboid
		counts  []int       // groupByCuboid's counts, one per cuboid of the schema
		cellBuf []byte      // a new cell's encoded values
		keyBuf  []byte      // dictionary and source keys
		rowBuf  []byte      // the staged batch being encoded
		touched []*cellDict
		// nums holds, per string of the batch's dictionary, its number in
		// values plus one, 0 before it was looked up or if no cell holds it.
		nums []uint32
		run  familyRun // the family of the last delta looked up
		// cellValues holds a new cell's values; strs, idx and dds the
		// deltas of an Apply as ApplyDict's.
		cellValues []string
		strs       []string
		idx        []uint32
		dds        []DictDelta
		numbered   numberedCells
	}
	// unsynced is set by an ApplyDictUnsynced whose batch no sync has made
	// durable yet; syncMu serializes syncLog, so that it returns only once
	// every batch committed before it is on disk, even while another is
	// under way. Pebble's Close syncs what is left.
	unsynced atomic.Bool
	syncMu   sync.Mutex
	// write serializes the writer's group writes and the retention pass,
	// which both write rows and presence.
	write sync.Mutex
	// presence caches presence bitmaps for the writer, and aliases its
	// alias rows; guarded by write.
	presence presence
	aliases  aliases
	// orphans holds the cells of groups the writer wrote nothing of, their
	// rows being past every retention, for the next retention pass;
	// guarded by write. It lives in memory only: swept says that a pass
	// since Open has looked at every cell, which finds those a restart
	// forgot.
	orphans map[*cellDict]*roaring.Bitmap
	swept   bool
	// writer writes the head's groups (write.go); its scratch space is
	// guarded by write.
	writer writerState

	// retention runs the periodic retention pass.
	retention struct {
		stop chan struct{}
		done chan struct{}
	}
}

// writerState is the writer's: its goroutine's channels and its scratch.
type writerState struct {
	wake, stop, done chan struct{}
	// staged counts the bytes of staged batches applied since the writer
	// last compacted their key range, and lastApply is when Apply last
	// committed (unix ms): see compactStaged.
	staged, lastApply atomic.Int64
	fine, coarse      denseRow
	hostFine          denseFine
	buf               []byte
	table             groupTable
}

// resolution is a schema resolution with its figures in the units the hot
// paths need.
type resolution struct {
	schema.Resolution
	stepSec     uint32
	stepMs      int64
	rowSpanMs   int64
	retentionMs int64
	// host is, for the finest resolution of a store that pairs its two
	// finest, the next one: its rows hold this one's steps (hosted.go).
	host *resolution
}

// keys is the resolution whose data keys hold r's steps.
func (r resolution) keys() resolution {
	if r.host != nil {
		return *r.host
	}
	return r
}

// familyState is a family of the schema with its persisted ID and the cell
// dictionaries of its cuboids.
type familyState struct {
	id  uint16
	idx int // in the schema's order
	fam *schema.Family
	// cuboids is indexed by CuboidID.
	cuboids []*cellDict
	// children holds, per CuboidID, the cuboids one level finer, which
	// its cells' alias rows may name.
	children [][]childCuboid
}

func (f *familyState) cuboid(id schema.CuboidID) *cellDict {
	if int(id) >= len(f.cuboids) {
		return nil
	}
	return f.cuboids[id]
}

// Open opens or creates the store in opts.Dir.
func Open(opts Options) (*DB, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	db := &DB{
		opts:     opts,
		log:      opts.Logger,
		families: make(map[string]*familyState, len(opts.Schema.Families)),
		byID:     make(map[uint16]*familyState, len(opts.Schema.Families)),
		head:     newHead(),
		sources:  map[string]*source{},
		values:   newValueTable(),
		orphans:  map[*cellDict]*roaring.Bitmap{},
	}
	for _, r := range opts.Schema.Resolutions {
		db.res = append(db.res, resolution{
			Resolution:  r,
			stepSec:     uint32(r.Step / time.Second),
			stepMs:      r.Step.Milliseconds(),
			rowSpanMs:   r.RowSpan().Milliseconds(),
			retentionMs: r.Retention.Milliseconds(),
		})
		db.maxRetentionMs = max(db.maxRetentionMs, r.Retention.Milliseconds())
	}
	db.latestMs = math.MaxInt64
	for _, r := range db.res {
		db.latestMs = min(db.latestMs, math.MaxInt64-2*r.rowSpanMs)
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, fmt.Errorf("tsdb: cannot register metrics: %w", err)
	}
	db.metrics = m

	cache := pebble.NewCache(opts.CacheSize)
	defer cache.Unref()
	db.popts = pebbleOptions(cache, db.log.With("component", "pebble"))
	db.popts.FS = opts.fs
	db.popts.EnsureDefaults()
	if err := removeIngestLeft(db.popts.FS, opts.Dir); err != nil {
		m.unregister()
		return nil, err
	}
	db.popts.DisableAutomaticCompactions = opts.noCompactions
	db.pdb, err = pebble.Open(opts.Dir, db.popts)
	if err != nil {
		m.unregister()
		return nil, fmt.Errorf("tsdb: cannot open pebble in %s: %w", opts.Dir, err)
	}
	if err := db.load(); err != nil {
		_ = db.pdb.Close()
		m.unregister()
		return nil, err
	}
	db.presence = presence{
		// Four rows of every resolution and cuboid: the current row, the
		// previous one for late deltas, and room for stragglers.
		limit:  4 * len(db.res) * len(db.apply.counts),
		cache:  map[presenceKey]*roaring.Bitmap{},
		staged: map[presenceKey]*roaring.Bitmap{},
	}
	db.aliases = aliases{
		limit:  db.presence.limit,
		cache:  map[presenceKey]map[uint32]aliasRef{},
		staged: map[presenceKey]map[uint32]aliasRef{},
	}
	db.startWriter()
	db.startRetention()
	return db, nil
}

// pebbleOptions configures Pebble for the cube.
func pebbleOptions(cache *pebble.Cache, log *slog.Logger) *pebble.Options {
	o := &pebble.Options{
		Cache:              cache,
		Merger:             rowMerger,
		Logger:             pebbleLogger{log},
		EventListener:      eventListener(log),
		FormatMajorVersion: pebble.FormatNewest,
		// The writer's groups do not go through Pebble's log (table.go),
		// so the memtable holds only Apply's batches.
		MemTableSize: 32 << 20,
		Cleaner:      walDeleter{},
	}
	// Every Apply with an idempotency key looks it up, and almost every
	// lookup misses: a Bloom filter answers most misses without reading a
	// data block. At 10 bits a key it costs ~1.2 bytes per row, which holds
	// up to 360 steps.
	for i := range o.Levels {
		o.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	// Snappy on the upper levels, zstd on the bottom ones, where nearly all
	// of a long-retention cube lives.
	o.ApplyCompressionSettings(func() pebble.DBCompressionSettings { return pebble.DBCompressionBalanced })
	return o
}

// walDeleter deletes the files Pebble no longer needs, as its default
// cleaner does, but makes Pebble delete its obsolete log files too: with a
// cleaner that does not read what it cleans, Pebble keeps up to three of
// them for reuse, each the size of a memtable, and on the sparse backfill
// they were a quarter of the settled directory. Pebble asks a cleaner for
// that reading through a method it does not export, which the archiving
// cleaner has: it is embedded one level down for that method alone, and
// the deleting cleaner's Clean, one level up, is the one called.
type walDeleter struct {
	pebble.DeleteCleaner
	readsFiles
}

type readsFiles struct{ pebble.ArchiveCleaner }

// load checks the format version, loads the family and cell
// dictionaries, then rebuilds the head from the staged batches.
func (db *DB) load() error {
	if err := db.checkFormat(); err != nil {
		return err
	}
	if err := db.loadFamilies(); err != nil {
		return err
	}
	if err := db.loadCells(); err != nil {
		return err
	}
	return db.loadHead()
}

func (db *DB) checkFormat() error {
	v, closer, err := db.pdb.Get(metaFormatKey)
	if errors.Is(err, pebble.ErrNotFound) {
		iter, err := db.pdb.NewIter(nil)
		if err != nil {
			return fmt.Errorf("tsdb: cannot check the store is empty: %w", err)
		}
		empty := !iter.First()
		if err := errors.Join(iter.Error(), iter.Close()); err != nil {
			return fmt.Errorf("tsdb: cannot check the store is empty: %w", err)
		}
		if !empty {
			return fmt.Errorf("tsdb: %s holds a Pebble store without a dimsum format record; refusing to use it", db.opts.Dir)
		}
		b := db.pdb.NewBatch()
		defer b.Close()
		err = b.Set(metaFormatKey, binary.AppendUvarint(nil, formatVersion), nil)
		if db.pairable() && err == nil {
			// The pairing is chosen once, when the store is made: the
			// finest resolution's steps then live in the next one's rows.
			err = b.Set(metaPairKey, appendPair(nil, db.res[0].stepSec, db.res[1].stepSec), nil)
		}
		if err == nil {
			err = b.Commit(pebble.Sync)
		}
		if err != nil {
			return fmt.Errorf("tsdb: cannot write the format record: %w", err)
		}
		db.log.Info("created store", "dir", db.opts.Dir, "format", formatVersion, "hosted", db.pairable())
		return db.loadPairing()
	}
	if err != nil {
		return fmt.Errorf("tsdb: cannot read the format record: %w", err)
	}
	defer closer.Close()
	got, n := binary.Uvarint(v)
	if n <= 0 || n != len(v) {
		return fmt.Errorf("%w: format record %x holds %x", ErrCorrupt, metaFormatKey, v)
	}
	switch got {
	case 2:
		return db.upgradeFrom2()
	case 3:
		if err := db.setFormat(3); err != nil {
			return err
		}
	case formatVersion:
	default:
		return fmt.Errorf("tsdb: %s has format version %d; this binary reads only version %d and has no migration from it: start from an empty directory (docs/format/tsdb.md)", db.opts.Dir, got, formatVersion)
	}
	return db.loadPairing()
}

// setFormat upgrades a store of version from, which holds nothing this
// version reads otherwise (version 3 only lacks alias rows), by writing the
// format record.
func (db *DB) setFormat(from uint64) error {
	if err := db.pdb.Set(metaFormatKey, binary.AppendUvarint(nil, formatVersion), pebble.Sync); err != nil {
		return fmt.Errorf("tsdb: cannot upgrade the store to format %d: %w", formatVersion, err)
	}
	db.log.Info("upgraded the store", "dir", db.opts.Dir, "from", from, "to", formatVersion)
	return nil
}

// pairable reports whether the schema's two finest resolutions can be
// paired: the second's step at most maxHostedSubslots of the first's, and
// its retention no shorter.
func (db *DB) pairable() bool {
	if len(db.res) < 2 {
		return false
	}
	f, h := db.res[0], db.res[1]
	return h.stepMs/f.stepMs <= maxHostedSubslots && h.retentionMs >= f.retentionMs
}

// loadPairing reads the pairing record, if the store has one, and makes the
// finest resolution hosted by the next. A store whose pairing no longer
// fits the schema is refused: its finest steps would be lost.
func (db *DB) loadPairing() error {
	v, closer, err := db.pdb.Get(metaPairKey)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tsdb: cannot read the pairing record: %w", err)
	}
	defer closer.Close()
	fine, host, ok := decodePair(v)
	if !ok {
		return fmt.Errorf("%w: pairing record %x holds %x", ErrCorrupt, metaPairKey, v)
	}
	if len(db.res) < 2 || db.res[0].stepSec != fine || db.res[1].stepSec != host || !db.pairable() {
		return fmt.Errorf("tsdb: %s keeps its %ds steps inside the rows of its %ds resolution; the schema must keep both as its two finest resolutions, the second retained at least as long (docs/format/tsdb.md, \"Hosted rows\")", db.opts.Dir, fine, host)
	}
	db.res[0].host = &db.res[1]
	return nil
}

// familyRecord is the value of a family-dictionary entry: the ID, then what
// fixes the meaning of the family's cuboid IDs and rows (its kind and
// dimensions), so that Open can refuse a schema that changed them.
func appendFamilyRecord(dst []byte, id uint16, fam *schema.Family) []byte {
	dst = binary.BigEndian.AppendUint16(dst, id)
	dst = append(dst, byte(fam.Kind))
	dims := make([]string, len(fam.Dimensions))
	for i, d := range fam.Dimensions {
		dims[i] = d.Name
	}
	return appendCellValues(dst, dims)
}

func (db *DB) loadFamilies() error {
	type stored struct {
		id     uint16
		record []byte
	}
	byName := map[string]stored{}
	used := map[uint16]string{}
	next := 0
	iter, err := db.pdb.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixFamily}, UpperBound: []byte{prefixFamily + 1}})
	if err != nil {
		return fmt.Errorf("tsdb: cannot read the family dictionary: %w", err)
	}
	for valid := iter.First(); valid; valid = iter.Next() {
		name := string(iter.Key()[1:])
		v := iter.Value()
		if len(v) < 3 {
			_ = iter.Close()
			return fmt.Errorf("%w: family record %x holds %x", ErrCorrupt, iter.Key(), v)
		}
		id := binary.BigEndian.Uint16(v)
		if other, dup := used[id]; dup {
			_ = iter.Close()
			return fmt.Errorf("%w: families %q and %q share ID %d", ErrCorrupt, other, name, id)
		}
		used[id] = name
		byName[name] = stored{id: id, record: slices.Clone(v)}
		next = max(next, int(id)+1)
	}
	if err := errors.Join(iter.Error(), iter.Close()); err != nil {
		return fmt.Errorf("tsdb: cannot read the family dictionary: %w", err)
	}

	b := db.pdb.NewBatch()
	defer b.Close()
	for _, fam := range db.opts.Schema.Families {
		st, ok := byName[fam.Name]
		if ok {
			want := appendFamilyRecord(nil, st.id, fam)
			if string(want) != string(st.record) {
				return fmt.Errorf("tsdb: family %q: the schema changed its kind or dimensions since its data was written (stored record %x, schema's %x); give the new definition a new family name", fam.Name, st.record, want)
			}
		} else {
			if next > math.MaxUint16 {
				return fmt.Errorf("tsdb: family %q: no family ID left", fam.Name)
			}
			st = stored{id: uint16(next)}
			next++
			if err := b.Set(appendFamilyKey(nil, fam.Name), appendFamilyRecord(nil, st.id, fam), nil); err != nil {
				return err
			}
			db.log.Info("added family", "family", fam.Name, "id", st.id)
		}
		cuboids := fam.Cuboids()
		fs := &familyState{id: st.id, idx: len(db.fams), fam: fam, cuboids: make([]*cellDict, len(cuboids)), children: cuboidChildren(fam)}
		for _, c := range cuboids {
			fs.cuboids[c.ID] = newCellDict(st.id, c, db.values)
		}
		db.cuboidBase = append(db.cuboidBase, len(db.apply.counts))
		db.apply.counts = append(db.apply.counts, make([]int, len(cuboids))...)
		db.fams = append(db.fams, fs)
		db.families[fam.Name] = fs
		db.byID[st.id] = fs
	}
	if !b.Empty() {
		if err := b.Commit(pebble.Sync); err != nil {
			return fmt.Errorf("tsdb: cannot write the family dictionary: %w", err)
		}
	}
	for name := range byName {
		if db.families[name] == nil {
			db.log.Info("stored family is not in the schema; its data is kept but not served", "family", name)
		}
	}
	return nil
}

// Close writes what the head holds, as Flush does, and closes the store.
// Methods called afterwards return ErrClosed. If the head cannot be
// written, its staged batches keep it for the next Open.
func (db *DB) Close() error {
	h := db.head
	h.mu.Lock()
	h.stopping = true // an Apply waiting for room gives up
	h.cond.Broadcast()
	h.mu.Unlock()
	db.state.Lock()
	if db.state.closed {
		db.state.Unlock()
		return ErrClosed
	}
	db.state.closed = true
	db.state.Unlock()
	// A pass or a write in flight finishes first; none starts after closed
	// is set.
	db.stopRetention()
	db.stopWriter()
	flushErr := db.writeDue(true)
	if flushErr != nil {
		db.log.Error("cannot write the head at close; the next open replays it", "err", flushErr)
	}
	db.metrics.unregister()
	if err := db.pdb.Close(); err != nil {
		return fmt.Errorf("tsdb: cannot close pebble: %w", err)
	}
	return flushErr
}

// pebbleLogger bridges Pebble's printf-style logger into slog.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) { p.l.Info(fmt.Sprintf(format, args...)) }

func (p pebbleLogger) Errorf(format string, args ...any) { p.l.Error(fmt.Sprintf(format, args...)) }

// Fatalf is called by Pebble on an error it cannot go on from, after which
// the calling goroutine must not continue (a commit Pebble failed to log
// would otherwise return as written). Pebble's own default exits the
// process; a library must not. With a FailureHandler in the logger, this
// reports the error and parks the goroutine for good, so that the node
// stays up, refuses work and says why; without one, it panics and leaves
// the decision to whoever recovers.
func (p pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.l.Error(msg, "fatal", true)
	if fail(p.l, msg) {
		select {}
	}
	panic("pebble: " + msg)
}

// eventListener logs the Pebble events an operator must see: failures,
// stalls and slow disks. Flushes and compactions are logged at debug level.
func eventListener(l *slog.Logger) *pebble.EventListener {
	return &pebble.EventListener{
		BackgroundError: func(err error) { l.Error("background error", "err", err) },
		DataCorruption: func(info pebble.DataCorruptionInfo) {
			l.Error("data corruption", "path", info.Path, "err", info.Details)
		},
		DiskSlow: func(info pebble.DiskSlowInfo) {
			l.Warn("disk slow", "path", info.Path, "op", info.OpType.String(), "duration", info.Duration)
		},
		LowDiskSpace: func(info pebble.LowDiskSpaceInfo) {
			l.Warn("low disk space", "avail_bytes", info.AvailBytes, "total_bytes", info.TotalBytes)
		},
		WriteStallBegin: func(info pebble.WriteStallBeginInfo) { l.Warn("write stall", "reason", info.Reason) },
		WriteStallEnd:   func() { l.Info("write stall ended") },
		FlushEnd: func(info pebble.FlushInfo) {
			// Pebble reports a flush that wrote no table (a memtable that
			// held nothing but deletions, or nothing at all, at close) with
			// an unexported error; it is not a failure.
			if info.Err != nil && info.Err.Error() == "pebble: empty table" {
				l.Debug("flushed nothing", "job", info.JobID)
				return
			}
			if info.Err != nil {
				l.Error("flush failed", "err", info.Err)
				return
			}
			var written uint64
			for _, t := range info.Output {
				written += t.Size
			}
			l.Debug("flushed", "job", info.JobID, "bytes", info.InputBytes, "written", written, "duration", info.TotalDuration)
		},
		CompactionEnd: func(info pebble.CompactionInfo) {
			if info.Err != nil {
				l.Error("compaction failed", "err", info.Err)
				return
			}
			l.Debug("compacted", "job", info.JobID, "reason", info.Reason, "duration", info.TotalDuration)
		},
	}
}

package wal

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Format version 1: see docs/format/wal.md.
var segmentMagic = [8]byte{'D', 'S', 'W', 'L', 1, 0, 0, 0}

const segmentSuffix = ".wal"

var (
	// ErrCorrupt marks a bad record that is not a torn tail: the log cannot be
	// replayed past it, and nothing is skipped silently.
	ErrCorrupt = errors.New("wal: corrupt")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("wal: closed")
)

// Pos is a record's position: its segment and its byte offset there.
// Positions grow with every record appended.
type Pos struct {
	Segment uint64
	Offset  int64
}

// Compare returns -1, 0 or +1 as p comes before, at or after q.
func (p Pos) Compare(q Pos) int {
	return cmp.Or(cmp.Compare(p.Segment, q.Segment), cmp.Compare(p.Offset, q.Offset))
}

func (p Pos) String() string { return fmt.Sprintf("%d:%d", p.Segment, p.Offset) }

// Options configure a Log.
type Options struct {
	// Dir holds the segment files. It is created if missing. Required.
	Dir string
	// SegmentSize is the size past which a new segment begins. A record
	// larger than it gets a segment of its own. The default is 64 MiB.
	SegmentSize int64
	// Head, if set, is called each time a segment begins (at Open, after
	// the replay, and when a segment fills up); the record it returns is
	// the first of the new segment. It runs inside Append, so it may read
	// state that the appender's own lock guards. A writer uses it to
	// checkpoint state that would otherwise be lost with deleted segments.
	Head func() (Type, []byte)
	// Logger receives the torn-tail repairs. nil discards them.
	Logger *slog.Logger
}

// Log is an open write-ahead log. Append, Sync, Size and DeleteBefore are
// safe for concurrent use.
type Log struct {
	opts Options
	dir  *os.File

	mu struct {
		sync.Mutex
		cond *sync.Cond
		err  error // sticky: once a write fails, nothing is known of the tail
		// f is the segment being appended to, seg its number and size its
		// size including what is not written yet.
		f    *os.File
		seg  uint64
		size int64
		// pending is what was appended but not yet written, per file.
		pending []chunk
		// end is the position after the last record appended; synced after
		// the last record on disk.
		end, synced Pos
		syncing     bool
		// spare is the buffer of the last chunk written, reused for the
		// next one so that appends do not grow a new buffer every sync.
		spare []byte
		// segs holds the size of every segment on disk, by number.
		segs  map[uint64]int64
		total int64
	}
}

// chunk is bytes to write to one segment file at position. newFile says
// the file was just created: its header is written, and the directory
// synced. last says the file is full: it is closed once the chunk is synced.
type chunk struct {
	f        *os.File
	data     []byte
	position int64
	newFile  bool
	last     bool
}

// Open opens the log in opts.Dir, calls replay with every record of the
// segments there in order, and starts a new segment. The payload passed to
// replay is valid only during the call. A replay error stops Open and is
// returned.
func Open(opts Options, replay func(pos Pos, typ Type, payload []byte) error) (*Log, error) {
	if opts.Dir == "" {
		return nil, errors.New("wal: invalid options: no directory")
	}
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = 64 << 20
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("wal: cannot create %s: %w", opts.Dir, err)
	}
	dir, err := os.Open(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("wal: cannot open %s: %w", opts.Dir, err)
	}
	l := &Log{opts: opts, dir: dir}
	l.mu.cond = sync.NewCond(&l.mu.Mutex)
	l.mu.segs = map[uint64]int64{}
	segs, err := l.list()
	if err == nil {
		segs, err = l.dropUnstarted(segs)
	}
	if err == nil {
		err = l.replay(segs, replay)
	}
	if err != nil {
		dir.Close()
		return nil, err
	}
	next := uint64(1)
	if len(segs) > 0 {
		next = segs[len(segs)-1] + 1
	}
	l.mu.Lock()
	err = l.startSegmentLocked(next)
	end := l.mu.end
	l.mu.Unlock()
	if err == nil {
		err = l.Sync(end)
	}
	if err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// list returns the numbers of the segment files in the directory, in order.
func (l *Log) list() ([]uint64, error) {
	entries, err := os.ReadDir(l.opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("wal: cannot list %s: %w", l.opts.Dir, err)
	}
	var segs []uint64
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), segmentSuffix)
		if !ok || e.IsDir() {
			continue
		}
		n, err := strconv.ParseUint(name, 10, 64)
		if err != nil || segmentName(n) != e.Name() {
			continue
		}
		segs = append(segs, n)
	}
	slices.Sort(segs)
	return segs, nil
}

func segmentName(n uint64) string { return fmt.Sprintf("%016d%s", n, segmentSuffix) }

func (l *Log) path(n uint64) string { return filepath.Join(l.opts.Dir, segmentName(n)) }

// dropUnstarted removes the segments at the end of the log that are shorter
// than their header and hold nothing but a prefix of it: what a crash leaves
// right after a segment file was created. Append creates the next segment's
// file while the chunk that ends the previous one may still be on its way to
// disk, so the segment before such a file may end in a torn record, and it is
// the last one replay must treat as such.
func (l *Log) dropUnstarted(segs []uint64) ([]uint64, error) {
	for len(segs) > 0 {
		path := l.path(segs[len(segs)-1])
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("wal: cannot read %s: %w", path, err)
		}
		if len(data) >= len(segmentMagic) || !bytes.HasPrefix(segmentMagic[:], data) {
			break
		}
		l.opts.Logger.Warn("empty segment at the end of the log removed", "file", path)
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("wal: cannot remove %s: %w", path, err)
		}
		segs = segs[:len(segs)-1]
	}
	return segs, nil
}

// replay reads every segment in order. Only the last may end in a torn
// record; it is cut off there.
func (l *Log) replay(segs []uint64, fn func(Pos, Type, []byte) error) error {
	for i, n := range segs {
		last := i == len(segs)-1
		path := l.path(n)
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("wal: cannot read %s: %w", path, err)
		}
		if !bytes.HasPrefix(data, segmentMagic[:]) {
			return fmt.Errorf("%w: %s does not start with the segment header of format version %d", ErrCorrupt, path, segmentMagic[4])
		}
		off := len(segmentMagic)
		for off < len(data) {
			typ, payload, size, err := DecodeRecord(data[off:])
			if err != nil {
				if last && torn(data[off:], err) {
					l.opts.Logger.Warn("torn record at the end of the log cut off", "file", path, "offset", off, "bytes", len(data)-off, "reason", err)
					if err := l.truncate(path, int64(off)); err != nil {
						return err
					}
					data = data[:off]
					break
				}
				return fmt.Errorf("%w: bad record in %s at offset %d: %w", ErrCorrupt, path, off, err)
			}
			if err := fn(Pos{Segment: n, Offset: int64(off)}, typ, payload); err != nil {
				return fmt.Errorf("wal: replay of the record in %s at offset %d: %w", path, off, err)
			}
			off += size
		}
		l.mu.segs[n] = int64(len(data))
		l.mu.total += int64(len(data))
	}
	return nil
}

// torn reports whether a decode error at the start of rest is what a crash
// in the middle of appending leaves: a record cut short, a last record whose
// bytes did not all reach the disk, or zeroes where the file grew but no data
// landed.
func torn(rest []byte, err error) bool {
	if errors.Is(err, errShort) {
		return true
	}
	if len(bytes.Trim(rest, "\x00")) == 0 {
		return true
	}
	if errors.Is(err, errChecksum) {
		_, _, n, _ := DecodeRecord(rest)
		return n == len(rest)
	}
	return false
}

func (l *Log) truncate(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("wal: cannot open %s to cut its torn tail: %w", path, err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("wal: cannot cut the torn tail of %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("wal: cannot sync %s: %w", path, err)
	}
	return nil
}

// startSegmentLocked creates segment n and makes it the one appended to.
func (l *Log) startSegmentLocked(n uint64) error {
	f, err := os.OpenFile(l.path(n), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		l.mu.err = fmt.Errorf("wal: cannot create a segment: %w", err)
		return l.mu.err
	}
	if k := len(l.mu.pending); k > 0 {
		l.mu.pending[k-1].last = true
	}
	header := int64(len(segmentMagic))
	l.mu.f, l.mu.seg, l.mu.size = f, n, header
	l.mu.segs[n] = header
	l.mu.total += header
	l.mu.end = Pos{Segment: n, Offset: header}
	l.mu.pending = append(l.mu.pending, chunk{f: f, newFile: true, position: header})
	if l.opts.Head != nil {
		l.appendLocked(l.opts.Head())
	}
	return nil
}

// appendLocked adds a record to what the next Sync writes.
func (l *Log) appendLocked(typ Type, payload []byte) {
	c := &l.mu.pending[len(l.mu.pending)-1]
	c.data = AppendRecord(c.data, typ, payload)
	n := int64(recordHeader + len(payload))
	l.mu.size += n
	l.mu.segs[l.mu.seg] += n
	l.mu.total += n
	l.mu.end = Pos{Segment: l.mu.seg, Offset: l.mu.size}
}

// Append adds a record in memory and returns its position. It is on disk
// once Sync of that position returns.
func (l *Log) Append(typ Type, payload []byte) (Pos, error) {
	if typ == 0 {
		return Pos{}, errors.New("wal: record type 0 is reserved")
	}
	if len(payload) > MaxRecord {
		return Pos{}, fmt.Errorf("wal: record of %d bytes, at most %d", len(payload), MaxRecord)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.err != nil {
		return Pos{}, l.mu.err
	}
	if l.mu.size > int64(len(segmentMagic)) && l.mu.size+recordHeader+int64(len(payload)) > l.opts.SegmentSize {
		if err := l.startSegmentLocked(l.mu.seg + 1); err != nil {
			return Pos{}, err
		}
	}
	pos := l.mu.end
	l.appendLocked(typ, payload)
	return pos, nil
}

// Rotate makes a new segment the one appended to and syncs it: every
// segment before it can then be deleted without losing what the new
// segment's head record restates.
func (l *Log) Rotate() error {
	l.mu.Lock()
	if l.mu.err != nil {
		defer l.mu.Unlock()
		return l.mu.err
	}
	if l.mu.size > int64(len(segmentMagic)) {
		if err := l.startSegmentLocked(l.mu.seg + 1); err != nil {
			l.mu.Unlock()
			return err
		}
	}
	end := l.mu.end
	l.mu.Unlock()
	return l.Sync(end)
}

// Sync returns once the record at pos, and every one before it, is on disk. Concurrent callers
// share the writes and fsyncs of one of them.
func (l *Log) Sync(pos Pos) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		if pos.Compare(l.mu.synced) < 0 {
			return nil
		}
		if l.mu.err != nil {
			return l.mu.err
		}
		if !l.mu.syncing {
			break
		}
		l.mu.cond.Wait()
	}
	// This caller writes for everyone.
	l.mu.syncing = true
	pending, end := l.mu.pending, l.mu.end
	l.mu.pending = []chunk{{f: l.mu.f, position: l.mu.size, data: l.mu.spare[:0]}}
	l.mu.spare = nil
	l.mu.Unlock()
	err := l.write(pending)
	l.mu.Lock()
	l.mu.spare = pending[len(pending)-1].data
	l.mu.syncing = false
	if err != nil {
		l.mu.err = err
	} else {
		l.mu.synced = end
	}
	l.mu.cond.Broadcast()
	return err
}

// write writes and fsyncs chunks in order.
func (l *Log) write(chunks []chunk) error {
	for i, c := range chunks {
		if err := l.writeChunk(c); err != nil {
			// The log is broken: close the files of the segments this
			// write would have finished, which nothing else will.
			for _, rest := range chunks[i:] {
				if rest.last {
					rest.f.Close()
				}
			}
			return err
		}
	}
	return nil
}

func (l *Log) writeChunk(c chunk) error {
	if c.newFile {
		if _, err := c.f.WriteAt(segmentMagic[:], 0); err != nil {
			return fmt.Errorf("wal: cannot write %s: %w", c.f.Name(), err)
		}
	}
	if len(c.data) > 0 {
		if _, err := c.f.WriteAt(c.data, c.position); err != nil {
			return fmt.Errorf("wal: cannot write %s: %w", c.f.Name(), err)
		}
	}
	if len(c.data) > 0 || c.last || c.newFile {
		if err := c.f.Sync(); err != nil {
			return fmt.Errorf("wal: cannot sync %s: %w", c.f.Name(), err)
		}
	}
	if c.newFile {
		if err := l.dir.Sync(); err != nil {
			return fmt.Errorf("wal: cannot sync the directory %s: %w", l.opts.Dir, err)
		}
	}
	if c.last {
		if err := c.f.Close(); err != nil {
			return fmt.Errorf("wal: cannot close %s: %w", c.f.Name(), err)
		}
	}
	return nil
}

// Err returns the error that broke the log (a failed write or sync), or
// ErrClosed, or nil while records can be appended.
func (l *Log) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mu.err
}

// End is the position after the last record appended.
func (l *Log) End() Pos {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mu.end
}

// Size is the log's size in bytes, counting what is not yet written.
func (l *Log) Size() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mu.total
}

// Segments returns the numbers of the segments in the log, in order.
func (l *Log) Segments() []uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	segs := make([]uint64, 0, len(l.mu.segs))
	for n := range l.mu.segs {
		segs = append(segs, n)
	}
	slices.Sort(segs)
	return segs
}

// DeleteBefore removes every segment numbered below seg, except the one being
// appended to.
func (l *Log) DeleteBefore(seg uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var errs []error
	for n, size := range l.mu.segs {
		if n >= seg || n == l.mu.seg {
			continue
		}
		if err := os.Remove(l.path(n)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("wal: cannot delete a segment: %w", err))
			continue
		}
		delete(l.mu.segs, n)
		l.mu.total -= size
	}
	return errors.Join(errs...)
}

// Close writes and syncs what was appended and closes the log.
func (l *Log) Close() error {
	err := l.Sync(l.End())
	l.mu.Lock()
	defer l.mu.Unlock()
	if errors.Is(l.mu.err, ErrClosed) {
		return nil
	}
	if l.mu.f != nil {
		if cerr := l.mu.f.Close(); err == nil {
			err = cerr
		}
	}
	l.dir.Close()
	l.mu.err = ErrClosed
	return err
}

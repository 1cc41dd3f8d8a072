package wal

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

type rec struct {
	pos     Pos
	typ     Type
	payload string
}

// open opens the log in dir and returns the records replayed.
func open(t *testing.T, opts Options) (*Log, []rec) {
	t.Helper()
	var got []rec
	l, err := Open(opts, func(pos Pos, typ Type, payload []byte) error {
		got = append(got, rec{pos, typ, string(payload)})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return l, got
}

func appendSync(t *testing.T, l *Log, typ Type, payload string) Pos {
	t.Helper()
	pos, err := l.Append(typ, []byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Sync(pos); err != nil {
		t.Fatal(err)
	}
	return pos
}

func TestReplayInOrderAcrossSegments(t *testing.T) {
	dir := t.TempDir()
	l, got := open(t, Options{Dir: dir, SegmentSize: 100})
	if len(got) != 0 {
		t.Fatalf("a new log replayed %v", got)
	}
	var want []rec
	for i := range 20 {
		p := fmt.Sprintf("record %d", i)
		want = append(want, rec{appendSync(t, l, Type(1+i%3), p), Type(1 + i%3), p})
	}
	if segs := l.Segments(); len(segs) < 4 {
		t.Fatalf("20 records of 17 bytes in segments of 100 bytes made segments %v", segs)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l, got = open(t, Options{Dir: dir, SegmentSize: 100})
	defer l.Close()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("replayed\n%v\nwant\n%v", got, want)
	}
	for i := 1; i < len(got); i++ {
		if got[i-1].pos.Compare(got[i].pos) >= 0 {
			t.Fatalf("positions do not grow: %v then %v", got[i-1].pos, got[i].pos)
		}
	}
}

func TestHeadRecordStartsEverySegment(t *testing.T) {
	dir := t.TempDir()
	heads := 0
	opts := Options{Dir: dir, SegmentSize: 64, Head: func() (Type, []byte) {
		heads++
		return 9, []byte(fmt.Sprint("head ", heads))
	}}
	l, _ := open(t, opts)
	for i := range 6 {
		appendSync(t, l, 1, fmt.Sprint("payload of record ", i))
	}
	l.Close()
	_, got := open(t, Options{Dir: dir})
	for _, r := range got {
		if r.pos.Offset == int64(len(segmentMagic)) && r.typ != 9 {
			t.Fatalf("segment %d starts with %v, want a head record", r.pos.Segment, r)
		}
	}
	if heads < 3 {
		t.Fatalf("%d heads for %d segments", heads, len(l.Segments()))
	}
}

// lastSegment returns the path of the newest segment with records.
func lastSegment(t *testing.T, dir string) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	for i := len(files) - 1; i >= 0; i-- {
		if st, _ := os.Stat(files[i]); st.Size() > int64(len(segmentMagic)) {
			return files[i]
		}
	}
	t.Fatal("no segment with records")
	return ""
}

func TestTornTailIsCutOff(t *testing.T) {
	for _, tc := range []struct {
		name string
		tear func(data []byte) []byte
	}{
		{"short", func(d []byte) []byte { return d[:len(d)-3] }},
		{"short header", func(d []byte) []byte { return d[:len(d)-len("third")-5] }},
		{"bad checksum", func(d []byte) []byte { d[len(d)-1] ^= 0xff; return d }},
		{"zeroes", func(d []byte) []byte { return append(d[:len(d)-len("third")-recordHeader], make([]byte, 40)...) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			l, _ := open(t, Options{Dir: dir})
			appendSync(t, l, 1, "first")
			appendSync(t, l, 1, "second")
			appendSync(t, l, 1, "third")
			l.Close()
			path := lastSegment(t, dir)
			data, _ := os.ReadFile(path)
			if err := os.WriteFile(path, tc.tear(data), 0o644); err != nil {
				t.Fatal(err)
			}
			l, got := open(t, Options{Dir: dir})
			if len(got) != 2 || got[1].payload != "second" {
				t.Fatalf("replayed %v, want the first two records", got)
			}
			// The tail is gone for good: records appended now replay after
			// the second.
			appendSync(t, l, 1, "fourth")
			l.Close()
			_, got = open(t, Options{Dir: dir})
			if len(got) != 3 || got[2].payload != "fourth" {
				t.Fatalf("replayed %v after the repair", got)
			}
		})
	}
}

// A crash while the chunk that fills a segment is being written can leave
// that segment torn and the next one created but still empty: Append creates
// the file before the earlier chunk reaches the disk.
func TestTornTailBeforeAnEmptySegment(t *testing.T) {
	for _, next := range []int{0, 3} {
		t.Run(fmt.Sprint(next, " bytes of header"), func(t *testing.T) {
			dir := t.TempDir()
			l, _ := open(t, Options{Dir: dir})
			appendSync(t, l, 1, "first")
			appendSync(t, l, 1, "second")
			end := l.End()
			l.Close()
			path := lastSegment(t, dir)
			data, _ := os.ReadFile(path)
			if err := os.WriteFile(path, data[:len(data)-2], 0o644); err != nil {
				t.Fatal(err)
			}
			empty := filepath.Join(dir, segmentName(end.Segment+1))
			if err := os.WriteFile(empty, segmentMagic[:next], 0o644); err != nil {
				t.Fatal(err)
			}
			l, got := open(t, Options{Dir: dir})
			defer l.Close()
			if len(got) != 1 || got[0].payload != "first" {
				t.Fatalf("replayed %v, want the first record", got)
			}
		})
	}
}

func TestCorruptionIsReported(t *testing.T) {
	f := func(name string, segSize int64, corrupt func(dir string)) {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			l, _ := open(t, Options{Dir: dir, SegmentSize: segSize})
			for i := range 6 {
				appendSync(t, l, 1, fmt.Sprint("record number ", i))
			}
			l.Close()
			corrupt(dir)
			_, err := Open(Options{Dir: dir}, func(Pos, Type, []byte) error { return nil })
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v, want corruption", err)
			}
			t.Log(err)
		})
	}
	flip := func(path string, off int) {
		data, _ := os.ReadFile(path)
		data[off] ^= 0x10
		os.WriteFile(path, data, 0o644)
	}
	// A flipped byte in the middle of the last segment: records follow the
	// bad one, so it is no torn tail.
	f("middle of the last segment", 1<<20, func(dir string) {
		flip(lastSegment(t, dir), len(segmentMagic)+recordHeader+3)
	})
	// The last record of a segment that is not the last.
	f("end of an earlier segment", 64, func(dir string) {
		files, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
		data, _ := os.ReadFile(files[0])
		flip(files[0], len(data)-1)
	})
	f("bad header", 1<<20, func(dir string) {
		files, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
		flip(files[0], 1)
	})
}

func TestReplayErrorStopsOpen(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, Options{Dir: dir})
	appendSync(t, l, 1, "x")
	l.Close()
	boom := errors.New("boom")
	if _, err := Open(Options{Dir: dir}, func(Pos, Type, []byte) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Open: %v", err)
	}
}

func TestDeleteBeforeAndSize(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, Options{Dir: dir, SegmentSize: 64})
	defer l.Close()
	var last Pos
	for i := range 10 {
		last = appendSync(t, l, 1, fmt.Sprint("record number ", i))
	}
	before := l.Size()
	segs := l.Segments()
	if err := l.DeleteBefore(last.Segment); err != nil {
		t.Fatal(err)
	}
	after := l.Segments()
	if len(after) != 1 || after[0] != last.Segment || len(segs) < 3 {
		t.Fatalf("segments %v, then %v after deleting below %d", segs, after, last.Segment)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	var onDisk int64
	for _, f := range files {
		st, _ := os.Stat(f)
		onDisk += st.Size()
	}
	if l.Size() >= before || l.Size() != onDisk {
		t.Fatalf("size %d (was %d), %d on disk in %d files", l.Size(), before, onDisk, len(files))
	}
}

// TestGroupCommit appends and syncs from many goroutines at once; every
// record synced must replay.
func TestGroupCommit(t *testing.T) {
	dir := t.TempDir()
	l, _ := open(t, Options{Dir: dir, SegmentSize: 4096})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				pos, err := l.Append(1, []byte(fmt.Sprintf("%d/%d", g, i)))
				if err == nil {
					err = l.Sync(pos)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	l.Close()
	_, got := open(t, Options{Dir: dir})
	seen := map[string]bool{}
	for _, r := range got {
		seen[r.payload] = true
	}
	if len(seen) != 400 || len(got) != 400 {
		t.Fatalf("replayed %d records, %d distinct, want 400", len(got), len(seen))
	}
}

func TestAppendAfterClose(t *testing.T) {
	l, _ := open(t, Options{Dir: t.TempDir()})
	if l.Err() != nil {
		t.Fatalf("Err of an open log: %v", l.Err())
	}
	l.Close()
	if !errors.Is(l.Err(), ErrClosed) {
		t.Fatalf("Err after Close: %v", l.Err())
	}
	if _, err := l.Append(1, []byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close: %v", err)
	}
	if _, err := l.Append(0, nil); err == nil {
		t.Fatal("type 0 was taken")
	}
}

// TestAppendRecord pins the framing of docs/format/wal.md (length, CRC-32C
// of the type and payload, type, payload) and that appending to a buffer
// with room allocates nothing: it runs for every record.
func TestAppendRecord(t *testing.T) {
	got := AppendRecord([]byte("x"), 7, []byte("payload"))
	want := append([]byte("x\x07\x00\x00\x00\x93\xb4\xac\x39\x07"), "payload"...)
	if !bytes.Equal(got, want) {
		t.Fatalf("AppendRecord = %x, want %x", got, want)
	}
	buf := make([]byte, 0, 64)
	if n := testing.AllocsPerRun(100, func() { buf = AppendRecord(buf[:0], 7, []byte("payload")) }); n != 0 {
		t.Errorf("AppendRecord allocates %v times a record", n)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add(AppendRecord(nil, 1, []byte("payload")))
	f.Add(AppendRecord(AppendRecord(nil, 2, nil), 3, []byte{0, 1, 2}))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1})
	f.Add(make([]byte, 12))
	f.Fuzz(func(t *testing.T, b []byte) {
		typ, payload, n, err := DecodeRecord(b)
		if err != nil {
			if n > len(b) {
				t.Fatalf("framed size %d beyond %d bytes", n, len(b))
			}
			return
		}
		if typ == 0 || n != recordHeader+len(payload) || n > len(b) {
			t.Fatalf("type %d, %d payload bytes, size %d of %d", typ, len(payload), n, len(b))
		}
		if again := AppendRecord(nil, typ, payload); !bytes.Equal(again, b[:n]) {
			t.Fatalf("re-encoding gives %x, read %x", again, b[:n])
		}
	})
}

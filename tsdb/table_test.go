package tsdb

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fileBytes adds up the sizes of the files in dir whose names end in
// suffix.
func fileBytes(t *testing.T, dir, suffix string) int64 {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), suffix) {
			continue
		}
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		n += info.Size()
	}
	return n
}

// TestGroupBypassesPebbleLog checks that the writer's rows do not go
// through Pebble's write-ahead log: the log files, which Pebble keeps for
// reuse at the size of what they held, grow with the staged batches alone.
func TestGroupBypassesPebbleLog(t *testing.T) {
	dir := t.TempDir()
	s := testSchema(t)
	db := openTest(t, dir, s)
	defer closeTest(t, db)
	finest := s.Family("requests").Finest().ID
	const cells = 40000
	deltas := make([]Delta, 0, cells)
	for i := range cells {
		deltas = append(deltas, Delta{Family: "requests", Cuboid: finest,
			Values: []string{fmt.Sprintf("d%d", i%7), fmt.Sprintf("h%d", i), "GET"},
			Time:   testNow.UnixMilli() - int64(i%3600)*1000, Sum: float64(i%5 + 1), Count: 1})
	}
	if _, err := db.Apply(BatchID{Source: "a", Seq: 1}, deltas); err != nil {
		t.Fatal(err)
	}
	logs, tables := fileBytes(t, dir, ".log"), fileBytes(t, dir, ".sst")
	if err := db.Flush(); err != nil {
		t.Fatal(err)
	}
	grew := fileBytes(t, dir, ".log") - logs
	// Whatever is still in Pebble's memtable goes to tables, so that
	// tables hold the group's rows however they were written.
	if err := db.pdb.Flush(); err != nil {
		t.Fatal(err)
	}
	wrote := fileBytes(t, dir, ".sst") - tables
	if wrote < 256<<10 {
		t.Fatalf("the group wrote %d bytes of tables; the test needs a larger group", wrote)
	}
	if grew > wrote/10 {
		t.Errorf("Pebble's log grew by %d bytes while the writer wrote %d bytes of rows: the rows went through the log", grew, wrote)
	}
	// What the table holds reads back: every cell's event, at the
	// coarsest resolution too.
	var events uint64
	err := db.Scan(len(s.Resolutions)-1, "requests", finest, nil, 0, testNow.UnixMilli()+1, func(_ uint32, steps []Step) error {
		for _, st := range steps {
			events += st.Count
		}
		return nil
	})
	if err != nil || events != cells {
		t.Fatalf("Scan after the write: %d events, %v; want %d", events, err, cells)
	}
}

// TestOpenRemovesHalfBuiltTable checks that a table a crash left half built
// does not stay in the store's directory.
func TestOpenRemovesHalfBuiltTable(t *testing.T) {
	dir := t.TempDir()
	s := testSchema(t)
	closeTest(t, openTest(t, dir, s))
	left := filepath.Join(dir, ingestPrefix+".0")
	if err := os.WriteFile(left, []byte("half a table"), 0o644); err != nil {
		t.Fatal(err)
	}
	closeTest(t, openTest(t, dir, s))
	if _, err := os.Stat(left); !os.IsNotExist(err) {
		t.Fatalf("%s after Open: %v; want it removed", left, err)
	}
}

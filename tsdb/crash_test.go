package tsdb

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/dimsum/dimsum/internal/dedupe"
	"github.com/dimsum/dimsum/schema"
)

// The crash test re-executes the test binary as a writer process, selected
// by these environment variables.
const (
	crashDirEnv  = "DIMSUM_TSDB_CRASH_DIR"  // the store's directory
	crashFromEnv = "DIMSUM_TSDB_CRASH_FROM" // the first batch to apply
	// crashMaxBatches bounds a writer that is never killed, so that an
	// orphaned one ends by itself.
	crashMaxBatches = 20000
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashDirEnv); dir != "" {
		if err := crashWriter(dir, os.Getenv(crashFromEnv)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// crashWriter applies batches from, from+1, ... with their identities,
// each synced, and prints "ack N" once Apply of batch N returned. Their
// deltas span days, so the writer writes rows all along: the kill lands
// in its writes too.
func crashWriter(dir, from string) error {
	first, err := strconv.Atoi(from)
	if err != nil {
		return fmt.Errorf("%s: %w", crashFromEnv, err)
	}
	s, err := schema.Parse([]byte(testSchemaYAML))
	if err != nil {
		return err
	}
	db, err := Open(Options{Dir: dir, Schema: s, now: func() time.Time { return testNow }})
	if err != nil {
		return err
	}
	defer db.Close()
	for i := first; i < first+crashMaxBatches; i++ {
		key, deltas := crashBatch(s, i)
		if _, err := db.Apply(key, deltas); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(os.Stdout, "ack %d\n", i); err != nil {
			return err
		}
	}
	return errors.New("writer was never killed")
}

// crashBatch returns the identity and the deltas of batch i, the same in
// every process. Every delta counts at least one event, so a batch applied
// twice or half shows in the counts.
func crashBatch(s *schema.Schema, i int) (BatchID, []Delta) {
	rng := rand.New(rand.NewPCG(uint64(i), 42))
	deltas := make([]Delta, 1+rng.IntN(10))
	for j := range deltas {
		deltas[j] = randomDelta(rng, s, testNow.UnixMilli())
		deltas[j].Count++
	}
	return BatchID{Source: "crash", Seq: uint64(i)}, deltas
}

// TestCrash kills a writer process with SIGKILL at random moments, several
// times over, and checks after each kill that the store holds every
// acknowledged batch exactly once, that the batch in flight at the kill
// was applied whole or not at all (its key and its data agree), and that
// nothing reads as corrupt. Finally the acknowledged batches the store
// still remembers must be refused as duplicates, before and after a
// compaction.
func TestCrash(t *testing.T) {
	rng := seeded(t)
	s := testSchema(t)
	dir := t.TempDir()
	m := &model{s: s, now: testNow.UnixMilli(), steps: map[modelKey]Step{}}
	next := 0 // the first batch not known to be in the store
	for round := range 4 {
		last := crashRound(t, rng, dir, next)
		for i := next; i <= last; i++ {
			_, deltas := crashBatch(s, i)
			m.apply(deltas)
		}
		// The batch in flight at the kill is either wholly in the store,
		// with its key, or wholly absent, without it. Applying it again
		// must therefore leave it in the store exactly once, either way.
		db := openSynced(t, dir)
		inFlight := last + 1
		key, deltas := crashBatch(s, inFlight)
		applied, err := db.Apply(key, deltas)
		if err != nil {
			t.Fatal(err)
		}
		m.apply(deltas)
		verify(t, db, m, rng)
		t.Logf("round %d: batches %d to %d acknowledged, batch %d in flight was %s", round, next, last, inFlight, map[bool]string{true: "absent", false: "present"}[applied])
		closeTest(t, db)
		next = inFlight + 1
	}
	db := openSynced(t, dir)
	defer closeTest(t, db)
	// A source's last dedupe.Window batches are remembered.
	for i := max(0, next-dedupe.Window+1); i < next; i++ {
		key, deltas := crashBatch(s, i)
		applied, err := db.Apply(key, deltas)
		if err != nil {
			t.Fatal(err)
		}
		if applied {
			t.Fatalf("batch %d was applied again", i)
		}
	}
	verify(t, db, m, rng)
	// Compaction folds what the writers left into merged rows.
	if err := db.pdb.Compact(context.Background(), []byte{0}, []byte{0xff}, false); err != nil {
		t.Fatal(err)
	}
	verify(t, db, m, rng)
}

// seeded returns a generator seeded from the clock, and logs the seed, so
// that a failing run can be told apart and replayed.
func seeded(t *testing.T) *rand.Rand {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	return rand.New(rand.NewPCG(seed, 1))
}

// crashRound starts a writer from batch first, kills it after a random
// number of acknowledgements and a random pause, and returns the last
// batch it acknowledged (first-1 if none).
func crashRound(t *testing.T, rng *rand.Rand, dir string, first int) int {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, crashFromEnv+"="+strconv.Itoa(first))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killAfter := 1 + rng.IntN(40)
	pause := time.Duration(rng.IntN(3000)) * time.Microsecond
	last := first - 1
	killed := false
	lines := bufio.NewScanner(stdout)
	for lines.Scan() {
		var n int
		if _, err := fmt.Sscanf(lines.Text(), "ack %d", &n); err != nil || n != last+1 {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t.Fatalf("writer printed %q after acknowledging %d", lines.Text(), last)
		}
		last = n
		if !killed && n-first+1 == killAfter {
			// Let the next Apply get under way, then kill: the kill lands
			// anywhere from before its batch is written to after it returned.
			time.Sleep(pause)
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	// Acknowledgements written before the kill are still read above, up to
	// the end of the pipe.
	err = cmd.Wait()
	var exit *exec.ExitError
	if !killed || !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("writer ended with %v before it was killed; stderr:\n%s", err, stderr.Bytes())
	}
	return last
}

// openSynced opens the store with synced writes, as the writer does.
func openSynced(t *testing.T, dir string) *DB {
	t.Helper()
	db, err := Open(Options{Dir: dir, Schema: testSchema(t), now: func() time.Time { return testNow }})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

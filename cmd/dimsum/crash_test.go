package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// crashBatch is one batch of the crash test with its identity, and whether
// the node acknowledged it.
type crashBatch struct {
	req        *wirepb.PushRequest
	sum, count float64
	acked      bool
}

// TestSIGKILL pushes batches with identities into a real node and kills it
// with SIGKILL in the middle, several times. After each restart it retries
// the batches that were not acknowledged, under the same identities. At the
// end the store must hold exactly the events of the batches, every one
// counted once: none acknowledged is lost, and a batch whose reply the kill
// cut off, then retried, is not counted twice. Live, the events are stamped
// now; as a backfill, each batch is 20s of data after the one before,
// starting a day ago, so that the store writes rows all along (its finest
// rows span 6 minutes) and the kills land in those writes too.
func TestSIGKILL(t *testing.T) {
	for _, backfill := range []bool{false, true} {
		t.Run(map[bool]string{false: "live", true: "backfill"}[backfill], func(t *testing.T) { testSIGKILL(t, backfill) })
	}
}

func testSIGKILL(t *testing.T, backfill bool) {
	dir, bin := t.TempDir(), dimsumBinary(t)
	config := writeConfig(t, dir, "aggregator: {grace: 500ms, flush_interval: 100ms, max_lateness: 30h}\nschema: {resolutions: [1s:2d, 1m:35d]}\n")
	base := time.Now().Add(-24 * time.Hour)
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	data := filepath.Join(dir, "data")
	start := func() *exec.Cmd { return startNode(t, bin, config, data, grpcAddr, httpAddr) }
	conn, err := grpc.NewClient("passthrough:///"+grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := wirepb.NewIngestClient(conn)

	rng := rand.New(rand.NewPCG(1, 2))
	var batches []*crashBatch
	newBatch := func() *crashBatch {
		var b wire.Batch
		cb := &crashBatch{}
		ts := time.Now()
		if backfill {
			ts = base.Add(time.Duration(len(batches)) * 20 * time.Second)
		}
		for range 200 {
			v := float64(1 + rng.IntN(9))
			h := rng.IntN(40)
			b.Add("requests", ts.UnixMilli(), v, "datacenter", fmt.Sprint("dc", h%2), "cluster", fmt.Sprint("c", h%4),
				"host", fmt.Sprint("h", h), "transaction", fmt.Sprint("t", rng.IntN(5)), "status", "200")
			cb.sum += v
			cb.count++
		}
		cb.req = b.Request()
		cb.req.Source, cb.req.BatchSeq = "crash-test", uint64(len(batches)+1)
		batches = append(batches, cb)
		return cb
	}
	// push sends a batch once; it reports false when the node did not
	// answer (it is gone). wait makes the call wait for the connection to
	// come back first, as after a restart.
	push := func(cb *crashBatch, wait bool) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		resp, err := client.Push(ctx, cb.req, grpc.WaitForReady(wait))
		if err != nil {
			return false
		}
		if len(resp.Rejects) != 0 {
			t.Errorf("batch %d: rejects %v", cb.req.BatchSeq, resp.Rejects)
		}
		cb.acked = true
		return true
	}
	retry := func() {
		for _, cb := range batches {
			if !cb.acked && !push(cb, true) {
				t.Fatalf("batch %d: the restarted node did not take it", cb.req.BatchSeq)
			}
		}
	}

	for round := range 4 {
		node := start()
		retry()
		// Two pushers race the kill, so batches are in flight when it
		// lands.
		var mu sync.Mutex
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					mu.Lock()
					cb := newBatch()
					mu.Unlock()
					if !push(cb, false) {
						return
					}
				}
			})
		}
		time.Sleep(time.Duration(300+rng.IntN(700)) * time.Millisecond)
		if err := node.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		node.Wait()
		close(stop)
		wg.Wait()
		acked := 0
		for _, cb := range batches {
			if cb.acked {
				acked++
			}
		}
		t.Logf("round %d: killed with %d of %d batches acknowledged", round, acked, len(batches))
	}

	// A clean stop flushes every window; the next start reads them back.
	node := start()
	retry()
	stopNode(t, node)
	node = start()
	defer stopNode(t, node)
	var want struct{ sum, count float64 }
	for _, cb := range batches {
		want.sum += cb.sum
		want.count += cb.count
	}
	sums, count, err := sliceTotals(httpAddr, "30h")
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, s := range sums {
		sum += s
	}
	if sum != want.sum || count != want.count {
		t.Errorf("the store holds sum %v count %v; the %d batches sent hold sum %v count %v", sum, count, len(batches), want.sum, want.count)
	}
}

package combiner

import (
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// backfillFlushes returns the flushes of one minute of the sparse backfill
// of docs/benchmarks.md, one a 10s window, over the default schema: series
// finest series (4 datacenters x 5 clusters x hosts x 10 transactions x
// one status), each counted once a minute in the window its hash picks,
// and every window's cells rolled up into the 15 other cuboids. The cells
// are in no order, as an aggregator's map hands them out, and each flush
// has its own dictionary in order of first use, in the columnar layout.
func backfillFlushes(s *schema.Schema, series int) []*wirepb.FlushRequest {
	fam := s.Family("requests")
	txns := []string{"get_item", "put_cart", "list_user", "search_order", "checkout_listing", "login_offer", "view_feed", "update_image", "delete_review", "pay_bid"}
	const windows, dcs, clustersPerDC = 6, 4, 5
	clusters := dcs * clustersPerDC
	rng := rand.New(rand.NewPCG(5, 6))
	var out []*wirepb.FlushRequest
	for w := range windows {
		type cellKey struct {
			cuboid schema.CuboidID
			values [5]string
		}
		cells := map[cellKey]uint64{}
		for sr := range series {
			if rand.New(rand.NewPCG(uint64(sr), 7)).IntN(windows) != w {
				continue
			}
			h := sr / len(txns)
			c := h % clusters
			dc := fmt.Sprintf("dc%d", c/clustersPerDC+1)
			cl := fmt.Sprintf("%s-c%d", dc, c%clustersPerDC+1)
			full := [5]string{dc, cl, fmt.Sprintf("%s-h%04d", cl, h/clusters+1), txns[sr%len(txns)], "200"}
			count := uint64(1 + rng.IntN(20))
			for _, cub := range fam.Cuboids() {
				k := cellKey{cuboid: cub.ID}
				for i, slot := range cub.Slots {
					k.values[i] = full[slot]
				}
				cells[k] += count
			}
		}
		req := &wirepb.FlushRequest{Source: "agg/1", Dict: []string{fam.Name}}
		index := map[string]uint32{}
		for k, count := range cells {
			req.CellFamilies = append(req.CellFamilies, 0)
			req.CellCuboids = append(req.CellCuboids, uint32(k.cuboid))
			cub, _ := fam.Cuboid(k.cuboid)
			for _, v := range k.values[:len(cub.Labels)] {
				i, ok := index[v]
				if !ok {
					i = uint32(len(req.Dict))
					index[v] = i
					req.Dict = append(req.Dict, v)
				}
				req.CellValues = append(req.CellValues, i)
			}
			req.CellSums = append(req.CellSums, float64(count))
			req.CellCounts = append(req.CellCounts, count)
		}
		out = append(out, req)
	}
	return out
}

// BenchmarkApply applies the flushes of the sparse backfill, one 10s window
// an iteration, into cells the store already has (the steady state of a
// backfill: every series was seen in the first minute), with the store's
// writer writing the rows that close meanwhile; the head is flushed before
// the timer stops. "decode" unmarshals each flush first, as the gRPC server
// does. ns/cell is the time a cell takes, cpu-ns/cell the CPU time of the
// whole process, every goroutine (the writer's and Pebble's too): on two
// cores the writer runs beside Apply, and the time alone would hide what
// it costs.
func BenchmarkApply(b *testing.B) {
	for _, decode := range []bool{false, true} {
		b.Run(fmt.Sprintf("decode=%v", decode), func(b *testing.B) {
			s := schema.Default()
			db, err := tsdb.Open(tsdb.Options{Dir: b.TempDir(), Schema: s, NoSync: true})
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			c, err := New(Options{Store: db, Schema: s})
			if err != nil {
				b.Fatal(err)
			}
			flushes := backfillFlushes(s, 10_000)
			encoded := make([][]byte, len(flushes))
			cells := 0
			for i, f := range flushes {
				cells += len(f.CellCounts)
				if encoded[i], err = proto.Marshal(f); err != nil {
					b.Fatal(err)
				}
			}
			start := time.Now().Add(-7 * 24 * time.Hour).Truncate(time.Hour).UnixMilli()
			// Create the cells first: every series was seen in the first
			// minute.
			n := len(flushes)
			for i, req := range flushes {
				req.WindowStartMs, req.Sequence = start+int64(i)*10_000, uint64(i)
				if _, err := c.Apply(req); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			cpu := cpuTime(b)
			b.ResetTimer()
			for i := n; i < n+b.N; i++ {
				req := flushes[i%n]
				if decode {
					req = new(wirepb.FlushRequest)
					if err := proto.Unmarshal(encoded[i%n], req); err != nil {
						b.Fatal(err)
					}
				}
				req.WindowStartMs = start + int64(i%50_000)*10_000 // within the finest retention
				req.Sequence = uint64(i)
				if _, err := c.Apply(req); err != nil {
					b.Fatal(err)
				}
			}
			if err := db.Flush(); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			cpu = cpuTime(b) - cpu
			perOp := float64(cells) / float64(n)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/(float64(b.N)*perOp), "ns/cell")
			b.ReportMetric(float64(cpu.Nanoseconds())/(float64(b.N)*perOp), "cpu-ns/cell")
			b.ReportMetric(perOp, "cells/op")
		})
	}
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

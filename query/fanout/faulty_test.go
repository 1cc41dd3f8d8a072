package fanout_test

import (
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/combiner"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// faultyRead is a combiner's read service that spoils every message of
// its Scan streams, and then, if spoil says so, fails the stream.
type faultyRead struct {
	*combiner.ReadServer
	spoil func(c *wirepb.ScanChunk) error
}

func (f faultyRead) Scan(req *wirepb.ScanRequest, stream grpc.ServerStreamingServer[wirepb.ScanChunk]) error {
	return f.ReadServer.Scan(req, &faultyStream{ServerStreamingServer: stream, spoil: f.spoil})
}

type faultyStream struct {
	grpc.ServerStreamingServer[wirepb.ScanChunk]
	spoil func(c *wirepb.ScanChunk) error
}

func (s *faultyStream) Send(c *wirepb.ScanChunk) error {
	err := s.spoil(c)
	if serr := s.ServerStreamingServer.Send(c); serr != nil {
		return serr
	}
	return err
}

// TestFanOutFaultyReplica has combiner c0 answer Cells well and then spoil
// its Scan streams: the shards read from it (0, 3 and 6, which prefer it)
// are missing from the answer, with the warning, and nothing else changes.
func TestFanOutFaultyReplica(t *testing.T) {
	var (
		spoil   atomic.Pointer[func(c *wirepb.ScanChunk) error]
		spoiled atomic.Int64
	)
	count := func(c *wirepb.ScanChunk) error {
		spoiled.Add(1)
		return (*spoil.Load())(c)
	}
	w := newWorld(t, map[string]func(*combiner.ReadServer) wirepb.ReadServer{
		"c0": func(rs *combiner.ReadServer) wirepb.ReadServer { return faultyRead{rs, count} },
	})
	for name, f := range map[string]func(c *wirepb.ScanChunk) error{
		// The stream breaks after its first message.
		"error midway": func(*wirepb.ScanChunk) error {
			return status.Error(codes.Internal, "disk on fire")
		},
		// A cell comes with fewer sums than starts.
		"short sums": func(c *wirepb.ScanChunk) error {
			c.Cells[len(c.Cells)-1].Sums = c.Cells[len(c.Cells)-1].Sums[1:]
			return nil
		},
		// A cell that was not asked for.
		"unknown cell": func(c *wirepb.ScanChunk) error {
			c.Cells[0].Id = 1<<29 - 1
			return nil
		},
		// Cells out of order.
		"descending cells": func(c *wirepb.ScanChunk) error {
			if len(c.Cells) > 1 {
				c.Cells[0], c.Cells[1] = c.Cells[1], c.Cells[0]
			} else {
				c.Cells = append(c.Cells, c.Cells[0])
			}
			return nil
		},
		// A step outside the range.
		"step out of range": func(c *wirepb.ScanChunk) error {
			c.Cells[0].StartsMs[0] = -1
			return nil
		},
	} {
		t.Run(name, func(t *testing.T) {
			spoil.Store(&f)
			for _, r := range w.requests() {
				if r.path != "/api/v1/query" && r.path != "/api/v1/query_range" && r.path != "/api/v1/cube/slice" {
					continue // no scan
				}
				// When the lost shards hold no data the request reads,
				// the faulty combiner sends nothing to spoil, and the
				// answer is whole.
				spoiled.Store(0)
				get(w.fan, r.path, r.p)
				warning := lostWarning
				if spoiled.Load() == 0 {
					warning = ""
				}
				w.sameOne(t, r, w.refPartial, warning)
			}
			r := w.requests()[0]
			p := url.Values{}
			for k, v := range r.p {
				p[k] = v
			}
			p.Set("partial_response", "false")
			w.unavailable(t, w.fan, request{r.path, p}, "have no reachable replica")
		})
	}
}

// hugeIDs is a combiner's read service whose cell IDs are larger than a
// view can address with the test's shard count, as a store with that many
// cells in one cuboid would have.
type hugeIDs struct {
	*combiner.ReadServer
}

func (h hugeIDs) Cells(req *wirepb.CellsRequest, stream grpc.ServerStreamingServer[wirepb.CellsChunk]) error {
	return h.ReadServer.Cells(req, &hugeStream{stream})
}

type hugeStream struct {
	grpc.ServerStreamingServer[wirepb.CellsChunk]
}

func (s *hugeStream) Send(c *wirepb.CellsChunk) error {
	for _, cell := range c.Cells {
		cell.Id |= 1 << 31
	}
	return s.ServerStreamingServer.Send(c)
}

// TestFanOutTooManyCells checks that cell IDs beyond what a view addresses
// fail the query with a message that says so, rather than passing for an
// unreachable replica: every replica would answer alike.
func TestFanOutTooManyCells(t *testing.T) {
	wrap := map[string]func(*combiner.ReadServer) wirepb.ReadServer{}
	for i := range combiners {
		wrap[combinerName(i)] = func(rs *combiner.ReadServer) wirepb.ReadServer { return hugeIDs{rs} }
	}
	w := newWorld(t, wrap)
	code, body, _ := get(w.fan, "/api/v1/query", url.Values{"query": {"sum(requests_delta)"}})
	if code != http.StatusInternalServerError || !strings.Contains(string(body), "beyond the") {
		t.Fatalf("HTTP %d: %s; want 500 saying the cell IDs are beyond what a query can address", code, body)
	}
}

package combiner

import (
	"context"
	"fmt"
	"math"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// digestReplica is a real store and a client of its read service over
// gRPC on loopback.
type digestReplica struct {
	db     *tsdb.DB
	client wirepb.ReadClient
}

func newDigestReplica(t *testing.T, s *schema.Schema) *digestReplica {
	t.Helper()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return &digestReplica{db: db, client: serveRead(t, s, db)}
}

func (r *digestReplica) digest(t *testing.T, req *wirepb.DigestRequest) []*wirepb.ShardDigest {
	t.Helper()
	resp, err := r.client.Digest(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Shards
}

// TestDigest applies the same batches to two stores in opposite orders, so
// that their cells get other IDs and their fractional sums other last bits:
// the digests of every shard agree, at every resolution, and a digest of
// some shards is theirs in a digest of all. One more batch in one store
// changes the digest of its cell's shard, and of that shard alone.
func TestDigest(t *testing.T) {
	s := schema.Default()
	a, b := newDigestReplica(t, s), newDigestReplica(t, s)
	finest := s.Family("requests").Finest()
	now := time.Now().Truncate(time.Hour).UnixMilli()
	var batches [][]tsdb.Delta
	for h := range 30 {
		var batch []tsdb.Delta
		for step := range 20 {
			batch = append(batch, tsdb.Delta{Family: "requests", Cuboid: finest.ID, Values: []string{"dc1", "c1", fmt.Sprintf("h%02d", h), "get", "200"},
				Time: now - int64(step)*60_000, Sum: float64(h%3) + 0.1*float64(step%4), Count: uint64(step%3 + 1)})
		}
		batches = append(batches, batch)
	}
	for i := range batches {
		if _, err := a.db.Apply(tsdb.BatchID{}, batches[i]); err != nil {
			t.Fatal(err)
		}
		if _, err := b.db.Apply(tsdb.BatchID{}, batches[len(batches)-1-i]); err != nil {
			t.Fatal(err)
		}
	}
	// The same step of one cell in three batches, in two orders.
	h0 := []string{"dc1", "c1", "h00", "get", "200"}
	// (0.1+0.2)+0.7 is 1, (0.7+0.2)+0.1 is not.
	for i, order := range [][]float64{{0.1, 0.2, 0.7}, {0.7, 0.2, 0.1}} {
		for _, sum := range order {
			if _, err := []*digestReplica{a, b}[i].db.Apply(tsdb.BatchID{}, []tsdb.Delta{{Family: "requests", Cuboid: finest.ID, Values: h0, Time: now - 30*60_000, Sum: sum, Count: 1}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	const shards = 4
	all := &wirepb.ShardSet{Count: shards, Shards: []uint32{0, 1, 2, 3}}
	for res := range s.Resolutions {
		req := &wirepb.DigestRequest{Shards: all, Resolution: uint32(res), MintMs: now - 2*time.Hour.Milliseconds(), MaxtMs: now}
		da, db := a.digest(t, req), b.digest(t, req)
		var cells, steps uint64
		for i := range da {
			if da[i].Shard != uint32(i) || db[i].Shard != uint32(i) {
				t.Fatalf("resolution %d: digests of shards %d and %d at place %d", res, da[i].Shard, db[i].Shard, i)
			}
			if da[i].Cells != db[i].Cells || da[i].Steps != db[i].Steps || da[i].Sum != db[i].Sum {
				t.Errorf("resolution %d, shard %d: the stores' digests differ: %v and %v", res, i, da[i], db[i])
			}
			cells += da[i].Cells
			steps += da[i].Steps
		}
		some := a.digest(t, &wirepb.DigestRequest{Shards: &wirepb.ShardSet{Count: shards, Shards: []uint32{3, 1}}, Resolution: uint32(res), MintMs: req.MintMs, MaxtMs: req.MaxtMs})
		if len(some) != 2 || !proto.Equal(some[0], da[3]) || !proto.Equal(some[1], da[1]) {
			t.Errorf("resolution %d: the digests of shards 3 and 1 are %v, in the digest of all %v and %v", res, some, da[3], da[1])
		}
		if cells != 30 || steps < cells {
			t.Errorf("resolution %d: %d cells and %d steps digested, want the 30 hosts' cells", res, cells, steps)
		}
	}
	if _, err := b.db.Apply(tsdb.BatchID{}, []tsdb.Delta{{Family: "requests", Cuboid: finest.ID, Values: h0, Time: now - 60_000, Sum: 1, Count: 1}}); err != nil {
		t.Fatal(err)
	}
	req := &wirepb.DigestRequest{Shards: all, Resolution: 0, MintMs: now - 2*time.Hour.Milliseconds(), MaxtMs: now}
	da, db := a.digest(t, req), b.digest(t, req)
	var differ []uint32
	for i := range da {
		if da[i].Sum != db[i].Sum || da[i].Steps != db[i].Steps {
			differ = append(differ, uint32(i))
		}
	}
	// The store rolls nothing up: the batch changes h00's finest cell.
	want := []uint32{schema.Shard("requests", finest.ID, h0, shards)}
	if !slices.Equal(differ, want) {
		t.Errorf("after one more batch in one store, shards %v differ, want %v (those of h00's cells)", differ, want)
	}
}

// TestDigestInvalid checks the requests a digest refuses.
func TestDigestInvalid(t *testing.T) {
	s := schema.Default()
	r := newDigestReplica(t, s)
	for name, req := range map[string]*wirepb.DigestRequest{
		"no shard":            {Shards: &wirepb.ShardSet{Count: 4}},
		"shard out of range":  {Shards: &wirepb.ShardSet{Count: 4, Shards: []uint32{4}}},
		"shard twice":         {Shards: &wirepb.ShardSet{Count: 4, Shards: []uint32{1, 1}}},
		"resolution":          {Shards: &wirepb.ShardSet{Count: 4, Shards: []uint32{1}}, Resolution: uint32(len(s.Resolutions))},
		"mint after maxt":     {Shards: &wirepb.ShardSet{Count: 4, Shards: []uint32{1}}, MintMs: 2, MaxtMs: 1},
		"too many shards":     {Shards: &wirepb.ShardSet{Count: MaxShards + 1, Shards: []uint32{1}}},
		"an unsplit cube's 1": {Shards: &wirepb.ShardSet{Shards: []uint32{1}}, MaxtMs: math.MaxInt64},
	} {
		if _, err := r.client.Digest(context.Background(), req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
}

package combiner

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/internal/race"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

func newCombiner(t testing.TB) (*Combiner, *tsdb.DB) {
	t.Helper()
	s := schema.Default()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	c, err := New(Options{Store: db, Schema: s})
	if err != nil {
		t.Fatal(err)
	}
	return c, db
}

// flush is a one-cell flush into the apex cuboid and one into the finest.
func flush(window int64, seq uint64) *wirepb.FlushRequest {
	finest := uint32(schema.Default().Family("requests").Finest().ID)
	return &wirepb.FlushRequest{
		Source: "agg/1", WindowStartMs: window, Sequence: seq,
		Dict: []string{"requests", "dc1", "c1", "h1", "get", "200"},
		Cells: []*wirepb.FlushCell{
			{Family: 0, Cuboid: 0, Sum: 5, Count: 2},
			{Family: 0, Cuboid: finest, Values: []uint32{1, 2, 3, 4, 5}, Sum: 5, Count: 2},
		},
	}
}

// columnar is flush in the columnar layout aggregators send.
func columnar(window int64, seq uint64) *wirepb.FlushRequest {
	finest := uint32(schema.Default().Family("requests").Finest().ID)
	return &wirepb.FlushRequest{
		Source: "agg/1", WindowStartMs: window, Sequence: seq,
		Dict:         []string{"requests", "dc1", "c1", "h1", "get", "200"},
		CellFamilies: []uint32{0, 0},
		CellCuboids:  []uint32{0, finest},
		CellValues:   []uint32{1, 2, 3, 4, 5},
		CellSums:     []float64{5, 5},
		CellCounts:   []uint64{2, 2},
	}
}

// apexSum reads the apex cuboid's finest steps around window.
func apexSum(t *testing.T, db *tsdb.DB, window int64) float64 {
	t.Helper()
	cells, err := db.Cells("requests", 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, c := range cells {
		steps, err := db.Steps(0, "requests", 0, c.ID, window-60_000, window+60_000, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range steps {
			sum += s.Sum
		}
	}
	return sum
}

func TestApplyOnce(t *testing.T) {
	c, db := newCombiner(t)
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	for i, want := range []bool{false, true, true} {
		dup, err := c.Apply(flush(w, 0))
		if err != nil {
			t.Fatal(err)
		}
		if dup != want {
			t.Errorf("apply %d: duplicate = %v, want %v", i, dup, want)
		}
	}
	if dup, err := c.Apply(flush(w, 1)); err != nil || dup {
		t.Fatalf("next sequence: duplicate %v, err %v", dup, err)
	}
	if got := apexSum(t, db, w); got != 10 {
		t.Errorf("apex sum %v, want 10 (two distinct flushes of 5)", got)
	}
}

func TestBadFlush(t *testing.T) {
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	for _, tc := range []struct {
		name   string
		change func(*wirepb.FlushRequest)
	}{
		{"no source", func(r *wirepb.FlushRequest) { r.Source = "" }},
		{"unknown family", func(r *wirepb.FlushRequest) { r.Dict[0] = "nope" }},
		{"family outside dict", func(r *wirepb.FlushRequest) { r.Cells[1].Family = 99 }},
		{"value outside dict", func(r *wirepb.FlushRequest) { r.Cells[1].Values[2] = 99 }},
		{"unknown cuboid", func(r *wirepb.FlushRequest) { r.Cells[1].Cuboid = 16 }},
		{"cuboid beyond 16 bits", func(r *wirepb.FlushRequest) { r.Cells[0].Cuboid = 1 << 16 }},
		{"NaN sum", func(r *wirepb.FlushRequest) { r.Cells[1].Sum = math.NaN() }},
		{"negative sum", func(r *wirepb.FlushRequest) { r.Cells[0].Sum = -1 }},
		{"empty value", func(r *wirepb.FlushRequest) { r.Dict[3] = "" }},
		{"too few values", func(r *wirepb.FlushRequest) { r.Cells[1].Values = r.Cells[1].Values[:4] }},
		{"shard out of range", func(r *wirepb.FlushRequest) { r.Shard, r.Shards = 3, 3 }},
		{"shard of an unsharded flush", func(r *wirepb.FlushRequest) { r.Shard = 1 }},
		{"cell of another shard", func(r *wirepb.FlushRequest) {
			r.Shards = 7
			r.Shard = (apexShard(7) + 1) % 7
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, db := newCombiner(t)
			req := flush(w, 0)
			tc.change(req)
			if _, err := c.Apply(req); !errors.Is(err, ErrBadFlush) {
				t.Fatalf("error %v, want ErrBadFlush", err)
			}
			if got := apexSum(t, db, w); got != 0 {
				t.Errorf("a refused flush wrote %v", got)
			}
		})
	}
	// The columnar layout.
	for _, tc := range []struct {
		name   string
		change func(*wirepb.FlushRequest)
	}{
		{"family outside dict", func(r *wirepb.FlushRequest) { r.CellFamilies[1] = 99 }},
		{"value outside dict", func(r *wirepb.FlushRequest) { r.CellValues[2] = 99 }},
		{"unknown cuboid", func(r *wirepb.FlushRequest) { r.CellCuboids[1] = 16 }},
		{"cuboid beyond 16 bits", func(r *wirepb.FlushRequest) { r.CellCuboids[0] = 1 << 16 }},
		{"NaN sum", func(r *wirepb.FlushRequest) { r.CellSums[1] = math.NaN() }},
		{"empty value", func(r *wirepb.FlushRequest) { r.Dict[3] = "" }},
		{"too few values", func(r *wirepb.FlushRequest) { r.CellValues = r.CellValues[:4] }},
		{"values left over", func(r *wirepb.FlushRequest) { r.CellValues = append(r.CellValues, 1) }},
		{"a sum short", func(r *wirepb.FlushRequest) { r.CellSums = r.CellSums[:1] }},
		{"a family short", func(r *wirepb.FlushRequest) { r.CellFamilies = r.CellFamilies[:1] }},
		{"cells in both layouts", func(r *wirepb.FlushRequest) { r.Cells = flush(w, 0).Cells }},
		{"a number short", func(r *wirepb.FlushRequest) { r.Numbering, r.CellNumbers = 1, make([]uint32, len(r.CellCounts)-1) }},
		{"sums and whole sums", func(r *wirepb.FlushRequest) { r.CellWholeSums = []uint64{5, 5} }},
		{"a whole sum short", func(r *wirepb.FlushRequest) { r.CellSums, r.CellWholeSums = nil, []uint64{5} }},
	} {
		t.Run("columns/"+tc.name, func(t *testing.T) {
			c, db := newCombiner(t)
			req := columnar(w, 0)
			tc.change(req)
			if _, err := c.Apply(req); !errors.Is(err, ErrBadFlush) {
				t.Fatalf("error %v, want ErrBadFlush", err)
			}
			if got := apexSum(t, db, w); got != 0 {
				t.Errorf("a refused flush wrote %v", got)
			}
		})
	}
}

// A flush whose sums are whole numbers, as an aggregator sends them to the
// combiner in its process, reads as the same flush with its sums as doubles.
func TestWholeSums(t *testing.T) {
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	req := columnar(w, 0)
	wire.WholeSums(req)
	if req.CellSums != nil || !slices.Equal(req.CellWholeSums, []uint64{5, 5}) {
		t.Fatalf("sums %v, whole sums %v", req.CellSums, req.CellWholeSums)
	}
	c, db := newCombiner(t)
	if _, err := c.Apply(req); err != nil {
		t.Fatal(err)
	}
	if got := apexSum(t, db, w); got != 5 {
		t.Errorf("apex sum %v, want 5", got)
	}
	// An empty list of whole sums is no list: the sums are the doubles.
	req = columnar(w, 1)
	req.CellWholeSums = []uint64{}
	if _, err := c.Apply(req); err != nil {
		t.Fatal(err)
	}
	if got := apexSum(t, db, w); got != 10 {
		t.Errorf("apex sum %v, want 10", got)
	}
	// Any sum that is not such a number keeps them all as doubles.
	for _, sum := range []float64{0.5, -1, math.Copysign(0, -1), 1<<53 + 2, math.Inf(1), math.NaN()} {
		req := columnar(w, 0)
		req.CellSums[1] = sum
		wire.WholeSums(req)
		if len(req.CellSums) != 2 || req.CellWholeSums != nil {
			t.Errorf("sum %v: sums %v, whole sums %v", sum, req.CellSums, req.CellWholeSums)
		}
	}
}

// apexShard is the shard of flush's apex cell out of shards.
func apexShard(shards int) uint32 { return schema.Shard("requests", 0, nil, shards) }

// A sharded flush whose every cell belongs to its shard is applied.
func TestShardedFlush(t *testing.T) {
	c, db := newCombiner(t)
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	req := flush(w, 0)
	req.Cells = req.Cells[:1] // the apex alone
	req.Shards = 7
	req.Shard = apexShard(7)
	if _, err := c.Apply(req); err != nil {
		t.Fatal(err)
	}
	if got := apexSum(t, db, w); got != 5 {
		t.Errorf("apex sum %v, want 5", got)
	}
}

// TestGRPC flushes over a real loopback connection.
func TestGRPC(t *testing.T) {
	c, db := newCombiner(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	c.Register(srv)
	go srv.Serve(ln)
	defer srv.Stop()
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := wirepb.NewCombinerClient(conn)
	ctx := context.Background()
	w := time.Now().Truncate(10 * time.Second).UnixMilli()

	for _, want := range []bool{false, true} {
		resp, err := client.Flush(ctx, flush(w, 3))
		if err != nil || resp.Duplicate != want {
			t.Fatalf("Flush: %v, duplicate %v, want %v", err, resp.GetDuplicate(), want)
		}
	}
	bad := flush(w, 4)
	bad.Dict[0] = "nope"
	if _, err := client.Flush(ctx, bad); status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad flush: %v, want InvalidArgument", err)
	}
	sink := NewClient("c1", conn, schema.Default())
	if sink.Shards() != 1 || fmt.Sprint(sink.Replicas(0)) != "[c1]" {
		t.Fatalf("client holds %d shards on %v, want 1 on [c1]", sink.Shards(), sink.Replicas(0))
	}
	enc, err := wire.EncodeFlush(columnar(w, 5))
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.Flush(ctx, "c1", enc); err != nil {
		t.Fatal(err)
	}
	if got := apexSum(t, db, w); got != 10 {
		t.Errorf("apex sum %v, want 10", got)
	}
}

// TestLocal: the in-process sink applies a flush once, whatever replica
// name it is given, and answers as the gRPC server does: InvalidArgument
// for a flush that does not decode or does not fit, which the aggregator
// gives up on, and Unavailable while the node is not ready, which it
// retries.
func TestLocal(t *testing.T) {
	s := schema.Default()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var unready atomic.Bool
	c, err := New(Options{Store: db, Schema: s, Ready: func() error {
		if unready.Load() {
			return errors.New("the store is opening")
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.Local("c1")
	if sink.Shards() != 1 || fmt.Sprint(sink.Replicas(0)) != "[c1]" {
		t.Fatalf("local sink holds %d shards on %v, want 1 on [c1]", sink.Shards(), sink.Replicas(0))
	}
	ctx := context.Background()
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	enc, err := wire.EncodeFlush(columnar(w, 1))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"c1", "an-earlier-name"} {
		if err := sink.Flush(ctx, name, enc); err != nil {
			t.Fatalf("flush to %s: %v", name, err)
		}
	}
	if got := apexSum(t, db, w); got != 5 {
		t.Errorf("apex sum %v, want 5: the flush applied once", got)
	}
	// A flush read back from a log has its bytes only; one built in this
	// process is applied from its request.
	logged, err := wire.DecodeFlush(slices.Clone(enc.Data))
	if err != nil || logged.Request != nil {
		t.Fatalf("a flush read back keeps request %v (%v), want none", logged.Request, err)
	}
	logged.Data = func() wire.Encoded { e, _ := wire.EncodeFlush(columnar(w, 4)); return e.Data }()
	if err := sink.Flush(ctx, "c1", logged); err != nil {
		t.Fatal(err)
	}
	built, err := wire.EncodeFlush(columnar(w, 5))
	if err != nil {
		t.Fatal(err)
	}
	built.Data = wire.Encoded{0xff, 0xff}
	if err := sink.Flush(ctx, "c1", built); err != nil {
		t.Fatalf("a flush built here, its bytes spoiled: %v, want it applied from its request", err)
	}
	if got := apexSum(t, db, w); got != 15 {
		t.Errorf("apex sum %v, want 15: three flushes of 5", got)
	}
	bad := columnar(w, 2)
	bad.Dict[0] = "nope"
	badEnc, err := wire.EncodeFlush(bad)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		f    *wire.Flush
		want codes.Code
	}{
		{"unknown family", badEnc, codes.InvalidArgument},
		{"bytes that do not decode", &wire.Flush{Data: wire.Encoded{0xff, 0xff}}, codes.InvalidArgument},
	} {
		if err := sink.Flush(ctx, "c1", tc.f); status.Code(err) != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	unready.Store(true)
	next, err := wire.EncodeFlush(columnar(w, 3))
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.Flush(ctx, "c1", next); status.Code(err) != codes.Unavailable {
		t.Errorf("while not ready: %v, want Unavailable", err)
	}
	unready.Store(false)
	if err := sink.Flush(ctx, "c1", next); err != nil {
		t.Fatal(err)
	}
	if got := apexSum(t, db, w); got != 20 {
		t.Errorf("apex sum %v, want 20: the refused flush applied on its retry", got)
	}
}

// TestFlushToOlderCombiner: a combiner that predates the columnar layout
// serves only Flush and reads only cells as messages, dropping the columns
// as fields it does not know. The client flushes to it by Flush with the
// cells as messages, so that nothing is lost during a rolling upgrade.
func TestFlushToOlderCombiner(t *testing.T) {
	c, db := newCombiner(t)
	conn := olderCombiner(t, c, "Flush", func(req *wirepb.FlushRequest) {
		req.CellFamilies, req.CellCuboids, req.CellValues, req.CellSums, req.CellCounts = nil, nil, nil, nil, nil
	})
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	enc, err := wire.EncodeFlush(columnar(w, 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := NewClient("old", conn, schema.Default()).Flush(context.Background(), "old", enc); err != nil {
		t.Fatal(err)
	}
	if got := apexSum(t, db, w); got != 5 {
		t.Errorf("the older combiner holds an apex sum of %v, want 5", got)
	}
	cells, err := db.Cells("requests", schema.Default().Family("requests").Finest().ID, nil)
	if err != nil || len(cells) != 1 || fmt.Sprint(cells[0].Values) != "[dc1 c1 h1 get 200]" {
		t.Errorf("the older combiner's finest cells: %v, %v", cells, err)
	}
}

// A flush logged with whole sums for the node's own combiner, sent to a
// combiner in another node (the node renamed, or its role gone), arrives
// with its sums as doubles: a combiner that predates cell_whole_sums drops
// it as a field it does not know, and would find no sums.
func TestWholeSumsToAnotherNode(t *testing.T) {
	for _, older := range []struct {
		name, method string
		forget       func(*wirepb.FlushRequest)
	}{
		{"before whole sums", "FlushColumns", func(req *wirepb.FlushRequest) { req.CellWholeSums = nil }},
		{"before columns", "Flush", func(req *wirepb.FlushRequest) {
			req.CellFamilies, req.CellCuboids, req.CellValues, req.CellSums, req.CellCounts, req.CellWholeSums = nil, nil, nil, nil, nil, nil
		}},
	} {
		t.Run(older.name, func(t *testing.T) {
			c, db := newCombiner(t)
			conn := olderCombiner(t, c, older.method, older.forget)
			w := time.Now().Truncate(10 * time.Second).UnixMilli()
			req := columnar(w, 1)
			wire.WholeSums(req)
			enc, err := wire.EncodeFlush(req)
			if err != nil {
				t.Fatal(err)
			}
			logged, err := wire.DecodeFlush(enc.Data) // as a restart reads it back
			if err != nil {
				t.Fatal(err)
			}
			if !logged.WholeSums {
				t.Fatal("the flush read back does not say it holds whole sums")
			}
			if err := NewClient("other", conn, schema.Default()).Flush(context.Background(), "other", logged); err != nil {
				t.Fatal(err)
			}
			if got := apexSum(t, db, w); got != 5 {
				t.Errorf("the other combiner holds an apex sum of %v, want 5", got)
			}
		})
	}
}

// olderCombiner serves c over loopback as a combiner of an older version
// would: only method, and without the fields forget drops from each
// request, as fields it does not know. It returns a connection to it,
// closed at the end of the test.
func olderCombiner(t *testing.T, c *Combiner, method string, forget func(*wirepb.FlushRequest)) *grpc.ClientConn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	srv.RegisterService(&grpc.ServiceDesc{
		ServiceName: "dimsum.wire.v1.Combiner",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: method, Handler: func(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req wirepb.FlushRequest
			if err := dec(&req); err != nil {
				return nil, err
			}
			forget(&req)
			dup, err := c.Apply(&req)
			return &wirepb.FlushResponse{Duplicate: dup}, err
		}}},
	}, struct{}{})
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestFlushSlots: while the store holds the flushes it is applying (a full
// head parks them; here Ready does), a further flush waits for a slot only
// until its caller gives up, and is then neither held nor applied, so that
// the aggregators' retries cannot pile up goroutines that hold their cells.
func TestFlushSlots(t *testing.T) {
	s := schema.Default()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	release := make(chan struct{})
	var entered atomic.Int32
	c, err := New(Options{Store: db, Schema: s, Ready: func() error {
		entered.Add(1)
		<-release
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// gaveUp is closed once the server is done with the flush whose caller
	// gave up: its deadline ends on the server a little after the client.
	gaveUp := make(chan struct{})
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if req.(*wirepb.FlushRequest).Sequence == 10 {
			close(gaveUp)
		}
		return resp, err
	}))
	c.Register(srv)
	go srv.Serve(ln)
	defer srv.Stop()
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := wirepb.NewCombinerClient(conn)
	w := time.Now().Truncate(10 * time.Second).UnixMilli()

	held := make(chan error, flushSlots)
	for seq := range uint64(flushSlots) {
		go func() {
			_, err := client.Flush(context.Background(), flush(w, seq+1))
			held <- err
		}()
	}
	for deadline := time.Now().Add(10 * time.Second); entered.Load() < flushSlots; {
		if time.Now().After(deadline) {
			t.Fatalf("%d flushes reached the store, want %d", entered.Load(), flushSlots)
		}
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := client.Flush(ctx, flush(w, 10)); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a flush while every slot is held: %v, want DeadlineExceeded", err)
	}
	select {
	case <-gaveUp:
	case <-time.After(30 * time.Second):
		t.Fatal("the server still holds the flush whose caller gave up")
	}
	close(release)
	for range flushSlots {
		if err := <-held; err != nil {
			t.Errorf("a held flush: %v", err)
		}
	}
	if got := entered.Load(); got != flushSlots {
		t.Errorf("%d flushes reached the store, want %d: the one whose caller gave up went on", got, flushSlots)
	}
	if got := apexSum(t, db, w); got != 5*flushSlots {
		t.Errorf("apex sum %v, want %v: only the held flushes are applied", got, 5*flushSlots)
	}
}

func FuzzApply(f *testing.F) {
	w := time.Now().Truncate(10 * time.Second).UnixMilli()
	for _, r := range []*wirepb.FlushRequest{flush(w, 0), columnar(w, 1), {Source: "x", Cells: []*wirepb.FlushCell{{Family: 3}}}} {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	c, _ := newCombiner(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req wirepb.FlushRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		if _, err := c.Apply(&req); err != nil && !errors.Is(err, ErrBadFlush) {
			t.Fatalf("unexpected error class: %v", err)
		}
	})
}

// TestDeltasAllocs pins the combiner's work a cell at zero allocations
// once its scratch has grown: it checks the cells of a columnar flush and
// hands them on with their dictionary indexes, sharded or not.
func TestDeltasAllocs(t *testing.T) {
	if race.Enabled {
		t.Skip("allocations differ under the race detector")
	}
	c, _ := newCombiner(t)
	for _, shards := range []int{1, 5} {
		req := backfillFlushes(schema.Default(), 600)[0]
		if shards > 1 {
			// Only the cells of one shard.
			var keep wirepb.FlushRequest
			req.Shards = uint32(shards)
			keep.Dict, keep.Shards = req.Dict, req.Shards
			_ = eachColumnCell(c.opts.Schema, req, func(i int, vals []uint32) error {
				var values []string
				for _, v := range vals {
					values = append(values, req.Dict[v])
				}
				if schema.Shard(req.Dict[req.CellFamilies[i]], schema.CuboidID(req.CellCuboids[i]), values, shards) == 0 {
					keep.CellFamilies = append(keep.CellFamilies, req.CellFamilies[i])
					keep.CellCuboids = append(keep.CellCuboids, req.CellCuboids[i])
					keep.CellValues = append(keep.CellValues, vals...)
					keep.CellSums = append(keep.CellSums, req.CellSums[i])
					keep.CellCounts = append(keep.CellCounts, req.CellCounts[i])
				}
				return nil
			})
			req = &keep
			req.Source = "agg/1"
		}
		sc := new(scratch)
		if _, err := c.deltas(req, sc); err != nil {
			t.Fatal(err)
		}
		sc.clear()
		allocs := testing.AllocsPerRun(20, func() {
			deltas, err := c.deltas(req, sc)
			if err != nil || len(deltas) != len(req.CellCounts) || len(deltas) == 0 {
				t.Fatalf("%d deltas of %d cells: %v", len(deltas), len(req.CellCounts), err)
			}
			sc.clear()
		})
		if allocs != 0 {
			t.Errorf("%d shards: %v allocations a flush of %d cells, want 0", shards, allocs, len(req.CellCounts))
		}
	}
}

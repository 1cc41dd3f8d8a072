package combiner

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// readWorld is a real store with 40 hosts' finest cells, one of them with
// five days of steps at 10s, served over gRPC on loopback.
type readWorld struct {
	db     *tsdb.DB
	client wirepb.ReadClient
	finest schema.Cuboid
	now    int64
}

func newReadWorld(t *testing.T) *readWorld {
	t.Helper()
	s := schema.Default()
	db, err := tsdb.Open(tsdb.Options{Dir: t.TempDir(), Schema: s, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	finest := s.Family("requests").Finest()
	now := time.Now().Truncate(time.Minute).UnixMilli()
	var deltas []tsdb.Delta
	for h := range 40 {
		deltas = append(deltas, tsdb.Delta{Family: "requests", Cuboid: finest.ID, Values: []string{"dc1", "c1", fmt.Sprintf("h%02d", h), "get", "200"}, Time: now - int64(h)*10_000, Sum: float64(h + 1), Count: 1})
	}
	for t0 := now - 5*24*time.Hour.Milliseconds(); t0 < now; t0 += 10_000 {
		deltas = append(deltas, tsdb.Delta{Family: "requests", Cuboid: finest.ID, Values: []string{"dc2", "c2", "busy", "get", "200"}, Time: t0, Sum: 1, Count: 1})
	}
	if _, err := db.Apply(tsdb.BatchID{}, deltas); err != nil {
		t.Fatal(err)
	}
	return &readWorld{db: db, client: serveRead(t, s, db), finest: finest, now: now}
}

// serveRead serves the read service over db on loopback until the test
// ends, and returns a client of it.
func serveRead(t *testing.T, s *schema.Schema, db *tsdb.DB) wirepb.ReadClient {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	NewReadServer(s, db).Register(srv)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return wirepb.NewReadClient(conn)
}

// recvAll reads a stream to its end, returning every message.
func recvAll[T any](s grpc.ServerStreamingClient[T]) ([]*T, error) {
	var out []*T
	for {
		m, err := s.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
}

func (w *readWorld) cells(t *testing.T, req *wirepb.CellsRequest) []*wirepb.ReadCell {
	t.Helper()
	stream, err := w.client.Cells(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := recvAll(stream)
	if err != nil {
		t.Fatal(err)
	}
	var out []*wirepb.ReadCell
	for _, c := range chunks {
		out = append(out, c.Cells...)
	}
	return out
}

// TestReadShards checks that the shards of a request partition the
// store's cells, and that labels follow the shards asked for.
func TestReadShards(t *testing.T) {
	w := newReadWorld(t)
	const shards = 4
	all := w.cells(t, &wirepb.CellsRequest{Family: "requests", Cuboid: uint32(w.finest.ID)})
	if len(all) != 41 {
		t.Fatalf("%d cells, want 41", len(all))
	}
	seen := map[uint32]int{}
	for s := range uint32(shards) {
		cells := w.cells(t, &wirepb.CellsRequest{Family: "requests", Cuboid: uint32(w.finest.ID), Shards: &wirepb.ShardSet{Count: shards, Shards: []uint32{s}}})
		var hosts []string
		for _, c := range cells {
			if got := schema.Shard("requests", w.finest.ID, c.Values, shards); got != s {
				t.Errorf("shard %d answers cell %v of shard %d", s, c.Values, got)
			}
			seen[c.Id]++
			hosts = append(hosts, c.Values[2])
		}
		slices.Sort(hosts)
		hosts = slices.Compact(hosts)
		resp, err := w.client.LabelValues(context.Background(), &wirepb.LabelsRequest{Family: "requests", Cuboid: uint32(w.finest.ID), Name: "host", MintMs: math.MinInt64, MaxtMs: math.MaxInt64, Shards: &wirepb.ShardSet{Count: shards, Shards: []uint32{s}}})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(resp.Values, hosts) {
			t.Errorf("shard %d: host values %q, want %q", s, resp.Values, hosts)
		}
	}
	if len(seen) != len(all) {
		t.Errorf("the shards hold %d cells, want %d", len(seen), len(all))
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("cell %d is in %d shards", id, n)
		}
	}
}

// TestReadScan checks that a scan streams what the store holds, a cell
// with more steps than one message holds going on in the next.
func TestReadScan(t *testing.T) {
	w := newReadWorld(t)
	all := w.cells(t, &wirepb.CellsRequest{Family: "requests", Cuboid: uint32(w.finest.ID)})
	ids := make([]uint32, len(all))
	for i, c := range all {
		ids[i] = c.Id
	}
	mint, maxt := w.now-6*24*time.Hour.Milliseconds(), w.now
	type cellSteps struct {
		id    uint32
		steps []tsdb.Step
	}
	var want []cellSteps
	err := w.db.Scan(0, "requests", w.finest.ID, ids, mint, maxt, func(id uint32, steps []tsdb.Step) error {
		want = append(want, cellSteps{id, slices.Clone(steps)})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	stream, err := w.client.Scan(context.Background(), &wirepb.ScanRequest{Family: "requests", Cuboid: uint32(w.finest.ID), CellIds: ids, MintMs: mint, MaxtMs: maxt})
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := recvAll(stream)
	if err != nil {
		t.Fatal(err)
	}
	if len(chunks) < 2 {
		t.Errorf("%d messages: the busy cell's %d steps should not fit one", len(chunks), 5*24*360)
	}
	var got []cellSteps
	for _, ch := range chunks {
		for _, c := range ch.Cells {
			if len(got) == 0 || got[len(got)-1].id != c.Id {
				got = append(got, cellSteps{id: c.Id})
			}
			last := &got[len(got)-1]
			for i := range c.StartsMs {
				last.steps = append(last.steps, tsdb.Step{T: c.StartsMs[i], Sum: c.Sums[i], Count: c.Counts[i]})
			}
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d cells, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i].id != want[i].id || !slices.Equal(got[i].steps, want[i].steps) {
			t.Errorf("cell %d: got %d steps of cell %d, want %d of cell %d", i, len(got[i].steps), got[i].id, len(want[i].steps), want[i].id)
		}
	}
}

// goneStream is a Scan stream whose reader has gone: its context is
// cancelled, and it counts what the server still sends it. Scan calls
// nothing else of it.
type goneStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent int
}

func (s *goneStream) Context() context.Context     { return s.ctx }
func (s *goneStream) Send(*wirepb.ScanChunk) error { s.sent++; return nil }

// TestReadScanStopsWhenReaderGone: a scan whose reader went away stops at
// the next cell with Canceled, rather than reading every cell it was
// asked for into a stream no one reads.
func TestReadScanStopsWhenReaderGone(t *testing.T) {
	w := newReadWorld(t)
	all := w.cells(t, &wirepb.CellsRequest{Family: "requests", Cuboid: uint32(w.finest.ID)})
	ids := make([]uint32, len(all))
	for i, c := range all {
		ids[i] = c.Id
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	stream := &goneStream{ctx: ctx}
	err := NewReadServer(schema.Default(), w.db).Scan(&wirepb.ScanRequest{Family: "requests", Cuboid: uint32(w.finest.ID), CellIds: ids, MintMs: w.now - 6*24*time.Hour.Milliseconds(), MaxtMs: w.now}, stream)
	if status.Code(err) != codes.Canceled || stream.sent != 0 {
		t.Errorf("a scan for a reader that is gone: %v after %d messages, want Canceled before any", err, stream.sent)
	}
}

// TestReadInvalid sends malformed requests: each gets InvalidArgument and
// a message that says what is wrong.
func TestReadInvalid(t *testing.T) {
	w := newReadWorld(t)
	cub := uint32(w.finest.ID)
	m := func(typ wirepb.MatchType, name, value string) []*wirepb.Matcher {
		return []*wirepb.Matcher{{Type: typ, Name: name, Value: value}}
	}
	cells := func(req *wirepb.CellsRequest) error {
		s, err := w.client.Cells(context.Background(), req)
		if err == nil {
			_, err = recvAll(s)
		}
		return err
	}
	scan := func(req *wirepb.ScanRequest) error {
		s, err := w.client.Scan(context.Background(), req)
		if err == nil {
			_, err = recvAll(s)
		}
		return err
	}
	values := func(req *wirepb.LabelsRequest) error {
		_, err := w.client.LabelValues(context.Background(), req)
		return err
	}
	tooMany := make([]uint32, MaxScanCells+1)
	for _, c := range []struct {
		name string
		err  error
		want string
	}{
		{"unknown family", cells(&wirepb.CellsRequest{Family: "nope", Cuboid: cub}), `unknown family "nope"`},
		{"bad cuboid", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: 9999}), `family "requests" has no cuboid 9999`},
		{"huge cuboid", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: 1 << 20}), `has no cuboid 1048576`},
		{"bad regexp", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Matchers: m(wirepb.MatchType_MATCH_TYPE_REGEXP, "host", "(")}), `matcher 0 on "host": bad regular expression "("`},
		{"unknown match type", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Matchers: m(9, "host", "x")}), `unknown type 9`},
		{"nameless matcher", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Matchers: m(0, "", "x")}), `matcher 0 has no label name`},
		{"shard out of range", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Shards: &wirepb.ShardSet{Count: 8, Shards: []uint32{8}}}), `shard 8 is out of range: the cube has 8 shards`},
		{"shard of an unsplit cube", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Shards: &wirepb.ShardSet{Count: 1, Shards: []uint32{3}}}), `shard 3 is out of range: the cube is not split`},
		{"shard twice", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Shards: &wirepb.ShardSet{Count: 8, Shards: []uint32{2, 2}}}), `shard 2 is listed twice`},
		{"too many shards", cells(&wirepb.CellsRequest{Family: "requests", Cuboid: cub, Shards: &wirepb.ShardSet{Count: MaxShards + 1}}), `shard count 65537 is above the limit of 65536`},
		{"scan resolution", scan(&wirepb.ScanRequest{Family: "requests", Cuboid: cub, Resolution: 3, CellIds: []uint32{0}}), `resolution 3 is out of range: the schema has 3`},
		{"scan family", scan(&wirepb.ScanRequest{Family: "nope", Cuboid: cub, CellIds: []uint32{0}}), `unknown family "nope"`},
		{"too many cell IDs", scan(&wirepb.ScanRequest{Family: "requests", Cuboid: cub, CellIds: tooMany}), `1048577 cell IDs, more than the 1048576 one scan may list`},
		{"label values without a name", values(&wirepb.LabelsRequest{Family: "requests", Cuboid: cub}), `no label name`},
		{"labels backwards", values(&wirepb.LabelsRequest{Family: "requests", Cuboid: cub, Name: "host", MintMs: 10, MaxtMs: 5}), `mint 10 is after maxt 5`},
		{"labels bad regexp", values(&wirepb.LabelsRequest{Family: "requests", Cuboid: cub, Name: "host", Matchers: m(wirepb.MatchType_MATCH_TYPE_NOT_REGEXP, "host", "a[")}), `bad regular expression "a["`},
	} {
		t.Run(c.name, func(t *testing.T) {
			if status.Code(c.err) != codes.InvalidArgument || !strings.Contains(status.Convert(c.err).Message(), c.want) {
				t.Errorf("got %v, want InvalidArgument with %q", c.err, c.want)
			}
		})
	}
}

package fanout

import (
	"io"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// replay is a received stream of messages, as a replica might send them.
type replay[T any] struct {
	grpc.ClientStream
	msgs []*T
}

func (r *replay[T]) Recv() (*T, error) {
	if len(r.msgs) == 0 {
		return nil, io.EOF
	}
	m := r.msgs[0]
	r.msgs = r.msgs[1:]
	return m, nil
}

// FuzzReadScan sends arbitrary Scan streams, two messages of any bytes, to
// the decoder of a replica's answer: it must accept only what makes sense
// and never panic.
func FuzzReadScan(f *testing.F) {
	ok, _ := proto.Marshal(&wirepb.ScanChunk{Cells: []*wirepb.ScanCell{{Id: 1, StartsMs: []int64{10, 20}, Sums: []float64{1, 2}, Counts: []uint64{1, 1}}}})
	more, _ := proto.Marshal(&wirepb.ScanChunk{Cells: []*wirepb.ScanCell{{Id: 1, StartsMs: []int64{30}, Sums: []float64{3}, Counts: []uint64{1}}, {Id: 5, StartsMs: []int64{10}, Sums: []float64{1}, Counts: []uint64{2}}}})
	f.Add(ok, more)
	f.Add(more, ok)
	f.Add([]byte{0x0a, 0x02, 0x08}, []byte{})
	f.Fuzz(func(t *testing.T, a, b []byte) {
		var msgs []*wirepb.ScanChunk
		for _, raw := range [][]byte{a, b} {
			var c wirepb.ScanChunk
			if proto.Unmarshal(raw, &c) != nil {
				return
			}
			msgs = append(msgs, &c)
		}
		asked := map[uint32]uint32{1: 100, 5: 200, 7: 300}
		const mint, maxt = 0, 1000
		var part scanPart
		if readScan(&part, &replay[wirepb.ScanChunk]{msgs: msgs}, asked, mint, maxt) != nil {
			return
		}
		for i, c := range part.cells {
			if i > 0 && c.id <= part.cells[i-1].id {
				t.Fatalf("cell %d after %d", c.id, part.cells[i-1].id)
			}
			if c.from >= c.to || c.to > len(part.steps) {
				t.Fatalf("cell %d: steps [%d, %d) of %d", c.id, c.from, c.to, len(part.steps))
			}
			prev := int64(mint - 1)
			for _, s := range part.steps[c.from:c.to] {
				if s.T <= prev || s.T > maxt {
					t.Fatalf("cell %d: step at %d after %d", c.id, s.T, prev)
				}
				prev = s.T
			}
		}
	})
}

// FuzzReadCells sends arbitrary Cells streams to the decoder of a
// replica's answer: every cell it accepts fits the cuboid, lies in a shard
// asked for, and has a view ID of its own.
func FuzzReadCells(f *testing.F) {
	s := schema.Default()
	cub := s.Family("requests").Finest()
	ok, _ := proto.Marshal(&wirepb.CellsChunk{Cells: []*wirepb.ReadCell{{Id: 3, Values: []string{"dc1", "c1", "h1", "get", "200"}}}})
	f.Add(ok)
	f.Add([]byte{0x0a, 0x03, 0x08, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, raw []byte) {
		var c wirepb.CellsChunk
		if proto.Unmarshal(raw, &c) != nil {
			return
		}
		v := &view{r: &Reader{opts: Options{Schema: s}}, shards: 8, localBits: 29}
		cells, err := v.readCells(&replay[wirepb.CellsChunk]{msgs: []*wirepb.CellsChunk{&c}}, "requests", cub, []int{0, 1, 2, 3, 4, 5, 6, 7})
		if err != nil {
			return
		}
		seen := map[uint32]bool{}
		for _, cell := range cells {
			if len(cell.Values) != len(cub.Labels) || seen[cell.ID] {
				t.Fatalf("accepted cell %d %q", cell.ID, cell.Values)
			}
			seen[cell.ID] = true
			if sh, _ := v.split(cell.ID); uint32(sh) != schema.Shard("requests", cub.ID, cell.Values, 8) {
				t.Fatalf("cell %q in view shard %d", cell.Values, sh)
			}
		}
	})
}

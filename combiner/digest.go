package combiner

import (
	"context"
	"encoding/binary"
	"hash/fnv"

	"google.golang.org/grpc/status"

	"github.com/dimsum/dimsum/internal/encoding"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// Digest sums up what the listed shards hold over the request's range at
// its resolution, shard by shard: the cells with a step in the range, those
// steps, and the sum of a hash of each step. Two replicas of a shard that
// hold the same data give the same digest, whatever the order they applied
// it in and the IDs their stores gave its cells. A step's hash covers its
// family, cuboid, label values, start and count, not its sum: replicas that
// added the same fractional values in another order may hold sums that
// differ in their last bits (or that are whole at one only), and every
// event a replica lacks is missing from a count.
func (r *ReadServer) Digest(ctx context.Context, req *wirepb.DigestRequest) (*wirepb.DigestResponse, error) {
	if int(req.Resolution) >= len(r.schema.Resolutions) {
		return nil, invalid("resolution %d is out of range: the schema has %d", req.Resolution, len(r.schema.Resolutions))
	}
	if req.MintMs > req.MaxtMs {
		return nil, invalid("mint %d is after maxt %d", req.MintMs, req.MaxtMs)
	}
	if len(req.Shards.GetShards()) == 0 {
		return nil, invalid("no shard listed")
	}
	if _, err := shards(req.Shards); err != nil {
		return nil, err
	}
	count := max(int(req.Shards.Count), 1)
	resp := &wirepb.DigestResponse{}
	of := map[uint32]*wirepb.ShardDigest{}
	for _, s := range req.Shards.Shards {
		d := &wirepb.ShardDigest{Shard: s}
		resp.Shards = append(resp.Shards, d)
		of[s] = d
	}
	var buf []byte
	h := fnv.New64a()
	for _, f := range r.schema.Families {
		for _, c := range f.Cuboids() {
			cells, err := r.store.Cells(f.Name, c.ID, nil)
			if err != nil {
				return nil, storeError(err)
			}
			type digested struct {
				values []string
				d      *wirepb.ShardDigest
			}
			var ids []uint32
			cellOf := map[uint32]digested{}
			for _, cell := range cells {
				if d := of[schema.Shard(f.Name, c.ID, cell.Values, count)]; d != nil {
					ids = append(ids, cell.ID)
					cellOf[cell.ID] = digested{cell.Values, d}
				}
			}
			if len(ids) == 0 {
				continue
			}
			err = r.store.Scan(int(req.Resolution), f.Name, c.ID, ids, req.MintMs, req.MaxtMs, func(id uint32, steps []tsdb.Step) error {
				if err := ctx.Err(); err != nil {
					return status.FromContextError(err).Err() // the caller is gone
				}
				cell := cellOf[id]
				cell.d.Cells++
				for _, st := range steps {
					buf = appendStepRecord(buf[:0], f.Name, c.ID, cell.values, st)
					h.Reset()
					h.Write(buf)
					cell.d.Steps++
					cell.d.Sum += h.Sum64()
				}
				return nil
			})
			if err != nil {
				if _, ok := status.FromError(err); ok {
					return nil, err
				}
				return nil, storeError(err)
			}
		}
	}
	return resp, nil
}

// appendStepRecord appends what a step's digest hash covers: its family,
// cuboid and values as length-prefixed strings and a uvarint, its start and
// its count.
func appendStepRecord(dst []byte, family string, cuboid schema.CuboidID, values []string, st tsdb.Step) []byte {
	dst = encoding.AppendString(dst, family)
	dst = binary.AppendUvarint(dst, uint64(cuboid))
	for _, v := range values {
		dst = encoding.AppendString(dst, v)
	}
	dst = binary.AppendVarint(dst, st.T)
	return binary.AppendUvarint(dst, st.Count)
}

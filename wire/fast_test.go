package wire

import (
	"bytes"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/wire/wirepb"
)

func randomPush(rng *rand.Rand) *wirepb.PushRequest {
	m := &wirepb.PushRequest{Source: "pub-" + string(rune('a'+rng.IntN(26))), BatchSeq: rng.Uint64N(1 << 40), ReceivedMs: rng.Int64() - math.MaxInt64/2}
	for range rng.IntN(20) {
		m.Dict = append(m.Dict, string([]rune{'é', rune('a' + rng.IntN(26))}))
	}
	for range rng.IntN(50) {
		e := &wirepb.Event{Family: rng.Uint32N(300), TimestampMs: rng.Int64N(1<<45) - 1<<44, Value: rng.Float64() * 1e6}
		switch rng.IntN(8) {
		case 0:
			e.Value = math.Copysign(0, -1)
		case 1:
			e.Value, e.Family, e.TimestampMs = 0, 0, 0
		}
		for range rng.IntN(12) {
			e.Labels = append(e.Labels, rng.Uint32())
		}
		m.Events = append(m.Events, e)
	}
	return m
}

// TestUnmarshalPush decodes random pushes by the fast path, which must take
// them (no fallback) and give what proto gives, and encodes them as proto
// does, byte for byte.
func TestUnmarshalPush(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		push := randomPush(rng)
		b, err := proto.Marshal(push)
		if err != nil {
			t.Fatal(err)
		}
		var got wirepb.PushRequest
		if !decodePush(b, &got, nil) {
			t.Fatalf("the fast path refused a push proto wrote")
		}
		if !proto.Equal(&got, push) {
			t.Fatalf("push decoded as %v, want %v", &got, push)
		}
		enc, err := marshalPush(push)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(enc, b) {
			t.Fatalf("push encoded as %x, proto encodes %x", enc, b)
		}
	}
}

// TestUnmarshalPushReuse decodes random pushes one after the other into one
// request, as the aggregator's Ingest service does: each must decode as
// proto decodes it, whatever the request held before, and a request that
// held as many events before takes no allocation for them.
func TestUnmarshalPushReuse(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	var m wirepb.PushRequest
	for i := range 500 {
		push := randomPush(rng)
		b, err := proto.Marshal(push)
		if err != nil {
			t.Fatal(err)
		}
		if err := UnmarshalPush(b, &m); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&m, push) {
			t.Fatalf("push %d decoded as %v, want %v", i, &m, push)
		}
		// An event's labels are its own: appending to them changes no
		// other event.
		if len(m.Events) > 1 {
			second := slices.Clone(m.Events[1].Labels)
			_ = append(m.Events[0].Labels, 1, 2, 3)
			if !slices.Equal(m.Events[1].Labels, second) {
				t.Fatalf("push %d: appending to the first event's labels changed the second's to %v", i, m.Events[1].Labels)
			}
		}
	}
	push := benchPush()
	b, err := proto.Marshal(push)
	if err != nil {
		t.Fatal(err)
	}
	if err := UnmarshalPush(b, &m); err != nil {
		t.Fatal(err)
	}
	// The source's string is all a batch without a dictionary allocates.
	if n := testing.AllocsPerRun(10, func() {
		if err := UnmarshalPush(b, &m); err != nil {
			t.Fatal(err)
		}
	}); n > 1 {
		t.Errorf("decoding %d events into a request that held as many took %v allocations, want 1", len(push.Events), n)
	}
	if !proto.Equal(&m, push) {
		t.Fatal("the reused request does not hold the batch")
	}
}

// TestUnmarshalPushFallBack feeds the decoder what the fast path leaves to
// proto, and what it takes that proto's writer never writes: the result is
// proto's either way.
func TestUnmarshalPushFallBack(t *testing.T) {
	// An event's labels unpacked, one varint each: the fast path takes
	// them.
	var ev []byte
	ev = protowire.AppendTag(ev, 1, protowire.VarintType)
	ev = protowire.AppendVarint(ev, 2)
	for _, l := range []uint64{3, 4, 1 << 33} {
		ev = protowire.AppendTag(ev, 3, protowire.VarintType)
		ev = protowire.AppendVarint(ev, l)
	}
	var unpacked []byte
	unpacked = protowire.AppendTag(unpacked, 2, protowire.BytesType)
	unpacked = protowire.AppendBytes(unpacked, ev)
	var fast wirepb.PushRequest
	if !decodePush(unpacked, &fast, nil) {
		t.Error("the fast path refused unpacked labels")
	}
	// An unknown field, kept by proto; invalid UTF-8; another message; a
	// truncated one.
	unknown := protowire.AppendTag(append([]byte(nil), unpacked...), 99, protowire.VarintType)
	unknown = protowire.AppendVarint(unknown, 7)
	badUTF8 := protowire.AppendTag(nil, 1, protowire.BytesType)
	badUTF8 = protowire.AppendBytes(badUTF8, []byte{0xff, 0xfe})
	flush, err := proto.Marshal(&wirepb.FlushRequest{Source: "s", Cells: []*wirepb.FlushCell{{Family: 1, Values: []uint32{2}, Sum: 3, Count: 4}}})
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"unpacked": unpacked, "unknown field": unknown, "invalid UTF-8": badUTF8, "a flush": flush, "truncated": unpacked[:len(unpacked)-1]} {
		checkPush(t, name, b)
	}
}

func checkPush(t *testing.T, name string, b []byte) {
	t.Helper()
	var got, want wirepb.PushRequest
	gotErr, wantErr := UnmarshalPush(b, &got), proto.Unmarshal(b, &want)
	if (gotErr == nil) != (wantErr == nil) || wantErr == nil && !proto.Equal(&got, &want) {
		t.Errorf("%s: push decoded as %v, %v; proto gives %v, %v", name, &got, gotErr, &want, wantErr)
	}
}

// FuzzUnmarshalPush checks that any input decodes as proto decodes it.
func FuzzUnmarshalPush(f *testing.F) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 4 {
		b, _ := proto.Marshal(randomPush(rng))
		f.Add(b)
	}
	// A request that held 64 events: most inputs decode into its room.
	used := benchPush()
	used.Events = used.Events[:64]
	f0, err := proto.Marshal(used)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkPush(t, "fuzzed", b)
		// Into a request that held a batch before, too.
		var m wirepb.PushRequest
		if err := UnmarshalPush(f0, &m); err != nil {
			t.Fatal(err)
		}
		var want wirepb.PushRequest
		gotErr, wantErr := UnmarshalPush(b, &m), proto.Unmarshal(b, &want)
		if (gotErr == nil) != (wantErr == nil) || wantErr == nil && !proto.Equal(&m, &want) {
			t.Errorf("push decoded into a used request as %v, %v; proto gives %v, %v", &m, gotErr, &want, wantErr)
		}
	})
}

// benchPush is a batch of 5,000 events of ten labels.
func benchPush() *wirepb.PushRequest {
	rng := rand.New(rand.NewPCG(7, 8))
	m := &wirepb.PushRequest{Source: "pub", BatchSeq: 1}
	for range 5000 {
		e := &wirepb.Event{Family: 0, TimestampMs: 1_700_000_000_000 + rng.Int64N(60_000), Value: float64(rng.IntN(20))}
		for range 10 {
			e.Labels = append(e.Labels, rng.Uint32N(200))
		}
		m.Events = append(m.Events, e)
	}
	return m
}

// BenchmarkMarshalPush encodes benchPush by the fast path and by proto.
func BenchmarkMarshalPush(b *testing.B) {
	m := benchPush()
	for _, c := range []struct {
		name string
		fn   func(*wirepb.PushRequest) ([]byte, error)
	}{{"fast", marshalPush}, {"proto", func(m *wirepb.PushRequest) ([]byte, error) { return proto.Marshal(m) }}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.fn(m); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(m.Events)), "ns/event")
		})
	}
}

// BenchmarkUnmarshalPush decodes benchPush by the fast path, into a new
// request or one that held it before, and by proto.
func BenchmarkUnmarshalPush(b *testing.B) {
	m := benchPush()
	data, err := proto.Marshal(m)
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		fn    func([]byte, *wirepb.PushRequest) error
		reuse bool
	}{{"fast", UnmarshalPush, false}, {"fast/reused", UnmarshalPush, true}, {"proto", func(b []byte, m *wirepb.PushRequest) error { return proto.Unmarshal(b, m) }, false}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			var got wirepb.PushRequest
			for b.Loop() {
				if !c.reuse {
					got = wirepb.PushRequest{}
				}
				if err := c.fn(data, &got); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(m.Events)), "ns/event")
		})
	}
}

// benchFlush is a flush of 5,000 cells as an aggregator builds them.
func benchFlush() *wirepb.FlushRequest {
	rng := rand.New(rand.NewPCG(3, 3))
	m := &wirepb.FlushRequest{Source: "node-1/1780000000000", WindowStartMs: 1780000000000, Sequence: 1234, Numbering: 7}
	for i := range 300 {
		m.Dict = append(m.Dict, fmt.Sprintf("value-%d", i))
	}
	for range 5000 {
		c := rng.Uint32N(16)
		m.CellFamilies = append(m.CellFamilies, 0)
		m.CellCuboids = append(m.CellCuboids, c)
		for range bits.OnesCount32(c) + 1 {
			m.CellValues = append(m.CellValues, rng.Uint32N(300))
		}
		m.CellNumbers = append(m.CellNumbers, rng.Uint32N(200000))
		m.CellCounts = append(m.CellCounts, 1+rng.Uint64N(3))
		m.CellSums = append(m.CellSums, float64(1+rng.IntN(20)))
	}
	return m
}

func BenchmarkMarshalFlush(b *testing.B) {
	for _, whole := range []bool{false, true} {
		m := benchFlush()
		if whole {
			WholeSums(m)
		}
		for _, c := range []struct {
			name string
			fn   func(*wirepb.FlushRequest) ([]byte, error)
		}{{"fast", marshalFlush}, {"proto", func(m *wirepb.FlushRequest) ([]byte, error) { return proto.Marshal(m) }}} {
			b.Run(fmt.Sprintf("whole=%v/%s", whole, c.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if _, err := c.fn(m); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(m.CellCounts)), "ns/cell")
			})
		}
	}
}

// randomFlush is a flush in the columnar layout with every field present or
// not and values of every width.
func randomFlush(rng *rand.Rand) *wirepb.FlushRequest {
	u32 := func() uint32 { return uint32(rng.Uint64() >> rng.UintN(33)) }
	u64 := func() uint64 { return rng.Uint64() >> rng.UintN(65) }
	m := &wirepb.FlushRequest{}
	if rng.IntN(4) > 0 {
		m.Source = fmt.Sprintf("node-%d", rng.IntN(1000))
	}
	if rng.IntN(4) > 0 {
		m.WindowStartMs = rng.Int64() - math.MaxInt64/2
	}
	m.Sequence, m.Shard, m.Shards, m.Numbering = u64(), u32(), u32(), u64()
	for range rng.IntN(5) {
		m.Dict = append(m.Dict, fmt.Sprintf("v%d", rng.IntN(100)))
	}
	n := rng.IntN(40)
	for range n {
		m.CellFamilies = append(m.CellFamilies, u32())
		m.CellCuboids = append(m.CellCuboids, u32())
		m.CellCounts = append(m.CellCounts, u64())
		for range rng.IntN(4) {
			m.CellValues = append(m.CellValues, u32())
		}
	}
	switch rng.IntN(3) {
	case 0:
		for range n {
			m.CellSums = append(m.CellSums, rng.NormFloat64()*1e6)
		}
	case 1:
		for range n {
			m.CellWholeSums = append(m.CellWholeSums, u64())
		}
	}
	if rng.IntN(2) == 0 {
		for range n {
			m.CellNumbers = append(m.CellNumbers, u32())
		}
	}
	return m
}

// TestMarshalFlush: marshalFlush encodes a flush as proto does, byte for
// byte, and leaves to proto a flush with cells as messages or unknown
// fields.
func TestMarshalFlush(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 5))
	check := func(m *wirepb.FlushRequest) {
		t.Helper()
		want, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := marshalFlush(m)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("flush %v encoded as %x, proto encodes %x", m, got, want)
		}
	}
	for range 2000 {
		check(randomFlush(rng))
	}
	check(&wirepb.FlushRequest{})
	check(&wirepb.FlushRequest{Dict: []string{"", "é"}, Source: "nœud", WindowStartMs: -1})
	big := randomFlush(rng)
	big.CellValues = make([]uint32, 1<<21) // a length prefix of four bytes
	check(big)
	if enc, _ := marshalFlush(big); cap(enc) > len(enc)+len(enc)/8 {
		t.Errorf("a flush of %d bytes holds %d", len(enc), cap(enc))
	}
	withCells := randomFlush(rng)
	withCells.Cells = []*wirepb.FlushCell{{Family: 1, Values: []uint32{2, 3}, Sum: 4, Count: 5}}
	check(withCells)
	unknown := randomFlush(rng)
	unknown.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 99, protowire.VarintType), 7))
	check(unknown)
	// A string that is not UTF-8: proto refuses it, and so does the fast
	// path, through proto.
	bad := randomFlush(rng)
	bad.Dict = append(bad.Dict, "\xff")
	if _, err := marshalFlush(bad); err == nil {
		t.Error("a dictionary string that is not UTF-8 marshalled")
	}
	bad = randomFlush(rng)
	bad.Source = "\xff"
	if _, err := marshalFlush(bad); err == nil {
		t.Error("a source that is not UTF-8 marshalled")
	}
}

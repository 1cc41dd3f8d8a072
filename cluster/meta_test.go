package cluster

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// sameMeta compares metas field by field: Started by instant, and nil
// slices equal to empty ones.
func sameMeta(a, b Meta) bool {
	return slices.Equal(a.Roles, b.Roles) && a.GRPCAddr == b.GRPCAddr && a.HTTPAddr == b.HTTPAddr &&
		a.Started.Equal(b.Started) && slices.Equal(a.PendingHandoff, b.PendingHandoff) &&
		slices.Equal(a.PendingForward, b.PendingForward) && slices.Equal(a.Lacking, b.Lacking) && a.Leaving == b.Leaving
}

func TestMetaRoundTrip(t *testing.T) {
	for name, m := range map[string]Meta{
		"zero": {},
		"aggregator": {
			Roles: []Role{RoleAggregator}, GRPCAddr: "10.0.0.7:9090", HTTPAddr: "10.0.0.7:9091",
			Started: time.Unix(1_760_000_000, 123_456_789), PendingHandoff: []string{"comb-2", "comb-5"},
		},
		"forwards": {
			Roles: []Role{RoleAggregator, RoleCombiner}, GRPCAddr: "10.0.0.7:9090",
			PendingHandoff: []string{"n1", "n3", "n4"}, PendingForward: []string{"n4", "n1"},
		},
		"all-roles": {
			Roles: []Role{RoleAggregator, RoleCombiner, RoleQuery}, GRPCAddr: "[::1]:9090",
			Started: time.Unix(0, 1), Leaving: true,
		},
		"before-1970": {Roles: []Role{RoleQuery}, Started: time.Unix(-5, 0)},
		"lacking":     {Roles: []Role{RoleCombiner}, GRPCAddr: "10.0.0.8:9090", Lacking: []uint32{0, 7, 8, 200, 255}},
		"lacking and forwards": {
			Roles: []Role{RoleAggregator, RoleCombiner}, PendingHandoff: []string{"n1"}, PendingForward: []string{"n1"}, Lacking: []uint32{3},
		},
	} {
		t.Run(name, func(t *testing.T) {
			b, err := m.encode()
			if err != nil {
				t.Fatal(err)
			}
			got, err := DecodeMeta(b)
			if err != nil {
				t.Fatalf("DecodeMeta(%x): %v", b, err)
			}
			if !sameMeta(got, m) {
				t.Errorf("round trip of %v gave %v", m, got)
			}
		})
	}
}

// TestMetaRolesOrder checks that roles decode in role order whatever order
// they were given in, so two nodes gossip the same bytes for the same set.
func TestMetaRolesOrder(t *testing.T) {
	a, _ := AppendMeta(nil, &Meta{Roles: []Role{RoleQuery, RoleAggregator}})
	b, _ := AppendMeta(nil, &Meta{Roles: []Role{RoleAggregator, RoleQuery}})
	if string(a) != string(b) {
		t.Errorf("role order changes the encoding: %x vs %x", a, b)
	}
}

func TestMetaInvalid(t *testing.T) {
	for _, c := range []struct {
		meta Meta
		want string
	}{
		{Meta{Roles: []Role{"storage"}}, `unknown role "storage"`},
		{Meta{Roles: []Role{RoleCombiner, RoleCombiner}}, `role "combiner" listed twice`},
		{Meta{GRPCAddr: "10.0.0.1"}, `GRPCAddr: address "10.0.0.1" is not host:port`},
		{Meta{HTTPAddr: "h:http"}, `HTTPAddr: address "h:http" has port "http", want a number in 0..65535`},
		{Meta{PendingHandoff: []string{"a", ""}}, `PendingHandoff[1] is empty`},
		{Meta{PendingHandoff: []string{"a"}, PendingForward: []string{"b"}}, `PendingForward[0] "b" is not in PendingHandoff`},
		{Meta{PendingHandoff: []string{"a"}, PendingForward: []string{"a", "a"}}, `PendingForward[1] "a" listed twice`},
	} {
		_, err := c.meta.encode()
		if !errors.Is(err, ErrMeta) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("encode(%v) = %v, want ErrMeta saying %s", c.meta, err, c.want)
		}
	}
}

func TestMetaTooLarge(t *testing.T) {
	m := Meta{Roles: []Role{RoleAggregator}, GRPCAddr: "10.0.0.7:9090"}
	for i := 0; ; i++ {
		m.PendingHandoff = append(m.PendingHandoff, fmt.Sprintf("combiner-%03d", i))
		b, err := m.encode()
		if err == nil {
			if len(b) > MetaMaxSize {
				t.Fatalf("%d bytes accepted, over %d", len(b), MetaMaxSize)
			}
			continue
		}
		if !errors.Is(err, ErrMetaTooLarge) {
			t.Fatalf("got %v, want ErrMetaTooLarge", err)
		}
		raw, _ := AppendMeta(nil, &m)
		want := fmt.Sprintf("cluster: meta too large: %d bytes encoded, memberlist allows 512 (%d pending handoff names", len(raw), len(m.PendingHandoff))
		if !strings.HasPrefix(err.Error(), want) {
			t.Errorf("error %q, want it to start with %q", err, want)
		}
		if len(raw) <= MetaMaxSize {
			t.Errorf("refused %d bytes, within %d", len(raw), MetaMaxSize)
		}
		return
	}
}

func TestDecodeMetaCorrupt(t *testing.T) {
	good, _ := AppendMeta(nil, &Meta{Roles: []Role{RoleCombiner}, GRPCAddr: "h:1", PendingHandoff: []string{"x"}})
	for _, c := range []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "at byte 0: truncated"},
		{"version-0", []byte{0, 0, 0, 0, 0, 0, 0}, "version 0"},
		{"truncated", good[:len(good)-1], "1 pending handoff names in 1 bytes"},
		{"short-string", []byte{1, 0, 5, 'a'}, "at byte 3: string of 5 bytes, 1 left"},
		{"trailing", append(slices.Clone(good), 0), "1 bytes after the last field"},
		{"bad-uvarint", []byte{1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, "bad uvarint"},
		{"handoff-count", []byte{1, 0, 0, 0, 0, 0, 0x80, 0x80, 0x04}, "65536 pending handoff names in 0 bytes"},
		{"empty-handoff-name", []byte{1, 0, 0, 0, 0, 0, 2, 0, 2, 'a', 'b'}, "PendingHandoff[0] is empty"},
		{"bad-address", []byte{1, 0, 3, 'a', 'b', 'c', 0, 0, 0, 0}, `GRPCAddr: address "abc" is not host:port`},
		{"forward-count", []byte{2, 0, 0, 0, 0, 0, 1, 1, 'a', 3, 0}, "3 forward indexes in 1 bytes"},
		{"forward-index", []byte{2, 0, 0, 0, 0, 0, 1, 1, 'a', 1, 1}, "forward index 1 of 1 pending handoff names"},
		{"forward-twice", []byte{2, 0, 0, 0, 0, 0, 1, 1, 'a', 2, 0, 0}, `PendingForward[1] "a" listed twice`},
		{"forward-trailing", []byte{2, 0, 0, 0, 0, 0, 1, 1, 'a', 1, 0, 0}, "1 bytes after the last field"},
		{"lacking-past-end", []byte{3, 0, 0, 0, 0, 0, 0, 0, 5, 1}, "5 bytes of shards lacking in 1 bytes"},
		{"lacking-trailing", []byte{3, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0}, "1 bytes after the last field"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := DecodeMeta(c.b)
			if !errors.Is(err, ErrCorruptMeta) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("DecodeMeta(%x) = %v, want ErrCorruptMeta saying %s", c.b, err, c.want)
			}
		})
	}
}

// TestMetaVersion1WithoutForwards checks that a Meta with no forwards
// waiting encodes as version 1 did, so that nodes of the version before
// read it, and that a version 1 encoding still decodes.
func TestMetaVersion1WithoutForwards(t *testing.T) {
	m := Meta{Roles: []Role{RoleAggregator}, GRPCAddr: "h:1", PendingHandoff: []string{"x"}}
	b, _ := AppendMeta(nil, &m)
	want := []byte{1, 1, 3, 'h', ':', '1', 0, 0, 0, 1, 1, 'x'}
	if string(b) != string(want) {
		t.Errorf("encoded %x, want version 1's %x", b, want)
	}
	m.PendingForward = []string{"x"}
	b, _ = AppendMeta(nil, &m)
	if b[0] != 2 || string(b[len(b)-2:]) != "\x01\x00" {
		t.Errorf("with a forward: %x, want version 2 ending with one index, 0", b)
	}
	m.PendingForward, m.Lacking = nil, []uint32{5}
	b, _ = AppendMeta(nil, &m)
	if b[0] != 3 || string(b[len(b)-3:]) != "\x00\x01\x20" {
		t.Errorf("with a shard lacking: %x, want version 3 ending with no forward, one byte of bitmap, bit 5", b)
	}
}

// TestDecodeMetaLaterVersion checks that a node reads the meta of a later
// version, which may append fields and use role and flag bits it does not
// know.
func TestDecodeMetaLaterVersion(t *testing.T) {
	m := Meta{Roles: []Role{RoleAggregator}, HTTPAddr: "q:80", PendingHandoff: []string{"a"}, PendingForward: []string{"a"}, Lacking: []uint32{2}, Leaving: true}
	b, _ := AppendMeta(nil, &m)
	b[0] = metaVersion + 1
	b[1] |= 1 << 7 // a role this version does not know
	// The flags follow the version, the roles, the empty gRPC address, the
	// HTTP address and a zero start.
	flags := 1 + 1 + 1 + 1 + len(m.HTTPAddr) + 1
	b[flags] |= 1 << 5 // a flag this version does not know
	b = append(b, 0xaa, 0xbb)
	got, err := DecodeMeta(b)
	if err != nil {
		t.Fatal(err)
	}
	if !sameMeta(got, m) {
		t.Errorf("decoded %v, want %v", got, m)
	}
}

// FuzzDecodeMeta feeds DecodeMeta arbitrary bytes: it must never panic,
// and whatever it accepts must encode again, within the size limit, to
// bytes that decode to the same Meta.
func FuzzDecodeMeta(f *testing.F) {
	for _, m := range []Meta{
		{},
		{Roles: []Role{RoleAggregator, RoleQuery}, GRPCAddr: "10.0.0.7:9090", HTTPAddr: "[::1]:80",
			Started: time.Unix(1_760_000_000, 5), PendingHandoff: []string{"a", "bb"}, PendingForward: []string{"bb"}, Leaving: true},
		{Roles: []Role{RoleCombiner}, Lacking: []uint32{1, 9, 250}},
	} {
		b, _ := AppendMeta(nil, &m)
		f.Add(b)
	}
	f.Add([]byte{2, 0xff, 0, 0, 0, 0xff, 0, 1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		if !decoded(t, b, err, ErrCorruptMeta) {
			return
		}
		again, err := AppendMeta(nil, &m)
		if err != nil {
			t.Fatalf("decoded %v from %x, which does not encode: %v", m, b, err)
		}
		if len(b) <= MetaMaxSize && len(again) > len(b) {
			t.Fatalf("%x re-encodes to %d bytes, more than its %d", b, len(again), len(b))
		}
		m2, err := DecodeMeta(again)
		if err != nil || !sameMeta(m, m2) {
			t.Fatalf("%v re-encoded to %x decodes to %v, %v", m, again, m2, err)
		}
	})
}

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
		a.Started.Equal(b.Started) && slices.Equal(a.PendingHandoff, b.PendingHandoff) && a.Leaving == b.Leaving
}

func TestMetaRoundTrip(t *testing.T) {
	for name, m := range map[string]Meta{
		"zero": {},
		"aggregator": {
			Roles: []Role{RoleAggregator}, GRPCAddr: "10.0.0.7:9090", HTTPAddr: "10.0.0.7:9091",
			Started: time.Unix(1_760_000_000, 123_456_789), PendingHandoff: []string{"comb-2", "comb-5"},
		},
		"all-roles": {
			Roles: []Role{RoleAggregator, RoleCombiner, RoleQuery}, GRPCAddr: "[::1]:9090",
			Started: time.Unix(0, 1), Leaving: true,
		},
		"before-1970": {Roles: []Role{RoleQuery}, Started: time.Unix(-5, 0)},
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
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := DecodeMeta(c.b)
			if !errors.Is(err, ErrCorruptMeta) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("DecodeMeta(%x) = %v, want ErrCorruptMeta saying %s", c.b, err, c.want)
			}
		})
	}
}

// TestDecodeMetaLaterVersion checks that a node reads the meta of a later
// version, which may append fields and use role and flag bits it does not
// know.
func TestDecodeMetaLaterVersion(t *testing.T) {
	m := Meta{Roles: []Role{RoleQuery}, HTTPAddr: "q:80", Leaving: true}
	b, _ := AppendMeta(nil, &m)
	b[0] = metaVersion + 1
	b[1] |= 1 << 7 // a role this version does not know
	flags := len(b) - 2
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
			Started: time.Unix(1_760_000_000, 5), PendingHandoff: []string{"a", "bb"}, Leaving: true},
	} {
		b, _ := AppendMeta(nil, &m)
		f.Add(b)
	}
	f.Add([]byte{2, 0xff, 0, 0, 0, 0xff, 0, 1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		if err != nil {
			if !errors.Is(err, ErrCorruptMeta) {
				t.Fatalf("DecodeMeta(%x) = %v, not ErrCorruptMeta", b, err)
			}
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

package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

// Role is a part a node plays. A node may play several.
type Role string

// The roles. Each has a bit in the encoded Meta (see AppendMeta); the bits
// are part of the gossip protocol: ONLY APPEND TO roleBits.
const (
	RoleAggregator Role = "aggregator"
	RoleCombiner   Role = "combiner"
	RoleQuery      Role = "query"
)

var roleBits = []Role{RoleAggregator, RoleCombiner, RoleQuery}

// ParseRole reads a role by its name.
func ParseRole(s string) (Role, error) {
	for _, r := range roleBits {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("%w: unknown role %q, want aggregator, combiner or query", ErrMeta, s)
}

// MetaMaxSize is the most bytes an encoded Meta may take: memberlist's
// limit on a node's meta data.
const MetaMaxSize = memberlist.MetaMaxSize

var (
	// ErrMeta marks a Meta that cannot be gossiped: an unknown role, a
	// malformed address or an empty name.
	ErrMeta = errors.New("cluster: invalid meta")
	// ErrMetaTooLarge marks a Meta whose encoding exceeds MetaMaxSize.
	ErrMetaTooLarge = errors.New("cluster: meta too large")
	// ErrCorruptMeta marks gossiped meta bytes that do not decode.
	ErrCorruptMeta = errors.New("cluster: corrupt meta")
)

// Meta is what a node gossips about itself. Roles, addresses and Started
// are fixed for the life of the process; the rest changes through
// Cluster.UpdateMeta.
type Meta struct {
	// Roles are the parts the node plays, each at most once.
	Roles []Role
	// GRPCAddr is the host:port of the node's gRPC server: pushes and
	// flushes. Empty when the node serves no gRPC.
	GRPCAddr string
	// HTTPAddr is the host:port of the node's HTTP server: queries and
	// /metrics. Empty when the node serves no HTTP.
	HTTPAddr string
	// Started is when the process started. A node that restarts under the
	// same name gossips a later Started, so the others can tell a restart
	// from a node that never went away.
	Started time.Time

	// PendingHandoff names the members this aggregator holds hinted
	// handoff for: data for a replica that was down when it was flushed.
	PendingHandoff []string
	// PendingForward names those of PendingHandoff for which what waits
	// includes forwarded parts of batches: aggregators owning events that
	// are in no cube until they take them.
	PendingForward []string
	// Lacking lists, ascending, the shards this combiner found it holds
	// less of than another replica when it compared them: a read of them
	// from it may lack some, so readers prefer the other replicas. Shards
	// number at most 256 in a cluster; it is gossiped as a bitmap.
	Lacking []uint32
	// Leaving says the node is leaving the cluster for good. Leave sets it
	// and gossips it before announcing the leave, so that the others record
	// the member as left rather than dead: memberlist reports both the same
	// way.
	Leaving bool
}

// HasRole reports whether the node plays r.
func (m *Meta) HasRole(r Role) bool { return slices.Contains(m.Roles, r) }

// clone returns a copy that shares no slice with m.
func (m Meta) clone() Meta {
	m.Roles = slices.Clone(m.Roles)
	m.PendingHandoff = slices.Clone(m.PendingHandoff)
	m.PendingForward = slices.Clone(m.PendingForward)
	m.Lacking = slices.Clone(m.Lacking)
	return m
}

// metaVersion is the first byte of an encoded Meta. Fields are only ever
// appended; a later version appends fields after the ones below, which this
// version's decoder skips. Version 2 appends the forward indexes, version 3
// the shards lacking; a Meta is written in the lowest version that holds
// it, so that a node of an earlier version reads it whenever it can.
const (
	metaVersion1 = 1
	metaVersion2 = 2
	metaVersion  = 3
)

const flagLeaving = 1 << 0

// AppendMeta appends the encoding of m to dst:
//
//	+---------+-------+-----------+----------+---------+-------+---------+---------------+
//	| version | roles | grpc addr | http addr| started | flags | handoff | handoff names |
//	| 1 byte  | 1 byte| uvarint   | uvarint  | varint  | 1 byte| uvarint | uvarint len + |
//	| 1 or 2  | bits  | len+bytes | len+bytes| unix ns |       | count   | bytes, each   |
//	+---------+-------+-----------+----------+---------+-------+---------+---------------+
//	then, from version 2:
//	+---------+-----------------+
//	| forward | forward indexes |
//	| uvarint | uvarint each,   |
//	| count   | into handoff    |
//	+---------+-----------------+
//	then, from version 3:
//	+---------+-----------------+
//	| lacking | shards lacking: |
//	| uvarint | bit s%8 of byte |
//	| bytes   | s/8 for shard s |
//	+---------+-----------------+
//
// Role bits follow roleBits (bit 0 aggregator, 1 combiner, 2 query); flag
// bit 0 is Leaving; started is 0 for a zero Started. PendingForward is
// written as the indexes of its names in PendingHandoff, a byte each for
// the first 128, and only when it is not empty (version 2). It checks m
// and fails with ErrMeta when a field is invalid; it does not check the
// size.
func AppendMeta(dst []byte, m *Meta) ([]byte, error) {
	if err := m.check(); err != nil {
		return dst, fmt.Errorf("%w: %v", ErrMeta, err)
	}
	var roles byte
	for _, r := range m.Roles {
		roles |= 1 << slices.Index(roleBits, r)
	}
	var flags byte
	if m.Leaving {
		flags |= flagLeaving
	}
	version := byte(metaVersion1)
	switch {
	case len(m.Lacking) > 0:
		version = metaVersion
	case len(m.PendingForward) > 0:
		version = metaVersion2
	}
	dst = append(dst, version, roles)
	dst = appendString(dst, m.GRPCAddr)
	dst = appendString(dst, m.HTTPAddr)
	dst = appendTime(dst, m.Started)
	dst = append(dst, flags)
	dst = binary.AppendUvarint(dst, uint64(len(m.PendingHandoff)))
	for _, n := range m.PendingHandoff {
		dst = appendString(dst, n)
	}
	if version >= metaVersion2 {
		dst = binary.AppendUvarint(dst, uint64(len(m.PendingForward)))
		for _, n := range m.PendingForward {
			dst = binary.AppendUvarint(dst, uint64(slices.Index(m.PendingHandoff, n)))
		}
	}
	if version >= metaVersion {
		bits := make([]byte, m.Lacking[len(m.Lacking)-1]/8+1)
		for _, s := range m.Lacking {
			bits[s/8] |= 1 << (s % 8)
		}
		dst = binary.AppendUvarint(dst, uint64(len(bits)))
		dst = append(dst, bits...)
	}
	return dst, nil
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// appendTime appends t as a varint of Unix nanoseconds, 0 for a zero t.
func appendTime(dst []byte, t time.Time) []byte {
	var ns int64
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	return binary.AppendVarint(dst, ns)
}

// check reports the first field of m that cannot be gossiped.
func (m *Meta) check() error {
	for i, r := range m.Roles {
		if !slices.Contains(roleBits, r) {
			return fmt.Errorf("unknown role %q", r)
		}
		if slices.Contains(m.Roles[:i], r) {
			return fmt.Errorf("role %q listed twice", r)
		}
	}
	for _, a := range []struct{ name, v string }{{"GRPCAddr", m.GRPCAddr}, {"HTTPAddr", m.HTTPAddr}} {
		if a.v == "" {
			continue
		}
		if _, _, err := splitAddr(a.v, false); err != nil {
			return fmt.Errorf("%s: %v", a.name, err)
		}
	}
	for i, n := range m.PendingHandoff {
		if n == "" {
			return fmt.Errorf("PendingHandoff[%d] is empty", i)
		}
	}
	for i, s := range m.Lacking {
		if i > 0 && s <= m.Lacking[i-1] {
			return fmt.Errorf("Lacking is not ascending at %d", i)
		}
		if s >= 8*MetaMaxSize {
			return fmt.Errorf("Lacking[%d] is shard %d: no bitmap of shards fits", i, s)
		}
	}
	for i, n := range m.PendingForward {
		if !slices.Contains(m.PendingHandoff, n) {
			return fmt.Errorf("PendingForward[%d] %q is not in PendingHandoff", i, n)
		}
		if slices.Contains(m.PendingForward[:i], n) {
			return fmt.Errorf("PendingForward[%d] %q listed twice", i, n)
		}
	}
	return nil
}

// encode encodes m and checks it fits MetaMaxSize.
func (m *Meta) encode() ([]byte, error) {
	b, err := AppendMeta(nil, m)
	if err != nil {
		return nil, err
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("%w: %d bytes encoded, memberlist allows %d (%d pending handoff names, addresses of %d and %d bytes)",
			ErrMetaTooLarge, len(b), MetaMaxSize, len(m.PendingHandoff), len(m.GRPCAddr), len(m.HTTPAddr))
	}
	return b, nil
}

// DecodeMeta decodes what AppendMeta encoded. Unknown role and flag bits,
// and bytes after the last field of a later version, are ignored, so that
// nodes of different versions understand each other; anything else that
// does not decode is ErrCorruptMeta.
func DecodeMeta(b []byte) (Meta, error) {
	d := decoder{b: b, corrupt: ErrCorruptMeta}
	var m Meta
	version := d.byte()
	if d.err == nil && version < metaVersion1 {
		return Meta{}, fmt.Errorf("%w: version %d", ErrCorruptMeta, version)
	}
	roles := d.byte()
	for i, r := range roleBits {
		if roles&(1<<i) != 0 {
			m.Roles = append(m.Roles, r)
		}
	}
	m.GRPCAddr = d.string()
	m.HTTPAddr = d.string()
	m.Started = d.time()
	m.Leaving = d.byte()&flagLeaving != 0
	n := d.uvarint()
	// Each name takes at least two bytes, which bounds n before allocating.
	if d.err == nil && n > uint64(len(d.b))/2 {
		d.fail("%d pending handoff names in %d bytes", n, len(d.b))
	}
	if d.err == nil && n > 0 {
		m.PendingHandoff = make([]string, n)
		for i := range m.PendingHandoff {
			m.PendingHandoff[i] = d.string()
		}
	}
	if d.err == nil && version >= metaVersion2 {
		m.PendingForward = d.forward(m.PendingHandoff)
	}
	if d.err == nil && version >= metaVersion {
		m.Lacking = d.lacking()
	}
	if d.err == nil && version <= metaVersion && len(d.b) > 0 {
		d.fail("%d bytes after the last field", len(d.b))
	}
	if d.err != nil {
		return Meta{}, d.err
	}
	if err := m.check(); err != nil {
		return Meta{}, fmt.Errorf("%w: %v", ErrCorruptMeta, err)
	}
	return m, nil
}

// lacking reads the shards lacking.
func (d *decoder) lacking() []uint32 {
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.b)) {
		d.fail("%d bytes of shards lacking in %d bytes", n, len(d.b))
	}
	if d.err != nil {
		return nil
	}
	var out []uint32
	for i, c := range d.b[:n] {
		for bit := range 8 {
			if c&(1<<bit) != 0 {
				out = append(out, uint32(i*8+bit))
			}
		}
	}
	d.advance(int(n))
	return out
}

// forward reads the forward indexes into handoff.
func (d *decoder) forward(handoff []string) []string {
	n := d.uvarint()
	// Each index takes a byte at least, which bounds n before allocating.
	if d.err == nil && n > uint64(len(d.b)) {
		d.fail("%d forward indexes in %d bytes", n, len(d.b))
	}
	if d.err != nil || n == 0 {
		return nil
	}
	out := make([]string, n)
	for i := range out {
		j := d.uvarint()
		if d.err == nil && j >= uint64(len(handoff)) {
			d.fail("forward index %d of %d pending handoff names", j, len(handoff))
		}
		if d.err != nil {
			return nil
		}
		out[i] = handoff[j]
	}
	return out
}

// decoder reads fields off b with a sticky error: after the first failure
// every read returns a zero value.
type decoder struct {
	b   []byte
	off int // bytes consumed, for error messages
	// corrupt is the sentinel the error wraps: what b was meant to be.
	corrupt error
	err     error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: at byte %d: %s", d.corrupt, d.off, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) advance(n int) {
	d.b = d.b[n:]
	d.off += n
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.fail("truncated")
		return 0
	}
	c := d.b[0]
	d.advance(1)
	return c
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad uvarint")
		return 0
	}
	d.advance(n)
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.advance(n)
	return v
}

// time reads what appendTime wrote.
func (d *decoder) time() time.Time {
	if ns := d.varint(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

func (d *decoder) string() string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.b)) {
		d.fail("string of %d bytes, %d left", n, len(d.b))
		return ""
	}
	s := string(d.b[:n])
	d.advance(int(n))
	return s
}

// String formats m for logs.
func (m Meta) String() string {
	var sb strings.Builder
	sb.WriteString("roles=")
	for i, r := range m.Roles {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(string(r))
	}
	sb.WriteString(" grpc=" + m.GRPCAddr + " http=" + m.HTTPAddr)
	if !m.Started.IsZero() {
		sb.WriteString(" started=" + m.Started.UTC().Format(time.RFC3339Nano))
	}
	if len(m.PendingHandoff) > 0 {
		sb.WriteString(" pending_handoff=" + strings.Join(m.PendingHandoff, ","))
	}
	if len(m.Lacking) > 0 {
		sb.WriteString(fmt.Sprintf(" lacking=%v", m.Lacking))
	}
	if len(m.PendingForward) > 0 {
		sb.WriteString(" pending_forward=" + strings.Join(m.PendingForward, ","))
	}
	sb.WriteString(" leaving=" + strconv.FormatBool(m.Leaving))
	return sb.String()
}

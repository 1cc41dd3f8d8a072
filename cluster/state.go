package cluster

import (
	"encoding/binary"
	"errors"
	"slices"
)

// The table of gone members. memberlist forgets a dead or left member
// GossipToTheDeadTime after it went, and even before that hands a joining
// node no dead member it does not know already (its mergeState turns a
// dead one into a suspicion, which it drops for a member it has never
// seen). A node that joins later would not know a member that is down, and
// would compute owners without it, unlike the others: a dead aggregator
// keeps its keys and a dead combiner its shards. So each node sends its
// dead and left members, with their last record, in memberlist's push/pull
// state, at every join and to a random member every PushPullInterval, and
// takes those of the others it does not know better (supersedes).

// errCorruptState marks a push/pull state that does not decode.
var errCorruptState = errors.New("cluster: corrupt member table")

// stateVersion is the first byte of the encoded table. Fields are only
// ever appended: a later version appends them after the entries, which
// this version's decoder skips.
const stateVersion = 1

// stateMaxSize bounds the table a node sends: 64 KiB, a hundred members
// with records of memberlist's 512-byte maximum, several hundred of the
// usual hundred bytes. What does not fit is left out, the members that
// left first, then those gone longest (see byRelevance).
const stateMaxSize = 64 << 10

// stateMinEntry is the fewest bytes an entry takes: a name of one byte, an
// empty address and record, a state and a zero since.
const stateMinEntry = 6

// appendState appends the encoding of gone, dead and left members, to dst
// in their order, stopping at the first entry that would take the whole
// over limit bytes; it returns how many entries it wrote:
//
//	+---------+---------+---------------------------------------------------------+
//	| version | count   | count entries, each:                                    |
//	| 1 byte  | uvarint | name      | addr      | state  | since   | record       |
//	| 1       |         | uvarint   | uvarint   | 1 byte | varint  | uvarint len  |
//	|         |         | len+bytes | len+bytes | 2 or 3 | unix ns | + meta bytes |
//	+---------+---------+---------------------------------------------------------+
//
// State is 2 for dead, 3 for left (the State values); since is when the
// sender saw the member enter it, 0 for a zero time; record is the
// member's last gossiped meta, as AppendMeta encoded it.
func appendState(dst []byte, gone []Member, limit int) ([]byte, int) {
	var body, entry []byte
	n := 0
	for i := range gone {
		m := &gone[i]
		entry = appendString(entry[:0], m.Name)
		entry = appendString(entry, m.Addr)
		entry = append(entry, byte(m.State))
		entry = appendTime(entry, m.Since)
		entry = appendString(entry, string(m.record))
		if 1+binary.MaxVarintLen64+len(body)+len(entry) > limit {
			break
		}
		body = append(body, entry...)
		n++
	}
	dst = append(dst, stateVersion)
	dst = binary.AppendUvarint(dst, uint64(n))
	return append(dst, body...), n
}

// decodeState decodes what appendState encoded, leaving each Meta to be
// decoded from its record. Bytes after the entries of a later version are
// ignored; anything else that does not decode is errCorruptState.
func decodeState(b []byte) ([]Member, error) {
	d := decoder{b: b, corrupt: errCorruptState}
	version := d.byte()
	if d.err == nil && version < stateVersion {
		d.fail("version %d", version)
	}
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.b))/stateMinEntry {
		d.fail("%d entries in %d bytes", n, len(d.b))
	}
	var gone []Member
	for i := uint64(0); d.err == nil && i < n; i++ {
		var m Member
		m.Name = d.string()
		m.Addr = d.string()
		m.State = State(d.byte())
		m.Since = d.time()
		m.record = []byte(d.string())
		switch {
		case d.err != nil:
		case m.Name == "":
			d.fail("entry %d has no name", i)
		case m.State != StateDead && m.State != StateLeft:
			d.fail("entry %d (%s) in state %s", i, m.Name, m.State)
		}
		gone = append(gone, m)
	}
	if d.err == nil && version == stateVersion && len(d.b) > 0 {
		d.fail("%d bytes after the last entry", len(d.b))
	}
	if d.err != nil {
		return nil, d.err
	}
	return gone, nil
}

// byRelevance orders gone members for the table: dead ones first, which
// keep their keys and shards, then those that went last first.
func byRelevance(a, b Member) int {
	if da, db := a.State == StateDead, b.State == StateDead; da != db {
		if da {
			return -1
		}
		return 1
	}
	return b.Since.Compare(a.Since)
}

// supersedes reports whether r, a dead or left member as another node
// reports it, should replace local, this node's entry for it (nil when it
// has none). An alive entry is never replaced: memberlist knows that
// member and says itself when it goes, so a member that came back is not
// marked gone again by a table sent before it did. Between gone entries the
// later start time wins, as a restarted member gossips a later one; at the
// same start time, left wins over dead: the member announced its leave,
// and this node missed it.
func supersedes(r, local *Member) bool {
	switch {
	case local == nil:
		return true
	case local.State == StateAlive:
		return false
	}
	if c := r.Meta.Started.Compare(local.Meta.Started); c != 0 {
		return c > 0
	}
	return r.State == StateLeft && local.State == StateDead
}

// LocalState returns this node's dead and left members, but itself, for
// push/pull; nil when it has none.
func (d *delegate) LocalState(join bool) []byte {
	c := (*Cluster)(d)
	gone := c.filter(func(m *Member) bool { return m.State != StateAlive && m.Name != c.name })
	if len(gone) == 0 {
		return nil
	}
	slices.SortStableFunc(gone, byRelevance)
	b, n := appendState(nil, gone, stateMaxSize)
	if n < len(gone) {
		c.logger.Warn("dead and left members over the push/pull bound; those left longest ago are not handed on",
			"members", len(gone), "sent", n, "max_bytes", stateMaxSize)
	}
	return b
}

// MergeRemoteState takes from another member's table the dead and left
// members this node does not know better, as if it had seen them go: they
// stay listed until a node of their name joins. A member whose record does
// not decode is listed with no role, as when memberlist reports one.
func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	c := (*Cluster)(d)
	gone, err := decodeState(buf)
	if err != nil {
		c.logger.Error("member table from push/pull does not decode; it is ignored", "err", err)
		return
	}
	metaErrs := make([]error, len(gone))
	for i := range gone {
		gone[i].Meta, metaErrs[i] = DecodeMeta(gone[i].record)
	}
	var learned []int
	c.mu.Lock()
	for i := range gone {
		m := gone[i]
		if m.Name != c.name && supersedes(&m, c.mu.members[m.Name]) {
			c.mu.members[m.Name] = &m
			learned = append(learned, i)
		}
	}
	if len(learned) > 0 {
		c.notifyLocked()
	}
	c.mu.Unlock()
	for _, i := range learned {
		m := &gone[i]
		if metaErrs[i] != nil {
			c.logger.Error("member's meta does not decode; it is listed with no role", "member", m.Name, "err", metaErrs[i])
		}
		c.logger.Info("member state", "member", m.Name, "state", m.State, "addr", m.Addr, "meta", m.Meta, "learned", true)
	}
}

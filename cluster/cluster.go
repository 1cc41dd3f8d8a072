package cluster

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

var (
	// ErrJoin marks a Start that reached none of its Join addresses before
	// JoinTimeout.
	ErrJoin = errors.New("cluster: cannot join")
	// ErrClosed marks a call on a Cluster that was shut down.
	ErrClosed = errors.New("cluster: shut down")
	// ErrLeft marks a meta update after Leave: the others no longer take
	// this node's gossip.
	ErrLeft = errors.New("cluster: left the cluster")
)

// State is what this node knows of a member. The zero State, "unknown", is
// that of a member never seen.
type State uint8

// The states of a member.
const (
	// StateAlive: the member answers probes.
	StateAlive State = iota + 1
	// StateDead: the member stopped answering and was declared failed: it
	// crashed, hangs or is cut off, and may come back under its name.
	StateDead
	// StateLeft: the member said it was leaving before it went away.
	StateLeft
)

func (s State) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	case 0:
		return "unknown"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Member is one node as this node knows it.
type Member struct {
	// Name is the member's unique name.
	Name string
	// Addr is the host:port it gossips at.
	Addr string
	// Meta is what it last gossiped about itself. A member whose meta did
	// not decode has a zero Meta, so no role, and an error in the log.
	Meta Meta
	// State is alive, dead or left.
	State State
	// Since is when this node saw the member enter State, or, for a
	// member it learned of from another, when that one did.
	Since time.Time

	// record is the gossiped bytes Meta was decoded from, handed on to
	// joining members in push/pull (see state.go) once it is dead or left.
	record []byte
}

// Cluster is this node's membership: a memberlist instance and a table of
// every member it has seen, kept after memberlist forgets dead ones, and
// handed on to members that join later.
type Cluster struct {
	name   string
	logger *slog.Logger
	timing Timing
	ml     *memberlist.Memberlist
	// keyring holds the gossip keys; nil when gossip is in clear.
	keyring *memberlist.Keyring

	// opMu serializes UpdateMeta, Leave and Shutdown: concurrent updates
	// each apply to the result of the one before, and no memberlist call
	// races Shutdown (memberlist panics on a Leave after Shutdown).
	opMu sync.Mutex

	mu struct {
		sync.Mutex
		// meta is this node's own Meta and encoded are its bytes, what
		// memberlist gossips.
		meta    Meta
		encoded []byte
		// members holds every member seen, by name, this node included.
		members map[string]*Member
		// subs are the change channels of Subscribe, each of capacity 1.
		subs map[chan struct{}]struct{}
		// left is set by Leave, closed by Shutdown.
		left, closed bool
	}
}

// Start creates the local member, listening at cfg.BindAddr, and joins the
// cluster through cfg.Join. It fails with ErrConfig for a bad cfg and with
// ErrJoin when no Join address answers within cfg.JoinTimeout.
func Start(cfg Config) (*Cluster, error) {
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Cluster{name: cfg.Name, logger: cfg.Logger.With("component", "cluster"), timing: cfg.Timing}
	c.mu.meta = cfg.Meta.clone()
	c.mu.encoded, _ = c.mu.meta.encode() // Validate checked it
	c.mu.members = make(map[string]*Member)
	c.mu.subs = make(map[chan struct{}]struct{})

	c.keyring, _ = keyring(cfg.SecretKeys) // Validate checked them
	ml, err := memberlist.Create(c.memberlistConfig(&cfg))
	if err != nil {
		return nil, fmt.Errorf("cluster: cannot listen at %s: %w", cfg.BindAddr, err)
	}
	c.ml = ml
	local := ml.LocalNode()
	c.logger.Info("gossip listening", "name", cfg.Name, "addr", local.Address())
	if len(cfg.Join) > 0 {
		if err := c.join(cfg.Join, cfg.JoinTimeout); err != nil {
			_ = ml.Shutdown()
			return nil, err
		}
	}
	return c, nil
}

func (c *Cluster) memberlistConfig(cfg *Config) *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.Name
	host, port, _ := splitAddr(cfg.BindAddr, false)
	mc.BindAddr, mc.BindPort = host, port
	mc.AdvertisePort = port
	if cfg.AdvertiseAddr != "" {
		host, port, _ := splitAddr(cfg.AdvertiseAddr, true)
		mc.AdvertiseAddr = host
		if port != 0 {
			mc.AdvertisePort = port
		}
	}
	t := cfg.Timing
	mc.ProbeInterval = t.ProbeInterval
	mc.ProbeTimeout = t.ProbeTimeout
	mc.IndirectChecks = t.IndirectChecks
	mc.SuspicionMult = t.SuspicionMult
	mc.SuspicionMaxTimeoutMult = t.SuspicionMaxTimeoutMult
	mc.GossipInterval = t.GossipInterval
	mc.GossipNodes = t.GossipNodes
	mc.RetransmitMult = t.RetransmitMult
	mc.GossipToTheDeadTime = t.GossipToTheDeadTime
	mc.PushPullInterval = t.PushPullInterval
	mc.TCPTimeout = t.TCPTimeout
	mc.DeadNodeReclaimTime = t.DeadNodeReclaimTime
	mc.Logger = newMemberlistLogger(cfg.Logger)
	if c.keyring != nil {
		// Every packet and stream is encrypted, and one that is not (or
		// not with a listed key) is dropped.
		mc.Keyring = c.keyring
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	mc.Delegate = (*delegate)(c)
	mc.Events = (*events)(c)
	return mc
}

// join retries memberlist's Join with jittered, doubling backoff from 100ms
// to 5s until one address answers or timeout passes.
func (c *Cluster) join(addrs []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		n, err := c.ml.Join(addrs)
		if err == nil {
			c.logger.Info("joined", "contacted", n, "attempt", attempt)
			return nil
		}
		left := time.Until(deadline)
		c.logger.Warn("join failed", "addrs", addrs, "attempt", attempt, "err", err)
		if left <= 0 {
			return fmt.Errorf("%w: none of %s answered in %d attempts over %s: %w",
				ErrJoin, strings.Join(addrs, ", "), attempt, timeout, err)
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		time.Sleep(min(wait, left))
		backoff = min(2*backoff, 5*time.Second)
	}
}

// Local returns this node as the cluster sees it.
func (c *Cluster) Local() Member {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := *c.mu.members[c.name]
	m.Meta = c.mu.meta.clone()
	return m
}

// Members returns every member this node has seen, itself included, sorted
// by name. Dead and left members stay listed until they come back, with
// those it learned of from the others when it joined.
func (c *Cluster) Members() []Member {
	return c.filter(func(*Member) bool { return true })
}

// WithRole returns the members that play role and are in one of states,
// or in any state when none is given, sorted by name.
func (c *Cluster) WithRole(role Role, states ...State) []Member {
	return c.filter(func(m *Member) bool {
		return m.Meta.HasRole(role) && (len(states) == 0 || slices.Contains(states, m.State))
	})
}

func (c *Cluster) filter(keep func(*Member) bool) []Member {
	c.mu.Lock()
	out := make([]Member, 0, len(c.mu.members))
	for _, m := range c.mu.members {
		if keep(m) {
			cp := *m
			cp.Meta = m.Meta.clone()
			out = append(out, cp)
		}
	}
	c.mu.Unlock()
	slices.SortFunc(out, func(a, b Member) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// Names returns the names of members, in their order: the node list for
// Owner and Replicas.
func Names(members []Member) []string {
	names := make([]string, len(members))
	for i, m := range members {
		names[i] = m.Name
	}
	return names
}

// UpdateMeta applies update to a copy of this node's Meta and gossips the
// result. If the result is invalid or over MetaMaxSize, nothing changes and
// the error says why; after Leave it fails with ErrLeft, after Shutdown with
// ErrClosed. It waits up to Timing.TCPTimeout for the update to go
// out to the other members; past that it logs a warning and returns, and
// gossip carries the update on.
func (c *Cluster) UpdateMeta(update func(*Meta)) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	return c.updateMetaLocked(update)
}

// updateMetaLocked is UpdateMeta with opMu held.
func (c *Cluster) updateMetaLocked(update func(*Meta)) error {
	c.mu.Lock()
	switch {
	case c.mu.closed:
		c.mu.Unlock()
		return ErrClosed
	case c.mu.left: // memberlist may have dropped this node from its own table
		c.mu.Unlock()
		return ErrLeft
	}
	m := c.mu.meta.clone()
	c.mu.Unlock()
	update(&m)
	b, err := m.encode()
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.mu.meta, c.mu.encoded = m, b
	c.mu.Unlock()
	if err := c.ml.UpdateNode(c.timing.TCPTimeout); err != nil {
		c.logger.Warn("meta update not yet sent to every member", "err", err)
	}
	return nil
}

// Subscribe returns a channel that receives a value after the membership
// changes: a member joins, leaves, dies, comes back or updates its meta.
// Changes that come while a value is pending coalesce into it, so a reader
// that falls behind reads Members once for many changes, and memberlist
// never waits for it. Shutdown closes the channel; cancel stops it sooner.
func (c *Cluster) Subscribe() (ch <-chan struct{}, cancel func()) {
	sub := make(chan struct{}, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.closed {
		close(sub)
		return sub, func() {}
	}
	c.mu.subs[sub] = struct{}{}
	return sub, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.mu.subs[sub]; ok {
			delete(c.mu.subs, sub)
			close(sub)
		}
	}
}

// Leave tells the other members this node is leaving, so that they list it
// as left rather than dead, and waits up to timeout for the message to go
// out. The node keeps gossiping until Shutdown, but its meta no longer
// changes. Calling Leave again is harmless.
func (c *Cluster) Leave(timeout time.Duration) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	closed, left := c.mu.closed, c.mu.left
	c.mu.Unlock()
	switch {
	case closed:
		return ErrClosed
	case left:
		return nil
	}
	// Leaving goes out first: memberlist reports a leave and a failure
	// alike, so the others tell them apart by the member's last meta.
	if err := c.updateMetaLocked(func(m *Meta) { m.Leaving = true }); err != nil {
		return err
	}
	c.mu.Lock()
	c.mu.left = true
	c.mu.Unlock()
	if err := c.ml.Leave(timeout); err != nil {
		return fmt.Errorf("cluster: leave not confirmed within %s: %w", timeout, err)
	}
	return nil
}

// Shutdown stops gossip and closes every Subscribe channel. Without a Leave
// first, the others declare this node dead. It is safe to call more than
// once.
func (c *Cluster) Shutdown() error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return nil
	}
	c.mu.closed = true
	for sub := range c.mu.subs {
		close(sub)
	}
	clear(c.mu.subs)
	c.mu.Unlock()
	if err := c.ml.Shutdown(); err != nil {
		return fmt.Errorf("cluster: shutdown: %w", err)
	}
	return nil
}

// set records what memberlist reported of node and wakes subscribers. It
// runs under memberlist's lock, so it must not call memberlist.
func (c *Cluster) set(node *memberlist.Node, state State) {
	meta, err := DecodeMeta(node.Meta)
	if err != nil {
		c.logger.Error("member's meta does not decode; it is listed with no role", "member", node.Name, "err", err)
	}
	now := time.Now()
	c.mu.Lock()
	prev, seen := c.mu.members[node.Name]
	m := &Member{Name: node.Name, Addr: node.Address(), Meta: meta, State: state, Since: now, record: bytes.Clone(node.Meta)}
	if seen && prev.State == state {
		m.Since = prev.Since
	}
	c.mu.members[node.Name] = m
	c.notifyLocked()
	c.mu.Unlock()
	switch {
	case !seen || prev.State != state:
		c.logger.Info("member state", "member", node.Name, "state", state, "addr", m.Addr, "meta", meta)
	default:
		c.logger.Debug("member updated", "member", node.Name, "meta", meta)
	}
}

// notifyLocked wakes every subscriber; c.mu is held.
func (c *Cluster) notifyLocked() {
	for sub := range c.mu.subs {
		select {
		case sub <- struct{}{}:
		default: // a change is already pending
		}
	}
}

// events receives memberlist's membership events. memberlist calls them
// one at a time, under its own lock.
type events Cluster

func (e *events) NotifyJoin(n *memberlist.Node)   { (*Cluster)(e).set(n, StateAlive) }
func (e *events) NotifyUpdate(n *memberlist.Node) { (*Cluster)(e).set(n, StateAlive) }
func (e *events) NotifyLeave(n *memberlist.Node)  { (*Cluster)(e).set(n, leaveState(n)) }

// leaveState tells a member that left from one that was declared dead:
// memberlist reports both through NotifyLeave, with the member's last meta,
// which says Leaving when it announced its leave.
func leaveState(n *memberlist.Node) State {
	if m, err := DecodeMeta(n.Meta); err == nil && m.Leaving {
		return StateLeft
	}
	return StateDead
}

// delegate hands memberlist this node's encoded meta, and in push/pull its
// table of dead and left members (state.go). dimsum sends no user messages.
type delegate Cluster

func (d *delegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.encoded // encode checked it fits MetaMaxSize, memberlist's limit
}

func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }

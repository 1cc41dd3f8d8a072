package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"time"
)

// ErrConfig marks an invalid Config.
var ErrConfig = errors.New("cluster: invalid config")

// DefaultPort is the gossip port (UDP and TCP) used when BindAddr is unset.
// It is memberlist's default.
const DefaultPort = 7946

// Config configures a node's membership. Every field but Meta has a
// default, set by EnsureDefaults.
type Config struct {
	// Name identifies the node in the cluster and must be unique in it. A
	// node that restarts under the same name is the same member coming
	// back; the ring hashes names, so renaming a node moves its keys. The
	// default is the host name.
	Name string

	// BindAddr is the ip:port the node listens on for gossip, over both
	// UDP and TCP; 0.0.0.0 listens on every interface. Port 0 picks a free
	// port; Cluster.Local reports the one chosen. The default is
	// "0.0.0.0:7946".
	BindAddr string

	// AdvertiseAddr is the ip:port other members reach this node at, when
	// it differs from BindAddr (behind NAT, or when binding 0.0.0.0). An
	// empty host advertises the bound IP, or when binding 0.0.0.0 the
	// address of a private interface; port 0 or no port advertises the
	// bound port. The default is empty.
	AdvertiseAddr string

	// Join lists host:port addresses of any members of the cluster to join.
	// One that answers is enough: it hands over the whole membership. Start
	// retries with backoff until one answers or JoinTimeout passes, logging
	// each failed attempt. Empty starts a new cluster of one, which is how
	// the first node starts.
	Join []string

	// JoinTimeout bounds how long Start tries to join. The default is one
	// minute.
	JoinTimeout time.Duration

	// Meta is what this node tells the others about itself. Its encoding
	// must fit memberlist's 512-byte limit (see MetaMaxSize).
	Meta Meta

	// Timing holds the failure detector's and gossip's intervals. A zero
	// field takes its value from LANTiming.
	Timing Timing

	// SecretKeys, when set, encrypt and authenticate all gossip with
	// memberlist's keyring (AES-GCM): the first key encrypts what this
	// node sends, and any of them decrypts what it receives; a member
	// without a listed key can neither join nor read the gossip. Keys are
	// 16, 24 or 32 bytes (ParseKeys reads them from a file), and change at
	// run time with Cluster.SetKeys. The default is none: gossip in clear.
	SecretKeys [][]byte

	// Logger receives membership events and memberlist's own logs (under
	// component=memberlist). nil discards them.
	Logger *slog.Logger
}

// Timing holds memberlist's protocol intervals and multipliers. The field
// comments give memberlist's meaning; LANTiming's values are memberlist's
// DefaultLANConfig.
type Timing struct {
	// ProbeInterval is how often a node probes one other member, round
	// robin, to check it is alive. Lower detects failures sooner for more
	// traffic. LAN: 1s.
	ProbeInterval time.Duration

	// ProbeTimeout is how long a probe waits for an ack before asking
	// IndirectChecks other members to probe on its behalf; it should be
	// about the 99th percentile of round-trip time. LAN: 500ms.
	ProbeTimeout time.Duration

	// IndirectChecks is how many members are asked to probe a member that
	// did not answer a direct probe. LAN: 3.
	IndirectChecks int

	// SuspicionMult sets how long a member stays suspect before it is
	// declared dead: SuspicionMult * max(1, log10(members)) * ProbeInterval,
	// time in which a member that is in fact alive can refute. LAN: 4.
	SuspicionMult int

	// SuspicionMaxTimeoutMult bounds the suspicion timeout at this multiple
	// of the one above; the timeout starts there and shrinks as other
	// members confirm the suspicion. LAN: 6.
	SuspicionMaxTimeoutMult int

	// GossipInterval is how often a node sends queued gossip (joins,
	// leaves, suspicions, meta updates) to GossipNodes random members.
	// LAN: 200ms and 3.
	GossipInterval time.Duration
	GossipNodes    int

	// RetransmitMult sets how many times a piece of gossip is sent on:
	// RetransmitMult * log10(members+1). LAN: 4.
	RetransmitMult int

	// GossipToTheDeadTime is how long a dead member still receives gossip,
	// so that it can refute, before memberlist forgets it. Cluster keeps
	// forgotten members in its own table as dead or left, and hands them
	// to members that join later in push/pull. LAN: 30s.
	GossipToTheDeadTime time.Duration

	// PushPullInterval is how often a node exchanges its full membership
	// with a random member over TCP, which repairs whatever gossip missed.
	// LAN: 30s.
	PushPullInterval time.Duration

	// TCPTimeout bounds connecting to a member, and each read and write,
	// for push/pull, joins and fallback probes. LAN: 10s.
	TCPTimeout time.Duration

	// DeadNodeReclaimTime is how long after a member was declared dead its
	// name may be taken by a node at another address. Zero means never
	// while memberlist still remembers the dead member (GossipToTheDeadTime);
	// a node restarting at its old address is always let back. LAN: 0.
	DeadNodeReclaimTime time.Duration
}

// LANTiming returns memberlist's DefaultLANConfig timing: failures are
// detected in a few seconds on a local network.
func LANTiming() Timing {
	return Timing{
		ProbeInterval:           time.Second,
		ProbeTimeout:            500 * time.Millisecond,
		IndirectChecks:          3,
		SuspicionMult:           4,
		SuspicionMaxTimeoutMult: 6,
		GossipInterval:          200 * time.Millisecond,
		GossipNodes:             3,
		RetransmitMult:          4,
		GossipToTheDeadTime:     30 * time.Second,
		PushPullInterval:        30 * time.Second,
		TCPTimeout:              10 * time.Second,
		DeadNodeReclaimTime:     0,
	}
}

// FastTiming returns timing for nodes on one host (tests, a cluster on a
// laptop): a node that stops answering is dead on the others in about a
// second, and a restarted node may reclaim its name at a new port at once.
// It spends far more packets than LANTiming; do not use it across a
// network.
func FastTiming() Timing {
	return Timing{
		ProbeInterval:           200 * time.Millisecond,
		ProbeTimeout:            100 * time.Millisecond,
		IndirectChecks:          1,
		SuspicionMult:           2,
		SuspicionMaxTimeoutMult: 2,
		GossipInterval:          50 * time.Millisecond,
		GossipNodes:             3,
		RetransmitMult:          3,
		GossipToTheDeadTime:     2 * time.Second,
		PushPullInterval:        2 * time.Second,
		TCPTimeout:              time.Second,
		DeadNodeReclaimTime:     100 * time.Millisecond,
	}
}

// ensureDefaults fills every zero field from LANTiming. DeadNodeReclaimTime
// is zero in LANTiming, so it keeps its value.
func (t *Timing) ensureDefaults() {
	lan := LANTiming()
	setDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	setInt := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	setDur(&t.ProbeInterval, lan.ProbeInterval)
	setDur(&t.ProbeTimeout, lan.ProbeTimeout)
	setInt(&t.IndirectChecks, lan.IndirectChecks)
	setInt(&t.SuspicionMult, lan.SuspicionMult)
	setInt(&t.SuspicionMaxTimeoutMult, lan.SuspicionMaxTimeoutMult)
	setDur(&t.GossipInterval, lan.GossipInterval)
	setInt(&t.GossipNodes, lan.GossipNodes)
	setInt(&t.RetransmitMult, lan.RetransmitMult)
	setDur(&t.GossipToTheDeadTime, lan.GossipToTheDeadTime)
	setDur(&t.PushPullInterval, lan.PushPullInterval)
	setDur(&t.TCPTimeout, lan.TCPTimeout)
}

func (t *Timing) validate() error {
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"ProbeInterval", t.ProbeInterval}, {"ProbeTimeout", t.ProbeTimeout},
		{"GossipInterval", t.GossipInterval}, {"GossipToTheDeadTime", t.GossipToTheDeadTime},
		{"PushPullInterval", t.PushPullInterval}, {"TCPTimeout", t.TCPTimeout},
		{"DeadNodeReclaimTime", t.DeadNodeReclaimTime},
	} {
		if d.v < 0 {
			return fmt.Errorf("%w: Timing.%s is negative (%s)", ErrConfig, d.name, d.v)
		}
	}
	for _, n := range []struct {
		name string
		v    int
	}{
		{"IndirectChecks", t.IndirectChecks}, {"SuspicionMult", t.SuspicionMult},
		{"SuspicionMaxTimeoutMult", t.SuspicionMaxTimeoutMult}, {"GossipNodes", t.GossipNodes},
		{"RetransmitMult", t.RetransmitMult},
	} {
		if n.v < 0 {
			return fmt.Errorf("%w: Timing.%s is negative (%d)", ErrConfig, n.name, n.v)
		}
	}
	if t.ProbeTimeout >= t.ProbeInterval {
		return fmt.Errorf("%w: Timing.ProbeTimeout %s must be shorter than ProbeInterval %s", ErrConfig, t.ProbeTimeout, t.ProbeInterval)
	}
	return nil
}

// EnsureDefaults fills every unset field with its default.
func (c *Config) EnsureDefaults() {
	if c.Name == "" {
		c.Name, _ = os.Hostname()
	}
	if c.BindAddr == "" {
		c.BindAddr = net.JoinHostPort("0.0.0.0", strconv.Itoa(DefaultPort))
	}
	if c.JoinTimeout == 0 {
		c.JoinTimeout = time.Minute
	}
	c.Timing.ensureDefaults()
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports the first invalid field. It checks the form of
// addresses, not whether they resolve: a join address whose name does not
// resolve yet is retried like one that does not answer.
func (c *Config) Validate() error {
	if c.Name == "" {
		return fmt.Errorf("%w: Name is empty", ErrConfig)
	}
	// memberlist takes IP addresses only: it would bind a host name as
	// every interface, and refuses to advertise one.
	host, _, err := splitAddr(c.BindAddr, false)
	if err == nil && net.ParseIP(host) == nil {
		err = fmt.Errorf("host %q in %q is not an IP address (0.0.0.0 binds every interface)", host, c.BindAddr)
	}
	if err != nil {
		return fmt.Errorf("%w: BindAddr: %v", ErrConfig, err)
	}
	if c.AdvertiseAddr != "" {
		host, _, err := splitAddr(c.AdvertiseAddr, true)
		if err == nil && host != "" && net.ParseIP(host) == nil {
			err = fmt.Errorf("host %q in %q is not an IP address", host, c.AdvertiseAddr)
		}
		if err != nil {
			return fmt.Errorf("%w: AdvertiseAddr: %v", ErrConfig, err)
		}
	}
	for i, j := range c.Join {
		_, port, err := splitAddr(j, false)
		if err == nil && port == 0 {
			err = fmt.Errorf("port 0 in %q", j)
		}
		if err != nil {
			return fmt.Errorf("%w: Join[%d]: %v", ErrConfig, i, err)
		}
	}
	if c.JoinTimeout < 0 {
		return fmt.Errorf("%w: JoinTimeout is negative (%s)", ErrConfig, c.JoinTimeout)
	}
	if err := c.Timing.validate(); err != nil {
		return err
	}
	if _, err := keyring(c.SecretKeys); err != nil {
		return err
	}
	if _, err := c.Meta.encode(); err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return nil
}

// splitAddr splits host:port and checks the port. With portOptional, a bare
// host is accepted with port 0.
func splitAddr(addr string, portOptional bool) (host string, port int, err error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		if portOptional && net.ParseIP(addr) != nil {
			return addr, 0, nil
		}
		if portOptional {
			if _, _, err2 := net.SplitHostPort(addr + ":0"); err2 == nil {
				return addr, 0, nil
			}
		}
		return "", 0, fmt.Errorf("address %q is not host:port: %v", addr, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("address %q has port %q, want a number in 0..65535", addr, p)
	}
	return host, int(n), nil
}

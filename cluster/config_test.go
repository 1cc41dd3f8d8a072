package cluster

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// TestLANTimingIsMemberlists checks that LANTiming is memberlist's own
// DefaultLANConfig, field by field.
func TestLANTimingIsMemberlists(t *testing.T) {
	mc := memberlist.DefaultLANConfig()
	want := Timing{
		ProbeInterval: mc.ProbeInterval, ProbeTimeout: mc.ProbeTimeout, IndirectChecks: mc.IndirectChecks,
		SuspicionMult: mc.SuspicionMult, SuspicionMaxTimeoutMult: mc.SuspicionMaxTimeoutMult,
		GossipInterval: mc.GossipInterval, GossipNodes: mc.GossipNodes, RetransmitMult: mc.RetransmitMult,
		GossipToTheDeadTime: mc.GossipToTheDeadTime, PushPullInterval: mc.PushPullInterval,
		TCPTimeout: mc.TCPTimeout, DeadNodeReclaimTime: mc.DeadNodeReclaimTime,
	}
	if got := LANTiming(); got != want {
		t.Errorf("LANTiming() = %+v\nmemberlist's LAN config = %+v", got, want)
	}
	var c Config
	c.EnsureDefaults()
	if c.Timing != want {
		t.Errorf("zero Timing defaults to %+v, want LAN %+v", c.Timing, want)
	}
	if c.BindAddr != "0.0.0.0:7946" || c.JoinTimeout != time.Minute || c.Name == "" || c.Logger == nil {
		t.Errorf("defaults: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("default config: %v", err)
	}
	f := Config{Timing: FastTiming()}
	f.EnsureDefaults()
	if f.Timing != FastTiming() {
		t.Errorf("EnsureDefaults changed FastTiming to %+v", f.Timing)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"bind-no-port", func(c *Config) { c.BindAddr = "127.0.0.1" }, `BindAddr: address "127.0.0.1" is not host:port`},
		{"bind-bad-port", func(c *Config) { c.BindAddr = "127.0.0.1:70000" }, `BindAddr: address "127.0.0.1:70000" has port "70000"`},
		{"bind-host-name", func(c *Config) { c.BindAddr = "node-1:7946" }, `BindAddr: host "node-1" in "node-1:7946" is not an IP address`},
		{"bind-no-host", func(c *Config) { c.BindAddr = ":7946" }, `BindAddr: host "" in ":7946" is not an IP address (0.0.0.0 binds every interface)`},
		{"advertise-bad", func(c *Config) { c.AdvertiseAddr = "a:b:c" }, `AdvertiseAddr: address "a:b:c" is not host:port`},
		{"advertise-host-name", func(c *Config) { c.AdvertiseAddr = "node-3:7000" }, `AdvertiseAddr: host "node-3" in "node-3:7000" is not an IP address`},
		{"join-no-port", func(c *Config) { c.Join = []string{"10.0.0.1:7946", "seed"} }, `Join[1]: address "seed" is not host:port`},
		{"join-port-0", func(c *Config) { c.Join = []string{"seed:0"} }, `Join[0]: port 0 in "seed:0"`},
		{"join-timeout", func(c *Config) { c.JoinTimeout = -time.Second }, "JoinTimeout is negative (-1s)"},
		{"probe-timeout", func(c *Config) { c.Timing.ProbeTimeout = 2 * time.Second }, "Timing.ProbeTimeout 2s must be shorter than ProbeInterval 1s"},
		{"negative-duration", func(c *Config) { c.Timing.PushPullInterval = -1 }, "Timing.PushPullInterval is negative"},
		{"negative-count", func(c *Config) { c.Timing.GossipNodes = -3 }, "Timing.GossipNodes is negative (-3)"},
		{"meta", func(c *Config) { c.Meta.Roles = []Role{"writer"} }, `cluster: invalid meta: unknown role "writer"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := Config{Name: "n"}
			c.edit(&cfg)
			cfg.EnsureDefaults()
			err := cfg.Validate()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Validate() = %v, want ErrConfig saying %s", err, c.want)
			}
		})
	}
	for _, addr := range []string{"10.0.0.1", "::1", "10.0.0.1:7000", "[::1]:0", ":7000"} {
		cfg := Config{Name: "n", AdvertiseAddr: addr}
		cfg.EnsureDefaults()
		if err := cfg.Validate(); err != nil {
			t.Errorf("AdvertiseAddr %q: %v", addr, err)
		}
	}
}

func TestParseRole(t *testing.T) {
	for _, r := range []Role{RoleAggregator, RoleCombiner, RoleQuery} {
		if got, err := ParseRole(string(r)); got != r || err != nil {
			t.Errorf("ParseRole(%q) = %q, %v", r, got, err)
		}
	}
	if _, err := ParseRole("Combiner"); !errors.Is(err, ErrMeta) || !strings.Contains(err.Error(), `unknown role "Combiner", want aggregator, combiner or query`) {
		t.Errorf("ParseRole(Combiner) = %v", err)
	}
}

package node

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/schema"
)

// Config is a node's YAML configuration. Every field has a default, so an
// empty file (or none) runs an all-in-one node on the embedded schema.
type Config struct {
	// DataDir holds the cube store (in cube/) and the aggregator's
	// write-ahead log (in wal/). The default is ./data.
	DataDir string `yaml:"data_dir"`
	// GRPCListen is the address of the gRPC server (pushes, and in a
	// cluster flushes, forwarded batches and reads between nodes). The
	// default is 127.0.0.1:9400.
	GRPCListen string `yaml:"grpc_listen"`
	// HTTPListen is the address of the HTTP server (the Prometheus API and
	// /metrics). The default is 127.0.0.1:9401.
	HTTPListen string `yaml:"http_listen"`
	// Name identifies the node in flush identities and logs. The default is
	// the host name.
	Name string `yaml:"name"`
	// MaxRecvBytes bounds one gRPC message. The default is 64 MiB.
	MaxRecvBytes int `yaml:"max_recv_bytes"`

	// Roles are the roles this node runs: some of aggregator, combiner and
	// query. The default is all three.
	Roles []string `yaml:"roles"`
	// Cluster makes the node a member of a cluster. Without it (no join
	// address and no gossip address) the node is standalone and must run
	// every role.
	Cluster ClusterConfig `yaml:"cluster"`

	Aggregator AggregatorConfig `yaml:"aggregator"`
	Query      QueryConfig      `yaml:"query"`
	// Schema declares the families and resolutions. When it names no
	// family, the embedded default schema is used.
	Schema schema.File `yaml:"schema"`
}

// AggregatorConfig mirrors aggregator.Options; zero fields take its defaults.
type AggregatorConfig struct {
	Grace             model.Duration `yaml:"grace"`                // default 10s
	MaxLateness       model.Duration `yaml:"max_lateness"`         // default 1h
	MaxFutureSkew     model.Duration `yaml:"max_future_skew"`      // default 1m
	MaxBatchEvents    int            `yaml:"max_batch_events"`     // default 100000
	MaxCellsPerWindow int            `yaml:"max_cells_per_window"` // default 1000000
	FlushInterval     model.Duration `yaml:"flush_interval"`       // default window/10
	// MaxLabelNameBytes and MaxLabelValueBytes bound an event's label
	// names and values; a longer one is rejected (LABEL_TOO_LONG). The
	// defaults are 256 and 2048.
	MaxLabelNameBytes  int `yaml:"max_label_name_bytes"`
	MaxLabelValueBytes int `yaml:"max_label_value_bytes"`
	// WALMaxBytes bounds the write-ahead log in data_dir/wal; past it Push
	// refuses batches (gRPC ResourceExhausted) until the combiners take
	// the windows it holds. The default is 1 GiB.
	WALMaxBytes int64 `yaml:"wal_max_bytes"`
	// WALDisabled runs the aggregator without a write-ahead log: a batch is
	// acknowledged once it is in memory, and a crash loses what was not
	// yet flushed. For benchmarks that measure the cube alone.
	WALDisabled bool `yaml:"wal_disabled"`
}

// ClusterConfig configures membership and how the cube is split.
type ClusterConfig struct {
	// GossipListen is the memberlist address (TCP and UDP). Setting it or
	// Join makes the node a cluster member. The default, for a member, is
	// the gRPC host with port 9402.
	GossipListen string `yaml:"gossip_listen"`
	// Advertise is the gossip address other members reach this node at,
	// when it differs from GossipListen (NAT, 0.0.0.0).
	Advertise string `yaml:"advertise"`
	// Join lists members to meet at start, host:port of their gossip
	// addresses. Any one that answers is enough.
	Join []string `yaml:"join"`
	// Shards is how many shards the global cube is split into; every node
	// of a cluster must use the same number, and it must not change once
	// data is stored. The default is 64.
	Shards int `yaml:"shards"`
	// Combiners names the combiners that hold the cube's shards. Every node
	// must list the same names; shards are placed over exactly these,
	// whether each is up, down or not yet started, so every node places
	// them alike. Without it, shards are placed over the combiners a node
	// has seen (and not seen leave): a node that starts while a combiner is
	// down may not know that combiner, and place its flushes elsewhere.
	Combiners []string `yaml:"combiners"`
	// Replication is how many combiners hold each shard, at most the number
	// of combiners. The default is 2.
	Replication int `yaml:"replication"`
	// Timing is memberlist's timing profile: "lan" (the default) or "fast",
	// which detects a dead member in about a second on loopback, for tests.
	Timing string `yaml:"timing"`
}

// QueryConfig mirrors query.Options; zero fields take its defaults.
type QueryConfig struct {
	Timeout       model.Duration `yaml:"timeout"`        // default 2m
	MaxSamples    int            `yaml:"max_samples"`    // default 50000000
	MaxSeries     int            `yaml:"max_series"`     // default 1000000
	LookbackDelta model.Duration `yaml:"lookback_delta"` // default 5m
	MaxGroups     int            `yaml:"max_groups"`     // default 10000, groups of one cube slice
	// MaxQueryLength bounds a PromQL expression and each match[] selector,
	// in bytes, and MaxQueryDepth how deep its brackets nest; either
	// refused with 400. The defaults are 16384 and 64.
	MaxQueryLength int `yaml:"max_query_length"`
	MaxQueryDepth  int `yaml:"max_query_depth"`
	// PartialResponse is what a request that does not say (with the
	// partial_response parameter) gets when a shard of the cube has no
	// reachable combiner: true, the default, answers from the others with a
	// warning; false fails with 503.
	PartialResponse *bool `yaml:"partial_response"`
}

// ErrConfig marks an invalid configuration.
var ErrConfig = errors.New("node: invalid config")

// LoadConfig reads a YAML config file.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("node: cannot read config: %w", err)
	}
	return ParseConfig(data)
}

// ParseConfig decodes a YAML config, refusing unknown fields.
func ParseConfig(data []byte) (Config, error) {
	var c Config
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return c, nil
}

// EnsureDefaults fills the node-level fields; the components fill theirs.
func (c *Config) EnsureDefaults() {
	if c.DataDir == "" {
		c.DataDir = "data"
	}
	if c.GRPCListen == "" {
		c.GRPCListen = "127.0.0.1:9400"
	}
	if c.HTTPListen == "" {
		c.HTTPListen = "127.0.0.1:9401"
	}
	if c.Name == "" {
		c.Name, _ = os.Hostname()
	}
	if c.MaxRecvBytes == 0 {
		c.MaxRecvBytes = 64 << 20
	}
	if len(c.Roles) == 0 {
		c.Roles = []string{string(cluster.RoleAggregator), string(cluster.RoleCombiner), string(cluster.RoleQuery)}
	}
	cl := &c.Cluster
	if cl.Shards == 0 {
		cl.Shards = 64
	}
	if cl.Replication == 0 {
		cl.Replication = 2
	}
	if cl.Timing == "" {
		cl.Timing = "lan"
	}
	if c.Clustered() && cl.GossipListen == "" {
		host, _, err := net.SplitHostPort(c.GRPCListen)
		if err == nil {
			cl.GossipListen = net.JoinHostPort(host, "9402")
		}
	}
}

// Clustered reports whether the node joins a cluster.
func (c *Config) Clustered() bool { return c.Cluster.GossipListen != "" || len(c.Cluster.Join) > 0 }

// HasRole reports whether the node runs role.
func (c *Config) HasRole(role cluster.Role) bool { return slices.Contains(c.Roles, string(role)) }

// Validate reports the first node-level, cluster or query field that cannot
// work; zero values stand for their defaults. The aggregator and the schema
// check their own fields when they are built.
func (c *Config) Validate() error {
	switch {
	case c.Aggregator.WALMaxBytes < 0:
		return fmt.Errorf("%w: aggregator wal_max_bytes %d is negative", ErrConfig, c.Aggregator.WALMaxBytes)
	case c.MaxRecvBytes < 0:
		return fmt.Errorf("%w: max_recv_bytes %d is negative", ErrConfig, c.MaxRecvBytes)
	case c.Query.MaxSamples < 0:
		return fmt.Errorf("%w: query max_samples %d is negative", ErrConfig, c.Query.MaxSamples)
	case c.Query.MaxSeries < 0:
		return fmt.Errorf("%w: query max_series %d is negative", ErrConfig, c.Query.MaxSeries)
	case c.Query.MaxGroups < 0:
		return fmt.Errorf("%w: query max_groups %d is negative", ErrConfig, c.Query.MaxGroups)
	case c.Query.MaxQueryLength < 0 || c.Query.MaxQueryDepth < 0:
		return fmt.Errorf("%w: query max_query_length %d or max_query_depth %d is negative", ErrConfig, c.Query.MaxQueryLength, c.Query.MaxQueryDepth)
	case c.Aggregator.MaxLabelNameBytes < 0 || c.Aggregator.MaxLabelValueBytes < 0:
		return fmt.Errorf("%w: aggregator max_label_name_bytes %d or max_label_value_bytes %d is negative", ErrConfig, c.Aggregator.MaxLabelNameBytes, c.Aggregator.MaxLabelValueBytes)
	case c.Cluster.Shards < 0 || c.Cluster.Shards > maxShards:
		return fmt.Errorf("%w: cluster shards %d, want 1 to %d", ErrConfig, c.Cluster.Shards, maxShards)
	case c.Cluster.Replication < 0:
		return fmt.Errorf("%w: cluster replication %d, want at least 1", ErrConfig, c.Cluster.Replication)
	case c.Cluster.Timing != "" && c.Cluster.Timing != "lan" && c.Cluster.Timing != "fast":
		return fmt.Errorf("%w: cluster timing %q, want lan or fast", ErrConfig, c.Cluster.Timing)
	}
	named := map[string]bool{}
	for _, name := range c.Cluster.Combiners {
		if name == "" || named[name] {
			return fmt.Errorf("%w: cluster combiners %q: names must be non-empty and distinct", ErrConfig, c.Cluster.Combiners)
		}
		named[name] = true
	}
	seen := map[string]bool{}
	for _, r := range c.Roles {
		if _, err := cluster.ParseRole(r); err != nil {
			return fmt.Errorf("%w: %v", ErrConfig, err)
		}
		if seen[r] {
			return fmt.Errorf("%w: role %q listed twice", ErrConfig, r)
		}
		seen[r] = true
	}
	if !c.Clustered() && len(seen) != 0 && len(seen) != 3 {
		return fmt.Errorf("%w: a node outside a cluster must run every role; roles %v need cluster.join or cluster.gossip_listen", ErrConfig, c.Roles)
	}
	return nil
}

// maxShards bounds cluster.shards: a query reads every shard, and the
// fan-out keeps a shard's number in the high bits of a cell ID.
const maxShards = 256

// BuildSchema returns the configured schema. A config that declares no
// family runs the embedded default families, at its own resolutions if it
// names any.
func (c *Config) BuildSchema() (*schema.Schema, error) {
	f := c.Schema
	if len(f.Families) == 0 {
		f.Families = schema.DefaultFile().Families
	}
	return f.Build()
}

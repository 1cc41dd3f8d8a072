package node

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/schema"
)

// Config is a node's YAML configuration. Every field has a default, so an
// empty file (or none) runs an all-in-one node on the embedded schema.
type Config struct {
	// DataDir holds the cube store (in cube/) and the aggregator's
	// write-ahead log (in wal/). The default is ./data.
	DataDir string `yaml:"data_dir"`
	// GRPCListen is the address of the public gRPC server: publishers'
	// pushes and OTLP metrics exports, nothing else. The cluster's own
	// calls go to cluster.internal_listen. The default is 127.0.0.1:9400.
	GRPCListen string `yaml:"grpc_listen"`
	// HTTPListen is the address of the HTTP server (the Prometheus API, the
	// cube slices, OTLP/HTTP's POST /v1/metrics and /metrics). The default
	// is 127.0.0.1:9401.
	HTTPListen string `yaml:"http_listen"`
	// TLS, when it names a certificate and key, serves the public gRPC and
	// HTTP listeners over TLS; with a ca_file too, every client must
	// present a certificate that CA signed. The default is none: plain
	// text, for a node on loopback.
	TLS TLSConfig `yaml:"tls"`
	// Auth, when it names a credentials file, requires a credential with
	// the right to each call on the public listeners (see docs/security.md).
	// The default is none: anyone who reaches them may push and query.
	Auth AuthConfig `yaml:"auth"`
	// ReloadInterval is how often the credentials file, the certificates
	// and the gossip keys are looked at, and read again when they changed,
	// so that credentials rotate without a restart (SIGHUP reads them at
	// once). The default is 10s.
	ReloadInterval model.Duration `yaml:"reload_interval"`
	// Name identifies the node in flush identities and logs. The default is
	// the host name.
	Name string `yaml:"name"`
	// MaxBatchBytes bounds one message on the public gRPC listener, and
	// the body of an OTLP/HTTP export: the bytes of one batch,
	// decompressed. A larger one is refused with gRPC ResourceExhausted
	// (and no RetryInfo: no retry mends it) or HTTP 413. The default is
	// 16 MiB.
	MaxBatchBytes int `yaml:"max_batch_bytes"`
	// MaxRecvBytes bounds one gRPC message between members on the internal
	// listener (flushes, forwarded batches, reads). The default is 64 MiB.
	MaxRecvBytes int `yaml:"max_recv_bytes"`
	// MemoryLimit is the soft memory limit of the Go runtime
	// (runtime/debug.SetMemoryLimit): as the heap nears it, the collector
	// runs more often instead of letting the heap grow to twice what is
	// live, so that the node's resident memory follows what its bounds
	// (store.head_max_bytes, aggregator.max_pending_bytes, the windows of
	// the cube) let it hold. The default is 768 MiB, or what the GOMEMLIMIT
	// environment variable says; a negative value sets no limit. See
	// docs/operations.md, "Sizing".
	MemoryLimit int64 `yaml:"memory_limit"`
	// MinFreeBytes is the free-space floor of data_dir's filesystems:
	// below it the aggregator refuses batches (gRPC ResourceExhausted with
	// RetryInfo: back-pressure) and the combiner flushes (Unavailable,
	// retried by the aggregators), until space returns, so that the
	// write-ahead log and the store never meet a full disk. The default is
	// 256 MiB.
	MinFreeBytes int64 `yaml:"min_free_bytes"`
	// DebugPprof serves Go's profiles (net/http/pprof) under /debug/pprof/
	// on the HTTP listener, behind the admin right when credentials are
	// configured. The default is false: a profile costs CPU and shows the
	// process's internals.
	DebugPprof bool `yaml:"debug_pprof"`

	// Roles are the roles this node runs: some of aggregator, combiner and
	// query. The default is all three.
	Roles []string `yaml:"roles"`
	// Cluster makes the node a member of a cluster. Without it (no join
	// address and no gossip address) the node is standalone and must run
	// every role.
	Cluster ClusterConfig `yaml:"cluster"`

	Aggregator AggregatorConfig `yaml:"aggregator"`
	Store      StoreConfig      `yaml:"store"`
	Query      QueryConfig      `yaml:"query"`
	// Schema declares the families and resolutions. When it names no
	// family, the embedded default schema is used.
	Schema schema.File `yaml:"schema"`

	// Flags are the command-line flags the node was started with, by
	// name, as /api/v1/status/flags reports them; not read from YAML.
	Flags map[string]string `yaml:"-"`
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
	// defaults are 256 and 2048; neither may exceed 1 MiB.
	MaxLabelNameBytes  int `yaml:"max_label_name_bytes"`
	MaxLabelValueBytes int `yaml:"max_label_value_bytes"`
	// WALMaxBytes bounds the write-ahead log in data_dir/wal; past it Push
	// refuses batches (gRPC ResourceExhausted) until the combiners take
	// the windows it holds. The default is 1 GiB.
	WALMaxBytes int64 `yaml:"wal_max_bytes"`
	// MaxPendingBytes bounds the memory of the flushes waiting for the
	// combiners; past it Push refuses batches (gRPC ResourceExhausted with
	// RetryInfo) until the store catches up. The default is 64 MiB.
	MaxPendingBytes int64 `yaml:"max_pending_bytes"`
	// WALSegmentBytes is the size of one log segment file; the log drops
	// whole segments once the combiners took what they hold. The default
	// is 64 MiB.
	WALSegmentBytes int64 `yaml:"wal_segment_bytes"`
	// WALDisabled runs the aggregator without a write-ahead log: a batch is
	// acknowledged once it is in memory, and a crash loses what was not
	// yet flushed. For benchmarks that measure the cube alone.
	WALDisabled bool `yaml:"wal_disabled"`
}

// StoreConfig mirrors the combiner's store options (tsdb.Options); zero
// fields take their defaults.
type StoreConfig struct {
	// HeadMaxBytes bounds the memory of the store's open rows, the head:
	// past three quarters of it the oldest rows are written before their
	// span ends, past all of it flushes wait, which makes the aggregators
	// refuse batches once they hold max_pending_bytes. The default is
	// 256 MiB.
	HeadMaxBytes int64 `yaml:"head_max_bytes"`
	// HeadHold is how long a row stays open after its span ends, for late
	// windows. The default is 1m.
	HeadHold model.Duration `yaml:"head_hold"`
}

// ClusterConfig configures membership and how the cube is split.
type ClusterConfig struct {
	// GossipListen is the memberlist address (TCP and UDP). Setting it or
	// Join makes the node a cluster member. The default, for a member, is
	// the gRPC host with port 9402.
	GossipListen string `yaml:"gossip_listen"`
	// InternalListen is the address of the internal gRPC server, where the
	// other members send flushes, forwarded batches and shard reads; with
	// TLS, only members reach it. The default is the gRPC host with port
	// 9403. A node outside a cluster serves these calls in its own
	// process, on no port at all.
	InternalListen string `yaml:"internal_listen"`
	// TLS is mutual TLS between members on the internal listener: ca_file
	// is the cluster's CA, which signs every member's certificate (for both
	// server and client use, naming the addresses it is reached at), and
	// a call without a certificate it signed is refused in the handshake.
	// Required of a member unless Insecure.
	TLS TLSConfig `yaml:"tls"`
	// GossipKeyFile holds the keys that encrypt and authenticate gossip
	// (base64, one a line, 16, 24 or 32 bytes; the first encrypts, each
	// decrypts): a host without one can neither join nor read the
	// membership. It is read again on reload. Required of a member unless
	// Insecure.
	GossipKeyFile string `yaml:"gossip_key_file"`
	// Insecure runs a cluster member without TLS on the internal listener
	// and with gossip in clear: anyone who reaches those ports can write
	// into the cube. Only for a network no one else reaches, and tests.
	// The default is false.
	Insecure bool `yaml:"insecure"`
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
	// HandoverAfter is how long an aggregator stays dead before its keys
	// move to the others: then the batches for its hosts are counted by
	// their new owners, and what the others hold for it goes to them. Until
	// then they wait for it, in case it comes back. The default is 1m.
	HandoverAfter model.Duration `yaml:"handover_after"`
	// CompareInterval is how often a combiner compares the shards it holds
	// with their other replicas, by digests of what they hold where no
	// flush can change it any more (docs/architecture.md, "Replicas
	// compare themselves"); the first pass is 30s after it starts. A pass
	// reads the store once a resolution, and once more for each replica
	// that compares with it. The default is 1h.
	CompareInterval model.Duration `yaml:"compare_interval"`
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

// AuthConfig configures the credentials of the public listeners.
type AuthConfig struct {
	// CredentialsFile is a YAML file of credentials (bearer tokens and
	// basic auth users, each with its rights: push, query, admin; see
	// package auth). Once set, a call on the public listeners without a
	// credential that holds its right is refused before any work is done.
	// It is read again when it changes. The default is none.
	CredentialsFile string `yaml:"credentials_file"`
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
		return Config{}, configError(err)
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
	if c.MemoryLimit == 0 && os.Getenv("GOMEMLIMIT") == "" {
		c.MemoryLimit = 768 << 20
	}
	if c.MaxBatchBytes == 0 {
		c.MaxBatchBytes = 16 << 20
	}
	if c.MinFreeBytes == 0 {
		c.MinFreeBytes = 256 << 20
	}
	if c.ReloadInterval == 0 {
		c.ReloadInterval = model.Duration(10 * time.Second)
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
	if cl.HandoverAfter == 0 {
		cl.HandoverAfter = model.Duration(time.Minute)
	}
	if cl.CompareInterval == 0 {
		cl.CompareInterval = model.Duration(time.Hour)
	}
	if c.Clustered() {
		if host, _, err := net.SplitHostPort(c.GRPCListen); err == nil {
			if cl.GossipListen == "" {
				cl.GossipListen = net.JoinHostPort(host, "9402")
			}
			if cl.InternalListen == "" {
				cl.InternalListen = net.JoinHostPort(host, "9403")
			}
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
	case c.Aggregator.WALMaxBytes < 0 || c.Aggregator.WALSegmentBytes < 0:
		return fmt.Errorf("%w: aggregator wal_max_bytes %d or wal_segment_bytes %d is negative", ErrConfig, c.Aggregator.WALMaxBytes, c.Aggregator.WALSegmentBytes)
	case c.Aggregator.MaxPendingBytes < 0:
		return fmt.Errorf("%w: aggregator max_pending_bytes %d is negative", ErrConfig, c.Aggregator.MaxPendingBytes)
	case c.Store.HeadMaxBytes < 0:
		return fmt.Errorf("%w: store head_max_bytes %d is negative", ErrConfig, c.Store.HeadMaxBytes)
	case c.Store.HeadHold < 0:
		return fmt.Errorf("%w: store head_hold %s is negative", ErrConfig, c.Store.HeadHold)
	case c.MaxRecvBytes < 0:
		return fmt.Errorf("%w: max_recv_bytes %d is negative", ErrConfig, c.MaxRecvBytes)
	case c.MaxBatchBytes < 0:
		return fmt.Errorf("%w: max_batch_bytes %d is negative", ErrConfig, c.MaxBatchBytes)
	case c.MinFreeBytes < 0:
		return fmt.Errorf("%w: min_free_bytes %d is negative", ErrConfig, c.MinFreeBytes)
	case c.ReloadInterval < 0:
		return fmt.Errorf("%w: reload_interval %s is negative", ErrConfig, c.ReloadInterval)
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
	case c.Aggregator.MaxLabelNameBytes > aggregator.LabelBytesCeiling || c.Aggregator.MaxLabelValueBytes > aggregator.LabelBytesCeiling:
		return fmt.Errorf("%w: aggregator max_label_name_bytes %d or max_label_value_bytes %d is over %d (1 MiB)", ErrConfig, c.Aggregator.MaxLabelNameBytes, c.Aggregator.MaxLabelValueBytes, aggregator.LabelBytesCeiling)
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
	if err := c.TLS.validate("tls", false); err != nil {
		return err
	}
	return c.validateCluster()
}

// validateCluster checks the cluster's trust settings: a member proves
// itself with TLS and the gossip key, unless insecure; a node alone has no
// use for either.
func (c *Config) validateCluster() error {
	cl := c.Cluster
	if !c.Clustered() {
		if cl.InternalListen != "" || cl.TLS.enabled() || cl.GossipKeyFile != "" || cl.Insecure {
			return fmt.Errorf("%w: cluster.internal_listen, tls, gossip_key_file and insecure need a cluster (cluster.join or cluster.gossip_listen); a node alone serves its internal calls in its own process", ErrConfig)
		}
		return nil
	}
	if cl.Insecure {
		if cl.TLS.enabled() || cl.GossipKeyFile != "" {
			return fmt.Errorf("%w: cluster.insecure excludes cluster.tls and cluster.gossip_key_file", ErrConfig)
		}
		return nil
	}
	if !cl.TLS.enabled() || cl.GossipKeyFile == "" {
		return fmt.Errorf("%w: %v", ErrConfig, errNoTLS)
	}
	return cl.TLS.validate("cluster.tls", true)
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

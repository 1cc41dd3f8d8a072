package node

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"

	"github.com/dimsum/dimsum/schema"
)

// Config is a node's YAML configuration. Every field has a default, so an
// empty file (or none) runs an all-in-one node on the embedded schema.
type Config struct {
	// DataDir holds the cube store (in cube/) and the aggregator's
	// write-ahead log (in wal/). The default is ./data.
	DataDir string `yaml:"data_dir"`
	// GRPCListen is the address of the gRPC server (Push and Flush). The
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
	// WALMaxBytes bounds the write-ahead log in data_dir/wal; past it Push
	// refuses batches (gRPC ResourceExhausted) until the combiners take
	// the windows it holds. The default is 1 GiB.
	WALMaxBytes int64 `yaml:"wal_max_bytes"`
	// WALDisabled runs the aggregator without a write-ahead log: a batch is
	// acknowledged once it is in memory, and a crash loses what was not
	// yet flushed. For benchmarks that measure the cube alone.
	WALDisabled bool `yaml:"wal_disabled"`
}

// QueryConfig mirrors query.Options; zero fields take its defaults.
type QueryConfig struct {
	Timeout       model.Duration `yaml:"timeout"`        // default 2m
	MaxSamples    int            `yaml:"max_samples"`    // default 50000000
	MaxSeries     int            `yaml:"max_series"`     // default 1000000
	LookbackDelta model.Duration `yaml:"lookback_delta"` // default 5m
	MaxGroups     int            `yaml:"max_groups"`     // default 10000, groups of one cube slice
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
}

// Validate reports the first node-level or query field that cannot work; the
// aggregator and the schema check their own fields when they are built.
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
	}
	return nil
}

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

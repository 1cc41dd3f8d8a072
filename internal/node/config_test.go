package node

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/schema"
)

func TestParseConfig(t *testing.T) {
	c, err := ParseConfig([]byte("data_dir: /x\naggregator: {grace: 2s}\nschema: {resolutions: [1s:1d, 1m:35d]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.DataDir != "/x" || c.Aggregator.Grace.String() != "2s" || len(c.Schema.Resolutions) != 2 {
		t.Errorf("config %+v", c)
	}
	s, err := c.BuildSchema()
	if err != nil || s.Family("requests") == nil || s.Window().String() != "1s" {
		t.Errorf("schema without families: %v, %v", s, err)
	}
	if c, err := ParseConfig([]byte("aggregator: {wal_max_bytes: 1000, wal_disabled: true}")); err != nil || c.Aggregator.WALMaxBytes != 1000 || !c.Aggregator.WALDisabled {
		t.Errorf("log fields: %+v, %v", c.Aggregator, err)
	}
	if c, err := ParseConfig(nil); err != nil || c.DataDir != "" {
		t.Errorf("empty config: %+v, %v", c, err)
	}
	c, err = ParseConfig([]byte("grpc_listen: 10.0.0.5:9400\nroles: [combiner]\ncluster: {join: [10.0.0.4:9402], insecure: true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	c.EnsureDefaults()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if !c.Clustered() || c.Cluster.GossipListen != "10.0.0.5:9402" || c.Cluster.InternalListen != "10.0.0.5:9403" || c.Cluster.Shards != 64 || c.Cluster.Replication != 2 ||
		c.Cluster.HandoverAfter != model.Duration(time.Minute) ||
		!c.HasRole(cluster.RoleCombiner) || c.HasRole(cluster.RoleQuery) {
		t.Errorf("cluster member's defaults: %+v", c)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown field", "datadir: x", `line 1: unknown key "datadir" in the top level; did you mean "data_dir"?`},
		{"misspelt listener", "data_dir: x\nhttp_listn: :1", `line 2: unknown key "http_listn" in the top level; did you mean "http_listen"?`},
		{"unknown nested field", "aggregator:\n  grace: 1s\n  gracce: 2s", `line 3: unknown key "gracce" in aggregator; did you mean "grace"?`},
		{"unknown TLS field", "cluster: {tls: {certfile: x}}", `unknown key "certfile" in tls or cluster.tls; did you mean "cert_file"?`},
		{"unknown family field", "schema: {families: [{name: a, dims: [b]}]}", `unknown key "dims" in schema.families (its keys: `},
		{"bad duration", "aggregator: {grace: soon}", "soon"},
		{"negative message size", "max_recv_bytes: -1", "max_recv_bytes"},
		{"negative max samples", "query: {max_samples: -5}", "max_samples"},
		{"negative log bound", "aggregator: {wal_max_bytes: -1}", "wal_max_bytes"},
		{"negative duration", "query: {timeout: -1s}", `"-1s"`},
		{"unknown role", "roles: [aggregator, mixer]\ncluster: {join: [a:1]}", `"mixer"`},
		{"role twice", "roles: [query, query]\ncluster: {join: [a:1]}", "twice"},
		{"standalone with some roles", "roles: [query]", "every role"},
		{"too many shards", "cluster: {shards: 1000}", "shards 1000"},
		{"negative replication", "cluster: {replication: -1}", "replication -1"},
		{"bad timing", "cluster: {timing: slow}", `"slow"`},
		{"negative hand-over", "cluster: {handover_after: -1s}", `"-1s"`},
		{"combiner named twice", "cluster: {combiners: [c1, c1]}", "distinct"},
		{"member without trust", "cluster: {join: [a:1]}", "cluster.insecure: true"},
		{"member with TLS but no gossip key", "cluster: {join: [a:1], tls: {ca_file: ca, cert_file: c, key_file: k}}", "gossip_key_file"},
		{"member TLS without a CA", "cluster: {join: [a:1], gossip_key_file: g, tls: {cert_file: c, key_file: k}}", "needs ca_file"},
		{"insecure with TLS", "cluster: {join: [a:1], insecure: true, gossip_key_file: g}", "excludes"},
		{"cluster settings alone", "cluster: {internal_listen: 127.0.0.1:9403}", "need a cluster"},
		{"insecure alone", "cluster: {insecure: true}", "need a cluster"},
		{"certificate without key", "tls: {cert_file: c}", "both cert_file and key_file"},
		{"CA without certificate", "tls: {ca_file: ca}", "ca_file needs cert_file"},
		{"negative floor", "min_free_bytes: -1", "min_free_bytes"},
		{"negative batch bytes", "max_batch_bytes: -1", "max_batch_bytes"},
		{"negative label limit", "aggregator: {max_label_value_bytes: -1}", "max_label_value_bytes"},
		{"label limit too large", "aggregator: {max_label_name_bytes: 16777216}", "over 1048576"},
		{"negative query length", "query: {max_query_length: -1}", "max_query_length"},
		{"negative reload interval", "reload_interval: -1s", `"-1s"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.yaml))
			if err == nil {
				err = c.Validate()
			}
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want ErrConfig mentioning %q", err, tc.want)
			}
		})
	}
}

// FuzzParseConfig checks that no config file panics the parser or the
// schema builder, and that every refusal is classified.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("data_dir: d\naggregator: {grace: 1s}\nschema: {families: [{name: r, dimensions: [a/b, c]}]}\n"))
	f.Add([]byte("query: {timeout: 5m, max_samples: 10}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if err := c.Validate(); err != nil && !errors.Is(err, ErrConfig) {
			t.Fatalf("unclassified error %v", err)
		}
		if _, err := c.BuildSchema(); err != nil && !errors.Is(err, schema.ErrInvalid) {
			t.Fatalf("unclassified schema error %v", err)
		}
	})
}

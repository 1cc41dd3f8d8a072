package node

import (
	"net/http"
	"slices"
	"time"

	"github.com/dimsum/dimsum/cluster"
	"github.com/dimsum/dimsum/query"
)

// clusterStatus is the answer of /api/v1/status/cluster.
type clusterStatus struct {
	Self        string          `json:"self"`
	Clustered   bool            `json:"clustered"`
	ShardCount  int             `json:"shardCount"`
	Replication int             `json:"replication"`
	Members     []memberStatus  `json:"members"`
	Shards      []shardReplicas `json:"shards"`
	// Gaps are what answers may lack, by aggregator: the events no
	// combiner may hold yet, which every answer reading the cube warns of.
	Gaps []gapStatus `json:"gaps"`
}

type gapStatus struct {
	Aggregator string `json:"aggregator"`
	Down       bool   `json:"down"`
	// HandedOver says its keys moved to the others: the batches for its
	// hosts no longer wait for it.
	HandedOver bool     `json:"handedOver"`
	WaitingAt  []string `json:"waitingAt"`
}

type memberStatus struct {
	Name           string    `json:"name"`
	Addr           string    `json:"addr,omitempty"`
	Roles          []string  `json:"roles"`
	State          string    `json:"state"`
	Since          time.Time `json:"since"`
	GRPC           string    `json:"grpc,omitempty"`
	HTTP           string    `json:"http,omitempty"`
	Started        time.Time `json:"started"`
	PendingHandoff []string  `json:"pendingHandoff,omitempty"`
}

type shardReplicas struct {
	Shard    int             `json:"shard"`
	Replicas []replicaStatus `json:"replicas"`
}

type replicaStatus struct {
	Name  string `json:"name"`
	State string `json:"state"`
	// Behind says some aggregator holds flushes for the replica.
	Behind bool `json:"behind"`
	// Lacking says the replica found it holds less of the shard than
	// another when it compared them.
	Lacking bool `json:"lacking"`
}

// serveClusterStatus answers with this node's view of the cluster: its
// members, and the combiners holding each shard. A node outside a cluster
// reports itself alone, holding the one shard.
func (n *Node) serveClusterStatus(w http.ResponseWriter, _ *http.Request) {
	st := clusterStatus{Self: n.cfg.Name, Clustered: n.member != nil, ShardCount: 1, Replication: 1, Gaps: []gapStatus{}}
	if n.member == nil {
		st.Members = []memberStatus{{Name: n.cfg.Name, Roles: n.cfg.Roles, State: cluster.StateAlive.String(),
			GRPC: n.GRPCAddr(), HTTP: n.HTTPAddr()}}
		st.Shards = []shardReplicas{{Shard: 0, Replicas: []replicaStatus{{Name: n.cfg.Name, State: cluster.StateAlive.String()}}}}
	} else {
		st.ShardCount, st.Replication = n.cfg.Cluster.Shards, n.cfg.Cluster.Replication
		for _, m := range n.member.Members() {
			roles := make([]string, len(m.Meta.Roles))
			for i, r := range m.Meta.Roles {
				roles[i] = string(r)
			}
			st.Members = append(st.Members, memberStatus{Name: m.Name, Addr: m.Addr, Roles: roles, State: m.State.String(), Since: m.Since,
				GRPC: m.Meta.GRPCAddr, HTTP: m.Meta.HTTPAddr, Started: m.Meta.Started, PendingHandoff: slices.Clone(m.Meta.PendingHandoff)})
		}
		view := n.topo.view.Load()
		for shard := range n.cfg.Cluster.Shards {
			sr := shardReplicas{Shard: shard, Replicas: []replicaStatus{}}
			for _, name := range n.topo.placement(shard) {
				sr.Replicas = append(sr.Replicas, replicaStatus{Name: name, State: view.state[name].String(), Behind: view.behind[name], Lacking: view.lacking[name][shard]})
			}
			st.Shards = append(st.Shards, sr)
		}
		for _, g := range view.gaps {
			st.Gaps = append(st.Gaps, gapStatus{Aggregator: g.Aggregator, Down: g.Down, HandedOver: view.handedOver[g.Aggregator],
				WaitingAt: append([]string{}, g.WaitingAt...)})
		}
	}
	query.WriteSuccess(w, st)
}

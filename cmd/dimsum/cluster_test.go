package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// clusterConfig is every test member's config, given the names of the
// combiners and further cluster settings: a 1s window so that data reaches
// the combiners quickly, memberlist's fast timings, and few shards so that
// each combiner holds several of them twice.
const clusterConfig = `aggregator: {grace: 1s, flush_interval: 100ms}
cluster: {timing: fast, shards: 8, replication: 2, combiners: [%s], insecure: true%s}
schema: {resolutions: [1s:1d, 1m:35d]}
`

// member is one dimsum process of a test cluster.
type member struct {
	name, role                            string
	grpc, http, gossip, internal, dataDir string
	cmd                                   *exec.Cmd
	exited                                chan struct{} // closed once cmd has exited
	log                                   *os.File
}

type testCluster struct {
	t       *testing.T
	bin     string
	config  string
	dir     string
	seed    string // the gossip address every member joins
	members map[string]*member
}

// newTestCluster makes a test cluster whose combiners are the members of
// the given names.
func newTestCluster(t *testing.T, combiners ...string) *testCluster {
	return newTestClusterWith(t, "", combiners...)
}

// newTestClusterWith is newTestCluster with more cluster settings, each
// with a leading ", " (YAML flow style).
func newTestClusterWith(t *testing.T, settings string, combiners ...string) *testCluster {
	dir := t.TempDir()
	config := writeConfig(t, dir, fmt.Sprintf(clusterConfig, strings.Join(combiners, ", "), settings))
	c := &testCluster{t: t, bin: dimsumBinary(t), config: config, dir: dir, members: map[string]*member{}}
	t.Cleanup(func() {
		for _, m := range c.members {
			if m.cmd != nil {
				m.cmd.Process.Kill()
				<-m.exited
			}
		}
		if t.Failed() {
			for _, m := range c.members {
				if data, err := os.ReadFile(m.log.Name()); err == nil {
					t.Logf("log of %s:\n%s", m.name, tail(string(data), 40))
				}
			}
		}
	})
	return c
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}

// threeOneDown starts three nodes with every role, n1 to n3 (each a
// combiner), waits until n1 and n3 see them all alive, and kills n2 with
// SIGKILL.
func threeOneDown(t *testing.T, settings string) (c *testCluster, n1, n2, n3 *member) {
	t.Helper()
	c = newTestClusterWith(t, settings, "n1", "n2", "n3")
	for i := 1; i <= 3; i++ {
		c.add(fmt.Sprint("n", i), "all")
	}
	n1, n2, n3 = c.members["n1"], c.members["n2"], c.members["n3"]
	c.alive(n1)
	c.alive(n3)
	c.kill(n2)
	return c, n1, n2, n3
}

// add starts a new member with one role.
func (c *testCluster) add(name, role string) *member {
	m := &member{name: name, role: role, dataDir: filepath.Join(c.dir, name)}
	m.pickAddrs(c.t)
	if c.seed == "" {
		c.seed = m.gossip
	}
	c.members[name] = m
	c.start(m)
	return m
}

// pickAddrs gives m free loopback ports.
func (m *member) pickAddrs(t *testing.T) {
	m.grpc, m.http, m.gossip, m.internal = freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
}

// start runs (or runs again) a member's process and waits until it serves
// HTTP. A port freeAddr found free may be taken by the time the process
// binds it (by any connection's local port, with other tests running):
// then the member starts again on other ports, as a node moved to another
// address would.
func (c *testCluster) start(m *member) {
	c.t.Helper()
	var err error
	if m.log == nil {
		if m.log, err = os.Create(filepath.Join(c.dir, m.name+".log")); err != nil {
			c.t.Fatal(err)
		}
	}
	for attempt := 1; ; attempt++ {
		logged, err := m.log.Seek(0, io.SeekEnd)
		if err != nil {
			c.t.Fatal(err)
		}
		join := c.seed
		if join == m.gossip {
			join = c.otherGossip(m)
		}
		m.cmd = exec.Command(c.bin, m.role, "-config", c.config, "-name", m.name, "-data", m.dataDir,
			"-grpc", m.grpc, "-http", m.http, "-gossip", m.gossip, "-internal", m.internal, "-join", join)
		m.cmd.Stdout, m.cmd.Stderr = m.log, m.log
		if err := m.cmd.Start(); err != nil {
			c.t.Fatal(err)
		}
		m.exited = make(chan struct{})
		go func(cmd *exec.Cmd, exited chan struct{}) {
			cmd.Wait()
			close(exited)
		}(m.cmd, m.exited)
		exited := false
		waitFor(c.t, m.name+" to serve HTTP", func() bool {
			select {
			case <-m.exited:
				exited = true
				return true
			default:
				return healthy(http.DefaultClient, "http://"+m.http)
			}
		})
		if !exited {
			return
		}
		m.cmd = nil
		out, _ := os.ReadFile(m.log.Name())
		if attempt == 3 || !strings.Contains(string(out[min(int(logged), len(out)):]), "address already in use") {
			c.t.Fatalf("%s exited at start", m.name)
		}
		seed := c.seed == m.gossip
		m.pickAddrs(c.t)
		if seed {
			c.seed = m.gossip
		}
	}
}

// otherGossip returns the gossip address of a running member other than m,
// for m to join through; m's own when there is none.
func (c *testCluster) otherGossip(m *member) string {
	for _, o := range c.members {
		if o != m && o.cmd != nil {
			return o.gossip
		}
	}
	return m.gossip
}

// kill stops a member with SIGKILL.
func (c *testCluster) kill(m *member) {
	c.t.Helper()
	if err := m.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		c.t.Fatal(err)
	}
	<-m.exited
	m.cmd = nil
}

// status reads a member's view of the cluster.
func (c *testCluster) status(m *member) (clusterStatus, error) {
	var st struct {
		Data clusterStatus `json:"data"`
	}
	resp, err := http.Get("http://" + m.http + "/api/v1/status/cluster")
	if err != nil {
		return st.Data, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st.Data, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return st.Data, json.NewDecoder(resp.Body).Decode(&st)
}

type clusterStatus struct {
	Members []memberState `json:"members"`
	Shards  []struct {
		Shard    int `json:"shard"`
		Replicas []struct {
			Name   string `json:"name"`
			State  string `json:"state"`
			Behind bool   `json:"behind"`
		} `json:"replicas"`
	} `json:"shards"`
	Gaps []struct {
		Aggregator string   `json:"aggregator"`
		Down       bool     `json:"down"`
		HandedOver bool     `json:"handedOver"`
		WaitingAt  []string `json:"waitingAt"`
	} `json:"gaps"`
}

type memberState struct {
	Name  string   `json:"name"`
	Roles []string `json:"roles"`
	State string   `json:"state"`
}

// alive waits until m sees every member alive.
func (c *testCluster) alive(m *member) {
	c.t.Helper()
	waitFor(c.t, m.name+" to see every member alive", func() bool {
		st, err := c.status(m)
		if err != nil {
			return false
		}
		n := 0
		for _, mm := range st.Members {
			if mm.State == "alive" {
				n++
			}
		}
		return n == len(c.members)
	})
}

// sliceTotals asks the node at httpAddr for the exact sum of requests by
// datacenter over the last hour, and the count of events in all; a partial
// answer is an error.
func sliceTotals(httpAddr, since string) (sums map[string]float64, count float64, err error) {
	q := url.Values{"family": {"requests"}, "by": {"datacenter"}, "since": {since}, "measures": {"sum,count"}, "partial_response": {"false"}}
	resp, err := http.Get("http://" + httpAddr + "/api/v1/cube/slice?" + q.Encode())
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	var r struct {
		Data struct {
			Groups []struct {
				Labels map[string]string  `json:"labels"`
				Values map[string]float64 `json:"values"`
			} `json:"groups"`
		} `json:"data"`
		Error string `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("HTTP %d: %s", resp.StatusCode, r.Error)
	}
	sums = map[string]float64{}
	for _, g := range r.Data.Groups {
		sums[g.Labels["datacenter"]] = g.Values["sum"]
		count += g.Values["count"]
	}
	return sums, count, nil
}

// loadReport is what a load's -report file says was acknowledged.
type loadReport struct {
	Accepted     uint64                        `json:"accepted"`
	ByDatacenter map[string]map[string]float64 `json:"by_datacenter"`
}

// readReport reads a load's -report file, which must acknowledge events.
func readReport(t *testing.T, path string) loadReport {
	t.Helper()
	var rep loadReport
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Accepted == 0 || len(rep.ByDatacenter["requests"]) == 0 {
		t.Fatalf("the load acknowledged nothing: %s", data)
	}
	return rep
}

// exact waits, for up to 40s, until the slice API of m answers, whole,
// want by datacenter and accepted events over the last hour.
func (c *testCluster) exact(m *member, want map[string]float64, accepted uint64) {
	c.t.Helper()
	var got map[string]float64
	var count float64
	var err error
	deadline := time.Now().Add(40 * time.Second)
	for {
		got, count, err = sliceTotals(m.http, "1h")
		if err == nil && maps.Equal(got, want) && count == float64(accepted) {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("read back %v with %v events (err %v); acknowledged %v with %d events", got, count, err, want, accepted)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestClusterSIGKILL runs three aggregators, three combiners with
// replication 2 and a query node as real processes, drives the load command
// through the aggregators, kills one aggregator and one combiner with
// SIGKILL in the middle of the load, restarts them, and checks that the
// totals read back through the query node equal every acknowledged event,
// exactly, per datacenter and overall.
func TestClusterSIGKILL(t *testing.T) {
	c := newTestCluster(t, "c1", "c2", "c3")
	for i := 1; i <= 3; i++ {
		c.add(fmt.Sprint("c", i), "combiner")
	}
	for i := 1; i <= 3; i++ {
		c.add(fmt.Sprint("a", i), "aggregator")
	}
	q := c.add("q", "query")
	c.alive(q)

	report := filepath.Join(c.dir, "report.json")
	aggs := strings.Join([]string{c.members["a1"].grpc, c.members["a2"].grpc, c.members["a3"].grpc}, ",")
	load := exec.Command(c.bin, "load", "-addr", aggs, "-http", q.http, "-events", "150000", "-rate", "10000", "-diurnal", "-1",
		"-batch", "500", "-late-bound", "30s", "-seed", "11", "-report", report)
	loadLog, err := os.Create(filepath.Join(c.dir, "load.log"))
	if err != nil {
		t.Fatal(err)
	}
	load.Stdout, load.Stderr = loadLog, loadLog
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- load.Wait() }()

	time.Sleep(4 * time.Second)
	a2, c2 := c.members["a2"], c.members["c2"]
	c.kill(a2)
	c.kill(c2)
	time.Sleep(2 * time.Second)
	c.start(a2)
	c.start(c2)

	select {
	case err := <-done:
		if err != nil {
			out, _ := os.ReadFile(loadLog.Name())
			t.Fatalf("dimsum load: %v\n%s", err, tail(string(out), 30))
		}
	case <-time.After(90 * time.Second):
		load.Process.Kill()
		t.Fatal("the load did not finish in 90s")
	}
	rep := readReport(t, report)
	want := rep.ByDatacenter["requests"]

	// Every acknowledged event, exactly once, once the windows are flushed
	// and the restarted combiner has caught up.
	c.exact(q, want, rep.Accepted)
	t.Logf("%d acknowledged events read back exactly through the query node", rep.Accepted)

	// Once the restarted combiner has caught up (no aggregator holds
	// flushes for it) and the last flushes have reached both replicas, one
	// combiner down leaves every shard a whole replica: answers stay
	// complete.
	// A request counts as behind once it has waited a second, so the view
	// must stay clear for longer than that.
	quiet := 0
	waitFor(c.t, "every replica to have caught up", func() bool {
		quiet++
		st, err := c.status(q)
		if err != nil {
			quiet = 0
		}
		for _, sh := range st.Shards {
			for _, r := range sh.Replicas {
				if r.Behind {
					quiet = 0
				}
			}
		}
		return quiet > 20 // 2s at the poll's 100ms
	})
	c.kill(c.members["c3"])
	if got, count, err := sliceTotals(q.http, "1h"); err != nil || !maps.Equal(got, want) || count != float64(rep.Accepted) {
		t.Fatalf("with c3 down: %v, %v events, %v", got, count, err)
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// answer asks a node's HTTP API and returns the status, the warnings (of
// the Prometheus envelope, or of a slice) and the error it answered.
func answer(t *testing.T, httpAddr, path string, p url.Values) (int, []string, string) {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + path + "?" + p.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env struct {
		Warnings []string        `json:"warnings"`
		Error    string          `json:"error"`
		Data     json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var slice struct {
		Warnings []string `json:"warnings"`
	}
	json.Unmarshal(env.Data, &slice) // a slice's warnings are in its data; other data is no object
	return resp.StatusCode, append(env.Warnings, slice.Warnings...), env.Error
}

// TestClusterMemberDown runs three nodes with every role, kills one with
// SIGKILL and keeps it down. Meanwhile `dimsum load -verify`, started right
// after the kill, reads through the survivors and says it cannot be exact
// because of the dead node, rather than report data lost; every answer
// names what it lacks (the dead aggregator, and where the events of its
// hosts wait), or is refused with 503 under partial_response=false; and
// the cluster status lists the node as dead. Once the node is back, the
// warnings go and the totals are exact.
func TestClusterMemberDown(t *testing.T) {
	c, n1, n2, n3 := threeOneDown(t, "")

	report := filepath.Join(c.dir, "report.json")
	out, err := exec.Command(c.bin, "load", "-addr", n1.grpc+","+n3.grpc, "-http", n1.http, "-events", "3000", "-batch", "300",
		"-seed", "21", "-late", "-1", "-verify", "-window", "1s", "-verify-timeout", "4s", "-report", report).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cannot verify exactly: the answers say they may lack data") ||
		!strings.Contains(string(out), "aggregator n2 is down") {
		t.Fatalf("load -verify with n2 down: %v, want it to say why it cannot be exact\n%s", err, tail(string(out), 20))
	}
	t.Logf("load -verify with n2 down:\n%s", tail(string(out), 8))
	rep := readReport(t, report)

	// The survivors list n2 as dead, and what answers lack for it.
	for _, m := range []*member{n1, n3} {
		st, err := c.status(m)
		if err != nil {
			t.Fatalf("status of %s with n2 down: %v", m.name, err)
		}
		i := slices.IndexFunc(st.Members, func(mm memberState) bool { return mm.Name == "n2" })
		if i < 0 || st.Members[i].State != "dead" || len(st.Gaps) != 1 || st.Gaps[0].Aggregator != "n2" || !st.Gaps[0].Down {
			t.Errorf("%s lists n2 as %+v, gaps %+v; want it dead, with its gap", m.name, st.Members, st.Gaps)
		}
	}

	// Every answer that reads the cube names what it lacks, once the
	// survivors gossip where n2's events wait.
	now := func(d time.Duration) string { return fmt.Sprint(time.Now().Add(d).Unix()) }
	// names reports whether warnings name n2 and where its events wait.
	names := func(warnings []string) bool {
		return slices.ContainsFunc(warnings, func(w string) bool {
			return strings.HasPrefix(w, "aggregator n2 is down: the events it took and had not yet flushed or forwarded, and those of its hosts waiting for it at n")
		})
	}
	requests := []struct {
		path string
		p    url.Values
	}{
		{"/api/v1/query", url.Values{"query": {"sum(sum_over_time(requests_delta[1h]))"}}},
		{"/api/v1/query_range", url.Values{"query": {"sum(rate(requests_total[1m]))"}, "start": {now(-10 * time.Minute)}, "end": {now(0)}, "step": {"15"}}},
		{"/api/v1/series", url.Values{"match[]": {`requests_total{datacenter="dc1"}`}}},
		{"/api/v1/label/host/values", url.Values{}},
		{"/api/v1/cube/slice", url.Values{"family": {"requests"}, "by": {"datacenter"}, "since": {"1h"}}},
	}
	waitFor(t, "the answers to say where n2's events wait", func() bool {
		_, ws, _ := answer(t, n3.http, requests[0].path, requests[0].p)
		return names(ws)
	})
	for _, r := range requests {
		for _, m := range []*member{n1, n3} {
			code, ws, e := answer(t, m.http, r.path, r.p)
			if code != http.StatusOK || !names(ws) {
				t.Errorf("%s %s with n2 down: HTTP %d %q, warnings %q; want them to name n2", m.name, r.path, code, e, ws)
			}
			whole := url.Values{"partial_response": {"false"}}
			for k, v := range r.p {
				whole[k] = v
			}
			if code, _, e := answer(t, m.http, r.path, whole); code != http.StatusServiceUnavailable || !strings.Contains(e, "aggregator n2 is down") {
				t.Errorf("%s %s whole with n2 down: HTTP %d %q, want 503 naming n2", m.name, r.path, code, e)
			}
		}
	}

	// n2 comes back: it counts what waited for it, and the answers are
	// whole and exact again.
	c.start(n2)
	waitFor(t, "the warnings to go", func() bool {
		for _, r := range requests {
			if code, ws, _ := answer(t, n1.http, r.path, r.p); code != http.StatusOK || len(ws) > 0 {
				return false
			}
		}
		return true
	})
	if st, err := c.status(n1); err != nil || len(st.Gaps) > 0 {
		t.Errorf("status with n2 back: gaps %+v, %v", st.Gaps, err)
	}
	c.exact(n1, rep.ByDatacenter["requests"], rep.Accepted)
	var sum float64
	for _, v := range rep.ByDatacenter["requests"] {
		sum += v
	}
	if got, ok := total(t, n3.http); !ok || got != sum {
		t.Errorf("the PromQL total through n3 is %v (ok %v), want %v", got, ok, sum)
	}
}

package main

import (
	"maps"
	"net/url"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestClusterHandOver runs three nodes with every role, kills one with
// SIGKILL and keeps it down while a load goes through the others: the
// batches for its hosts wait for it, then, once it has been dead for
// handover_after, go to its keys' new owners, and the totals are exact
// although it is still down (its store is the other replicas', and it took
// none of the load). Answers still warn that it is down, since it might
// have held events of its own. When it comes back, nothing is counted
// twice and the warnings go. Then it is killed again in the middle of a
// load, holding events of its own and parts on their way to it, and kept
// down past its hand-over: once back, it counts once what it held.
func TestClusterHandOver(t *testing.T) {
	c, n1, n2, n3 := threeOneDown(t, ", handover_after: 3s")

	report := filepath.Join(c.dir, "report.json")
	if out, err := exec.Command(c.bin, "load", "-addr", n1.grpc+","+n3.grpc, "-http", n1.http, "-events", "3000", "-batch", "300",
		"-seed", "22", "-late", "-1", "-report", report).CombinedOutput(); err != nil {
		t.Fatalf("dimsum load: %v\n%s", err, tail(string(out), 20))
	}
	rep := readReport(t, report)
	var sum float64
	for _, v := range rep.ByDatacenter["requests"] {
		sum += v
	}

	// Handed over: no batch waits for n2 any more, and every acknowledged
	// event is counted, with n2 still down.
	for _, m := range []*member{n1, n3} {
		waitFor(t, m.name+" to hand n2's keys over", func() bool {
			st, err := c.status(m)
			return err == nil && len(st.Gaps) == 1 && st.Gaps[0].Aggregator == "n2" && st.Gaps[0].Down &&
				st.Gaps[0].HandedOver && len(st.Gaps[0].WaitingAt) == 0
		})
	}
	waitFor(t, "the total through n1 to be exact with n2 down", func() bool {
		got, ok := total(t, n1.http)
		return ok && got == sum
	})
	q := url.Values{"query": {"sum(sum_over_time(requests_delta[1h]))"}}
	_, ws, _ := answer(t, n3.http, "/api/v1/query", q)
	if !slices.ContainsFunc(ws, func(w string) bool {
		return strings.HasPrefix(w, "aggregator n2 is down: the events it took and had not yet flushed or forwarded are in no answer;")
	}) {
		t.Errorf("warnings with n2 down and handed over: %q, want them to say only that n2 is down", ws)
	}

	// n2 comes back empty-handed: its keys return, and nothing counts
	// twice.
	c.start(n2)
	waitFor(t, "the warnings to go", func() bool {
		code, ws, _ := answer(t, n1.http, "/api/v1/query", q)
		return code == 200 && len(ws) == 0
	})
	c.exact(n1, rep.ByDatacenter["requests"], rep.Accepted)
	if got, ok := total(t, n2.http); !ok || got != sum {
		t.Errorf("the total through n2 is %v (ok %v), want %v", got, ok, sum)
	}
	if st, err := c.status(n3); err != nil || len(st.Gaps) > 0 || slices.ContainsFunc(st.Members, func(m memberState) bool {
		return !strings.EqualFold(m.State, "alive")
	}) {
		t.Errorf("status with n2 back: %+v, %v", st, err)
	}

	first := handedOver(t, n1) + handedOver(t, n3)
	if first == 0 {
		t.Errorf("no event was handed over from n2")
	}

	// Now n2 dies in the middle of a load through all three, holding
	// events of its own and with parts on their way to it, and stays down
	// past its hand-over while the load goes on through the others. Once
	// it is back, every event of both loads counts once.
	report2 := filepath.Join(c.dir, "report2.json")
	load := exec.Command(c.bin, "load", "-addr", n1.grpc+","+n2.grpc+","+n3.grpc, "-http", n1.http, "-events", "40000", "-rate", "5000",
		"-diurnal", "-1", "-batch", "200", "-seed", "23", "-late", "-1", "-report", report2)
	out := new(strings.Builder)
	load.Stdout, load.Stderr = out, out
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	c.kill(n2)
	if err := load.Wait(); err != nil {
		t.Fatalf("dimsum load: %v\n%s", err, tail(out.String(), 20))
	}
	waitFor(t, "n1 to hand n2's keys over again", func() bool {
		st, err := c.status(n1)
		return err == nil && len(st.Gaps) == 1 && st.Gaps[0].HandedOver
	})
	handed := handedOver(t, n1) + handedOver(t, n3)
	if handed <= first {
		t.Errorf("no event was handed over from n2 the second time (%v in all, %v the first time)", handed, first)
	}
	rep2 := readReport(t, report2)
	want := maps.Clone(rep.ByDatacenter["requests"])
	for dc, v := range rep2.ByDatacenter["requests"] {
		want[dc] += v
	}
	c.start(n2)
	c.exact(n1, want, rep.Accepted+rep2.Accepted)
	c.exact(n3, want, rep.Accepted+rep2.Accepted)
}

// handedOver reads from m's /metrics how many forwarded events it handed
// over from a dead owner.
func handedOver(t *testing.T, m *member) float64 {
	t.Helper()
	for _, line := range strings.Split(string(get(t, "http://"+m.http+"/metrics")), "\n") {
		if v, ok := strings.CutPrefix(line, `dimsum_aggregator_forwarded_events_total{outcome="handed_over"} `); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return 0
}

package main

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dimsum/dimsum/query"
)

// TestSliceCommand runs `dimsum slice` against a running node process and
// checks its table, CSV and JSON against the node's own answer.
func TestSliceCommand(t *testing.T) {
	dir, bin := t.TempDir(), dimsumBinary(t)
	config := writeConfig(t, dir, "aggregator: {grace: 200ms, flush_interval: 100ms}\nschema: {resolutions: [1s:1d, 1m:35d]}\n")
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	node := startNode(t, bin, config, filepath.Join(dir, "data"), grpcAddr, httpAddr)
	defer stopNode(t, node)
	if out, err := exec.Command(bin, "load", "-addr", grpcAddr, "-http", httpAddr, "-events", "5000", "-seed", "5", "-late", "-1", "-verify", "-window", "1s").CombinedOutput(); err != nil {
		t.Fatalf("dimsum load: %v\n%s", err, out)
	}

	// The node's own answer, from a fixed range so every run below reads
	// the same data.
	end := strconv.FormatInt(time.Now().Add(time.Minute).Unix(), 10)
	start := strconv.FormatInt(time.Now().Add(-time.Hour).Unix(), 10)
	params := url.Values{"family": {"requests"}, "where": {"status=~5..|4.."}, "by": {"cluster"}, "start": {start}, "end": {end}, "limit": {"3"}, "measures": {"sum,share"}}
	resp, err := http.Get("http://" + httpAddr + "/api/v1/cube/slice?" + params.Encode())
	if err != nil {
		t.Fatal(err)
	}
	var env struct{ Data query.Slice }
	err = json.NewDecoder(resp.Body).Decode(&env)
	resp.Body.Close()
	if err != nil || len(env.Data.Groups) != 3 || env.Data.Rest == nil {
		t.Fatalf("slice: %+v, %v", env.Data, err)
	}
	want := env.Data

	run := func(format string) string {
		t.Helper()
		// Flags go before and after the family alike.
		out, err := exec.Command(bin, "slice", "-addr", httpAddr, "-where", "status=~5..|4..", "requests", "-by", "cluster",
			"-start", start, "-end", end, "-top", "3", "-measures", "sum,share", "-format", format).CombinedOutput()
		if err != nil {
			t.Fatalf("dimsum slice -format %s: %v\n%s", format, err, out)
		}
		return string(out)
	}
	table := strings.Split(strings.TrimSpace(run("table")), "\n")
	if !strings.Contains(table[0], "requests from cuboid [datacenter,cluster,status] at 1s") || !strings.HasPrefix(table[1], "where status=~5..|4..") {
		t.Errorf("table heading:\n%s", strings.Join(table, "\n"))
	}
	fields := func(line string) []string { return strings.Fields(line) }
	if got := fields(table[2]); strings.Join(got, " ") != "datacenter cluster sum share" {
		t.Errorf("table header %q", table[2])
	}
	for i, g := range want.Groups {
		f := fields(table[3+i])
		share := strconv.FormatFloat(100*g.Values["share"], 'f', 1, 64) + "%"
		if len(f) != 4 || f[0] != g.Labels["datacenter"] || f[1] != g.Labels["cluster"] || f[2] != strconv.FormatFloat(g.Values["sum"], 'f', -1, 64) || f[3] != share {
			t.Errorf("table row %d %q, want %v", i, table[3+i], g)
		}
	}
	if f := fields(table[6]); f[0] != "("+strconv.Itoa(want.Rest.Groups) || f[2] != strconv.FormatFloat(want.Rest.Values["sum"], 'f', -1, 64) {
		t.Errorf("rest row %q, want %d groups summing %v", table[6], want.Rest.Groups, want.Rest.Values["sum"])
	}
	if f := fields(table[7]); f[0] != "(total)" || f[1] != strconv.FormatFloat(want.Total.Values["sum"], 'f', -1, 64) || f[2] != "100.0%" {
		t.Errorf("total row %q, want %v", table[7], want.Total.Values)
	}

	csv := strings.Split(strings.TrimSpace(run("csv")), "\n")
	if csv[0] != "datacenter,cluster,sum,share" || len(csv) != 5 || !strings.HasPrefix(csv[4], "(rest),,") {
		t.Errorf("csv:\n%s", strings.Join(csv, "\n"))
	}
	var got query.Slice
	if err := json.Unmarshal([]byte(run("json")), &got); err != nil || got.TotalGroups != want.TotalGroups || got.Total.Values["sum"] != want.Total.Values["sum"] {
		t.Errorf("json: %+v, %v; want %+v", got, err, want)
	}

	out, err := exec.Command(bin, "slice", "requests", "-addr", httpAddr, "-by", "rack").CombinedOutput()
	if err == nil || !strings.Contains(string(out), `cannot group by "rack"`) || !strings.Contains(string(out), "HTTP 400 bad_data") {
		t.Errorf("bad group-by: %v\n%s", err, out)
	}
}

// TestFormatMeasure pins how the table writes measures: counts in full,
// rates to four significant digits, shares as a percentage.
func TestFormatMeasure(t *testing.T) {
	for _, tc := range []struct {
		measure string
		v       float64
		want    string
	}{
		{"sum", 1234567, "1234567"},
		{"count", 3, "3"},
		{"sum", 0.5, "0.5"},
		{"rate", 123.1645429, "123.2"},
		{"rate", 0.0001234567, "0.0001235"},
		{"rate", 98765.4, "98765"},
		{"rate", 0, "0"},
		{"share", 0.222368148, "22.2%"},
		{"share", 1, "100.0%"},
	} {
		if got := formatMeasure(tc.measure, tc.v); got != tc.want {
			t.Errorf("formatMeasure(%s, %v) = %q, want %q", tc.measure, tc.v, got, tc.want)
		}
	}
}

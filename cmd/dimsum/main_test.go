package main

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// total asks the node for the exact total of the requests family.
func total(t *testing.T, httpAddr string) (float64, bool) {
	t.Helper()
	q := url.Values{"query": {"sum(sum_over_time(requests_delta[1h]))"}}
	resp, err := http.Get("http://" + httpAddr + "/api/v1/query?" + q.Encode())
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	var r struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if json.NewDecoder(resp.Body).Decode(&r) != nil || len(r.Data.Result) != 1 {
		return 0, false
	}
	v, err := strconv.ParseFloat(r.Data.Result[0].Value[1].(string), 64)
	return v, err == nil
}

// TestBinary runs a node as a real process, drives it with
// the load command, stops it with SIGTERM (which flushes every open window)
// and checks the totals before and after a restart.
func TestBinary(t *testing.T) {
	dir, bin := t.TempDir(), dimsumBinary(t)
	if out, err := exec.Command(bin, "version").Output(); err != nil || !strings.HasPrefix(string(out), "dimsum ") {
		t.Fatalf("dimsum version: %q, %v", out, err)
	}
	// A 1s window with a long grace: nothing is flushed before SIGTERM
	// unless the node is slow, so the stop must flush what is open.
	config := writeConfig(t, dir, "aggregator: {grace: 1m}\nschema: {resolutions: [1s:1d, 1m:35d]}\n")
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	start := func() *exec.Cmd { return startNode(t, bin, config, filepath.Join(dir, "data"), grpcAddr, httpAddr) }
	stop := func(cmd *exec.Cmd) { stopNode(t, cmd) }

	node := start()
	report := filepath.Join(dir, "report.json")
	out, err := exec.Command(bin, "load", "-addr", grpcAddr, "-http", httpAddr, "-events", "20000", "-seed", "3", "-batch", "1000", "-report", report).Output()
	if err != nil {
		t.Fatalf("dimsum load: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`(?m)^total requests: (\d+)$`).FindSubmatch(out)
	if m == nil || !strings.Contains(string(out), "accepted 20000, rejected 0") {
		t.Fatalf("unexpected load report:\n%s", out)
	}
	want, _ := strconv.ParseFloat(string(m[1]), 64)
	var figures struct {
		Accepted uint64 `json:"accepted"`
		Server   struct {
			Accepted uint64 `json:"accepted"`
		} `json:"server"`
	}
	if data, err := os.ReadFile(report); err != nil || json.Unmarshal(data, &figures) != nil || figures.Accepted != 20000 || figures.Server.Accepted != 20000 {
		t.Fatalf("report file: %+v, %v", figures, err)
	}
	stop(node)

	node = start()
	defer stop(node)
	if got, ok := total(t, httpAddr); !ok || got != want {
		t.Errorf("after SIGTERM and restart the total is %v (ok %v), want %v", got, ok, want)
	}
}

// TestSplit checks the reading of the comma-separated address lists of
// -addr, -http and -join: blanks around an address and empty entries go.
func TestSplit(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"a:1", []string{"a:1"}},
		{"a:1, b:2", []string{"a:1", "b:2"}},
		{" a:1,,b:2, ", []string{"a:1", "b:2"}},
		{" , ", nil},
	} {
		if got := split(c.in); !slices.Equal(got, c.want) {
			t.Errorf("split(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// TestCommandLine runs the binary as a user discovering it would: 'dimsum
// -h' lists every command with one line, every command takes -h and exits
// 0, --version agrees with 'version', and mistakes exit 1 naming what is
// wrong.
func TestCommandLine(t *testing.T) {
	bin := dimsumBinary(t)
	run := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		if exit, ok := err.(*exec.ExitError); ok {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return stdout.String(), stderr.String(), code
	}
	out, _, code := run("-h")
	if code != 0 {
		t.Fatalf("dimsum -h exited %d", code)
	}
	for _, c := range commands {
		if n := strings.Count(out, "\n  "+c.name+" "); n != 1 {
			t.Errorf("dimsum -h lists %q %d times:\n%s", c.name, n, out)
		}
		help, _, code := run(c.name, "-h")
		if code != 0 || !strings.HasPrefix(help, "usage: dimsum "+c.name) {
			t.Errorf("dimsum %s -h: exit %d\n%s", c.name, code, help)
		}
	}
	if help, _, code := run("help", "load"); code != 0 || !strings.Contains(help, "-events") {
		t.Errorf("dimsum help load: exit %d\n%s", code, help)
	}
	version, _, _ := run("version")
	if flag, _, code := run("--version"); code != 0 || flag != version || !strings.HasPrefix(version, "dimsum ") {
		t.Errorf("dimsum --version %q (exit %d), dimsum version %q", flag, code, version)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"slice"}, "slice: missing argument (usage: dimsum slice <family> [flags])"},
		{[]string{"slice", "requests", "other"}, `slice: unexpected argument "other"`},
		{[]string{"load", "-events", "many"}, `load: invalid value "many" for flag -events`},
		{[]string{"-nope"}, "all: flag provided but not defined: -nope (run 'dimsum all -h' for its flags)"},
	} {
		if _, stderr, code := run(tc.args...); code != 1 || !strings.Contains(stderr, tc.want) {
			t.Errorf("dimsum %v: exit %d, %q; want 1 naming %q", tc.args, code, stderr, tc.want)
		}
	}
}

// TestParseAnyOrder checks that flags and other arguments mix in any order,
// and that "--" ends the flags.
func TestParseAnyOrder(t *testing.T) {
	for _, tc := range []struct {
		args []string
		addr string
		rest []string
	}{
		{[]string{"requests", "-addr", "x"}, "x", []string{"requests"}},
		{[]string{"-addr", "x", "requests"}, "x", []string{"requests"}},
		{[]string{"-addr=x", "requests", "-by", "host"}, "x", []string{"requests"}},
		{[]string{"--", "-addr"}, "", []string{"-addr"}},
	} {
		fs := newFlags("slice")
		addr := fs.String("addr", "", "")
		fs.String("by", "", "")
		rest, err := parse(fs, tc.args, 1)
		if err != nil || *addr != tc.addr || !slices.Equal(rest, tc.rest) {
			t.Errorf("parse(%q) = %q, addr %q, %v; want %q, addr %q", tc.args, rest, *addr, err, tc.rest, tc.addr)
		}
	}
}

// FuzzParse checks that no command line panics the flag reader, and that
// what it accepts holds exactly the arguments asked for, each one of the
// command line's.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"requests -addr x", "-addr=x -- -by", "-by", "--", "a b", "-tls requests -tls=false"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		args := strings.Fields(line)
		fs := newFlags("slice")
		fs.String("addr", "", "")
		fs.String("by", "", "")
		fs.Bool("tls", false, "")
		rest, err := parse(fs, args, 1)
		if err != nil {
			return
		}
		if len(rest) != 1 || !slices.Contains(args, rest[0]) {
			t.Fatalf("parse(%q) = %q", args, rest)
		}
	})
}

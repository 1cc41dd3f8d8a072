package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// exampleTag marks a fenced shell block of the documentation as a runnable
// example: TestDocExamples runs it. Other blocks (a node that runs until
// stopped, a cluster on other machines, benchmarks) are not run.
const exampleTag = "```sh example"

// docExample is one tagged block: where it stands and its text.
type docExample struct {
	where, script string
}

// docExamples returns the tagged blocks of files, in order.
func docExamples(t *testing.T, files []string) []docExample {
	t.Helper()
	var out []docExample
	for _, file := range files {
		f, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		var block *docExample
		for line := 1; sc.Scan(); line++ {
			text := sc.Text()
			switch {
			case block == nil && strings.TrimSpace(text) == exampleTag:
				block = &docExample{where: fmt.Sprintf("%s:%d", filepath.Base(file), line)}
			case block != nil && strings.TrimSpace(text) == "```":
				out = append(out, *block)
				block = nil
			case block != nil:
				block.script += text + "\n"
			}
		}
		f.Close()
		if block != nil {
			t.Fatalf("%s: the example never ends", block.where)
		}
	}
	return out
}

// emptyAnswer matches what an example that found nothing prints: an empty
// PromQL result or list, or a slice table whose total is zero.
var emptyAnswer = regexp.MustCompile(`"result":\[\]|"data":\[\]|(?m)^\s*\(total\)[\s0.%]*$`)

// TestDocExamples runs every shell block of README.md and docs/*.md tagged
// "sh example", in order, against a node process it starts, as a reader
// would paste them: `go run ./cmd/dimsum` and `dimsum` run the binary under
// test, and the default addresses are the node's. Each block must exit 0,
// print something, and neither fail in the API's envelope nor find
// nothing.
func TestDocExamples(t *testing.T) {
	files, err := filepath.Glob("../../docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	examples := docExamples(t, append([]string{"../../README.md"}, files...))
	if len(examples) < 9 {
		t.Fatalf("%d examples tagged %q, want the 9 or more the documentation has", len(examples), exampleTag)
	}

	dir, bin := t.TempDir(), dimsumBinary(t)
	config := writeConfig(t, dir, "aggregator: {grace: 500ms, flush_interval: 100ms}\nschema: {resolutions: [1s:1d, 1m:35d, 1h:400d]}\n")
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	node := startNode(t, bin, config, filepath.Join(dir, "data"), grpcAddr, httpAddr)
	defer stopNode(t, node)

	// The examples' addresses are the defaults: those they name become
	// the node's, and the commands that reach a node by default are given
	// its addresses first, which flags of the example's own may override.
	local := strings.NewReplacer("go run ./cmd/dimsum", "dimsum",
		"127.0.0.1:9400", grpcAddr, "127.0.0.1:9401", httpAddr, "localhost:9401", httpAddr)
	path := t.TempDir()
	wrapper := fmt.Sprintf(`#!/bin/sh
case "$1" in
load) shift; exec %[1]q load -addr %[2]s -http %[3]s "$@";;
slice) shift; exec %[1]q slice -addr %[3]s "$@";;
esac
exec %[1]q "$@"
`, bin, grpcAddr, httpAddr)
	if err := os.WriteFile(filepath.Join(path, "dimsum"), []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "PATH="+path+string(os.PathListSeparator)+os.Getenv("PATH"))
	for _, ex := range examples {
		script := local.Replace(ex.script)
		cmd := exec.Command("bash", "-e", "-o", "pipefail", "-c", script)
		cmd.Env, cmd.Dir = env, t.TempDir()
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		out := stdout.String()
		switch {
		case err != nil:
			t.Errorf("%s: %v\n%s\nstdout:\n%s\nstderr:\n%s", ex.where, err, script, out, stderr.String())
		case strings.TrimSpace(out) == "":
			t.Errorf("%s printed nothing:\n%s", ex.where, script)
		case strings.Contains(out, `"status":"error"`):
			t.Errorf("%s: an API error:\n%s\n%s", ex.where, script, out)
		case emptyAnswer.MatchString(out):
			t.Errorf("%s found nothing (%q):\n%s\n%s", ex.where, emptyAnswer.FindString(out), script, out)
		}
	}
}

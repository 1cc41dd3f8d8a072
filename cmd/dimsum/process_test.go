package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// binDir holds the dimsum binary that every process test runs; TestMain
// makes it and removes it.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "dimsum-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildOnce builds dimsum the first time a test asks for it.
var buildOnce = sync.OnceValues(func() (string, error) {
	bin := filepath.Join(binDir, "dimsum")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

// dimsumBinary returns the path of the dimsum binary, built once for the
// whole run.
func dimsumBinary(t *testing.T) string {
	t.Helper()
	bin, err := buildOnce()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// writeConfig writes a YAML config into dir and returns its path.
func writeConfig(t *testing.T, dir, yaml string) string {
	t.Helper()
	path := filepath.Join(dir, "dimsum.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startNode runs a node process and waits until it serves HTTP. A test
// that fails before it stops the node does not leave it running.
func startNode(t *testing.T, bin, config, data, grpcAddr, httpAddr string) *exec.Cmd {
	t.Helper()
	return startNodeUntil(t, bin, config, data, grpcAddr, httpAddr, func() bool { return healthy(http.DefaultClient, "http://"+httpAddr) })
}

// startNodeUntil is startNode, waiting until up reports true.
func startNodeUntil(t *testing.T, bin, config, data, grpcAddr, httpAddr string, up func() bool) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(bin, "-config", config, "-data", data, "-grpc", grpcAddr, "-http", httpAddr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	waitFor(t, "the node to serve HTTP", up)
	return cmd
}

// stopNode stops a node with SIGTERM and requires a clean exit.
func stopNode(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the node exited with %v after SIGTERM", err)
	}
}

// healthy reports whether the node at base (scheme and address) answers
// its health check through client.
func healthy(client *http.Client, base string) bool {
	resp, err := client.Get(base + "/-/healthy")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// waitFor polls cond every 100ms until it holds, or fails the test after a
// minute.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// get returns the body of a GET of url, whatever its status.
func get(t *testing.T, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

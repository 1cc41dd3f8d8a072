package loadtest

import (
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"
)

// victoriaMissing says how to get the peer the comparison runs against.
const victoriaMissing = "the VictoriaMetrics target is tested against Debian's victoria-metrics, which is not installed: apt-get update && apt-get install -y victoria-metrics"

// TestVictoriaTarget backfills 400 series into a real VictoriaMetrics
// server as cumulative counters and reads their last values back. Without
// the server it is skipped, except in CI (CI=true), where it fails.
func TestVictoriaTarget(t *testing.T) {
	bin, err := exec.LookPath("victoria-metrics")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(victoriaMissing)
		}
		t.Skip(victoriaMissing)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "-storageDataPath", t.TempDir(), "-httpListenAddr", addr, "-search.latencyOffset", "0s", "-retentionPeriod", "1y", "-loggerLevel", "ERROR")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if resp, err := http.Get("http://" + addr + "/health"); err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("victoria-metrics did not answer within 30s")
		}
	}
	rep, err := Run(context.Background(), Options{
		HTTPAddrs: []string{addr},
		Target:    TargetVictoriaMetrics,
		Series:    400,
		Backfill:  2 * time.Hour,
		BatchSize: 1000,
		Verify:    true,
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, rep)
	}
	t.Logf("settled in %s", rep.ReadBack.SettledIn)
	if rep.Accepted != 400*120 || rep.ReadBack == nil || !rep.ReadBack.Verified || rep.Totals["requests"] <= 0 {
		t.Errorf("report:\n%s", rep)
	}
}

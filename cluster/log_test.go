package cluster

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"testing"
)

func TestMemberlistLogLevels(t *testing.T) {
	for _, c := range []struct {
		line, level, msg string
	}{
		{"[DEBUG] memberlist: Stream connection from=127.0.0.1:5000\n", "DEBUG", "Stream connection from=127.0.0.1:5000"},
		{"[TRACE] memberlist: probe\n", "DEBUG", "probe"},
		{"[INFO] memberlist: Suspect b has failed, no acks received\n", "INFO", "Suspect b has failed, no acks received"},
		{"[WARN] memberlist: Refuting a suspect message (from: b)\n", "WARN", "Refuting a suspect message (from: b)"},
		{"[ERR] memberlist: Failed to send ping: boom\n", "ERROR", "Failed to send ping: boom"},
		{"[ERROR] memberlist: Push/Pull failed\r\n", "ERROR", "Push/Pull failed"},
		{"[ERR] Failed to shutdown transport: x\n", "ERROR", "Failed to shutdown transport: x"},
		{"no level at all\n", "INFO", "no level at all"},
		{"[NOTICE] memberlist: unknown level\n", "INFO", "[NOTICE] memberlist: unknown level"},
	} {
		var buf bytes.Buffer
		l := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
		w := newMemberlistLogger(l).Writer()
		if n, err := w.Write([]byte(c.line)); err != nil || n != len(c.line) {
			t.Fatalf("Write(%q) = %d, %v", c.line, n, err)
		}
		var rec map[string]any
		if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
			t.Fatalf("%q logged %q: %v", c.line, buf.String(), err)
		}
		if rec["level"] != c.level || rec["msg"] != c.msg || rec["component"] != "memberlist" {
			t.Errorf("%q logged level=%v msg=%q component=%v, want %s %q memberlist", c.line, rec["level"], rec["msg"], rec["component"], c.level, c.msg)
		}
	}
}

// TestMemberlistLogThroughLogger checks the path memberlist takes: Printf
// on the *log.Logger, one record a line, below-level lines dropped.
func TestMemberlistLogThroughLogger(t *testing.T) {
	var buf bytes.Buffer
	ml := newMemberlistLogger(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	ml.Printf("[DEBUG] memberlist: dropped %d", 1)
	ml.Printf("[WARN] memberlist: kept %d", 2)
	var rec map[string]any
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
		t.Fatalf("logged %q: %v", buf.String(), err)
	}
	if rec["level"] != "WARN" || rec["msg"] != "kept 2" {
		t.Errorf("logged %v, want the WARN line only", rec)
	}
}

package cluster

import (
	"bytes"
	"context"
	"log"
	"log/slog"
)

// logWriter turns memberlist's log lines, "[WARN] memberlist: Refuting a
// suspect message (from: b)", into slog records at the matching level under
// component=memberlist. memberlist writes one line a Write, through a
// *log.Logger made with no prefix or flags.
type logWriter struct {
	logger *slog.Logger
}

// newMemberlistLogger returns the *log.Logger to give memberlist.
func newMemberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(logWriter{logger: l.With("component", "memberlist")}, "", 0)
}

// memberlist's level prefixes, as its logging.go and the rest of the
// package write them.
var logLevels = []struct {
	prefix string
	level  slog.Level
}{
	{"[TRACE]", slog.LevelDebug},
	{"[DEBUG]", slog.LevelDebug},
	{"[INFO]", slog.LevelInfo},
	{"[WARN]", slog.LevelWarn},
	{"[ERR]", slog.LevelError},
	{"[ERROR]", slog.LevelError},
}

func (w logWriter) Write(p []byte) (int, error) {
	line := bytes.TrimRight(p, "\r\n")
	level := slog.LevelInfo // a line without a known prefix
	for _, l := range logLevels {
		if rest, ok := bytes.CutPrefix(line, []byte(l.prefix)); ok {
			level, line = l.level, bytes.TrimLeft(rest, " ")
			break
		}
	}
	line = bytes.TrimPrefix(line, []byte("memberlist: "))
	w.logger.Log(context.Background(), level, string(line))
	return len(p), nil
}

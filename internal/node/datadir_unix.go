//go:build unix

package node

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// lockFile is the file in the data directory that the node holding it
// keeps locked, with its process ID inside.
const lockFile = "dimsum.lock"

// lockDataDir takes the data directory for this process, creating it if
// need be, so that a second node on it fails at once and says why, rather
// than with whatever error the store's or the log's own lock gives
// ("resource temporarily unavailable"). The lock (flock) ends with the
// process, however it ends; closing the file releases it.
func lockDataDir(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("node: cannot create the data directory: %w", err)
	}
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("node: cannot open %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			pid := strings.TrimSpace(string(holder))
			if pid == "" {
				pid = "unknown"
			}
			return nil, fmt.Errorf("node: the data directory %s is in use by another dimsum process (pid %s); stop it, or give this node a directory of its own (-data)", dir, pid)
		}
		return nil, fmt.Errorf("node: cannot lock %s: %w", path, err)
	}
	// The process ID only makes the message above more useful to the next
	// node: failing to write it changes nothing.
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

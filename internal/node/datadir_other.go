//go:build !unix

package node

import (
	"fmt"
	"os"
)

// lockDataDir creates the data directory. Without flock, a second node on
// it is refused by the store's own lock.
func lockDataDir(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("node: cannot create the data directory: %w", err)
	}
	return nil, nil
}

//go:build !linux && !darwin

package disk

import "errors"

// Free is not known on this platform: a Floor never refuses here.
func Free(string) (uint64, error) {
	return 0, errors.New("disk: free space is not known on this platform")
}

//go:build linux || darwin

package disk

import "syscall"

// Free returns the bytes an unprivileged process may still write on the
// filesystem holding path.
func Free(path string) (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return 0, err
	}
	return uint64(st.Bavail) * uint64(st.Bsize), nil
}

//go:build race

// Package race reports whether the race detector is on. Tests that pin
// allocations skip under it: sync.Pool drops items at random there, so
// pooled paths allocate.
package race

// Enabled is true in a build with the race detector.
const Enabled = true

//go:build race

package tsdb

// raceEnabled skips allocation tests: under the race detector sync.Pool
// drops items at random, so pooled paths allocate.
const raceEnabled = true

//go:build !race

package aggregator_test

// raceEnabled reports whether the race detector is on.
const raceEnabled = false

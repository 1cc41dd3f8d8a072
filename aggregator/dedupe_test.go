package aggregator

import "testing"

func TestSeqWindow(t *testing.T) {
	var w seqWindow
	for _, tc := range []struct {
		seq  uint64
		want seqVerdict
	}{
		{1, seqNew},
		{1, seqRepeat},
		{3, seqNew}, // 2 skipped: still in flight
		{2, seqNew}, // arrives late, inside the window
		{2, seqRepeat},
		{3, seqRepeat},
		{dedupeWindow, seqNew},
		{1, seqRepeat}, // dedupeWindow-1 behind: still remembered
		{dedupeWindow + 1, seqNew},
		{1, seqForgotten},          // dedupeWindow behind: out of the window
		{5 * dedupeWindow, seqNew}, // a jump clears every bit
		{4*dedupeWindow + 1, seqNew},
		{4*dedupeWindow + 1, seqRepeat},
		{dedupeWindow + 1, seqForgotten},
	} {
		if got := w.mark(tc.seq, 0); got != tc.want {
			t.Fatalf("mark(%d) = %d, want %d", tc.seq, got, tc.want)
		}
	}
	// A bit left over from a lap around the ring must not make a new
	// sequence look like a repeat.
	var v seqWindow
	v.mark(10, 0)
	v.mark(9+dedupeWindow, 0)
	if got := v.mark(10+dedupeWindow, 0); got != seqNew {
		t.Errorf("sequence %d shares its bit with 10: %d, want new", 10+dedupeWindow, got)
	}
}

package dedupe

import "testing"

func TestSeqs(t *testing.T) {
	var s Seqs
	for _, tc := range []struct {
		seq  uint64
		want Verdict
	}{
		{1, New},
		{1, Repeat},
		{3, New}, // 2 skipped: still in flight
		{2, New}, // arrives late, inside the window
		{2, Repeat},
		{3, Repeat},
		{Window, New},
		{1, Repeat}, // Window-1 behind: still remembered
		{Window + 1, New},
		{1, Forgotten},    // Window behind: out of the window
		{5 * Window, New}, // a jump clears every bit
		{4*Window + 1, New},
		{4*Window + 1, Repeat},
		{Window + 1, Forgotten},
	} {
		if got := s.Check(tc.seq); got != tc.want {
			t.Fatalf("Check(%d) = %d, want %d", tc.seq, got, tc.want)
		}
		if got := s.Mark(tc.seq); got != tc.want {
			t.Fatalf("Mark(%d) = %d, want %d", tc.seq, got, tc.want)
		}
	}
	// A bit left over from a lap around the ring must not make a new
	// number look like a repeat.
	var v Seqs
	v.Mark(10)
	v.Mark(9 + Window)
	if got := v.Check(10 + Window); got != New {
		t.Errorf("number %d shares its bit with 10: %d, want new", 10+Window, got)
	}
	// Zero is a number like any other.
	var z Seqs
	if z.Mark(0) != New || z.Check(0) != Repeat {
		t.Error("0 is not remembered")
	}
	r := Restore(s.High(), s.Bits())
	if r != s {
		t.Error("Restore(High, Bits) differs from the state")
	}
}

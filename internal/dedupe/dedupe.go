// Package dedupe remembers which sequence numbers of one sender were taken,
// so that a retried request is taken once: every number up to the highest
// taken, by a bit for each of the last Window. The aggregator keeps one per
// publisher source, the store one per flushing aggregator.
//
//	var s dedupe.Seqs
//	if s.Check(seq) != dedupe.Repeat {
//		apply(req)
//		s.Mark(seq)
//	}
//
// A sender retries a request within seconds and keeps few in flight, so a
// repeat lies far inside the window; a number Window or more below the
// highest is Forgotten, and its caller decides what to do (both callers
// take it again, and count it in a metric).
package dedupe

// Window is how many of a sender's most recent sequence numbers are
// remembered.
const Window = 1024

// Words is the number of 64-bit words of a window's bits.
const Words = Window / 64

// Seqs is the state of one sender: 136 bytes, whatever it sends. The zero
// value has taken nothing.
type Seqs struct {
	high uint64 // the highest number taken
	bits [Words]uint64
}

// Restore returns the state that High and Bits described.
func Restore(high uint64, bits [Words]uint64) Seqs { return Seqs{high: high, bits: bits} }

// High is the highest number taken (0 when none was).
func (s *Seqs) High() uint64 { return s.high }

// Bits are the window's bits: number n is bit n%64 of word n/64%Words.
func (s *Seqs) Bits() [Words]uint64 { return s.bits }

// Verdict is what Check says of a sequence number.
type Verdict int

const (
	New       Verdict = iota // not taken before
	Repeat                   // taken before
	Forgotten                // Window or more below the highest: cannot tell
)

// Check says whether seq was taken, without marking it.
func (s *Seqs) Check(seq uint64) Verdict {
	switch {
	case seq > s.high:
		return New
	case s.high-seq >= Window:
		return Forgotten
	case s.bits[seq/64%Words]&(1<<(seq%64)) != 0:
		return Repeat
	}
	return New
}

// Mark records seq as taken and returns what Check said before. A
// Forgotten number leaves the state as it is.
func (s *Seqs) Mark(seq uint64) Verdict {
	v := s.Check(seq)
	switch {
	case v == Forgotten:
		return v
	case seq > s.high:
		if seq-s.high >= Window {
			s.bits = [Words]uint64{}
		} else {
			for n := s.high + 1; n < seq; n++ {
				s.bits[n/64%Words] &^= 1 << (n % 64)
			}
		}
		s.high = seq
	}
	s.bits[seq/64%Words] |= 1 << (seq % 64)
	return v
}

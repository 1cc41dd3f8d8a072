package wire

import (
	"testing"

	"github.com/dimsum/dimsum/wire/wirepb"
)

func TestReasonName(t *testing.T) {
	if got := ReasonName(wirepb.RejectReason_REJECT_REASON_TOO_OLD); got != "too_old" {
		t.Errorf("ReasonName(TOO_OLD) = %q", got)
	}
	if got := ReasonName(wirepb.RejectReason(99)); got != "99" {
		t.Errorf("ReasonName(99) = %q, want the number", got)
	}
	if n := testing.AllocsPerRun(100, func() { ReasonName(wirepb.RejectReason_REJECT_REASON_NOT_FINITE) }); n != 0 {
		t.Errorf("ReasonName allocates %v times a call", n)
	}
}

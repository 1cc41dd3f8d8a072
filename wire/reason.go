package wire

import (
	"strings"

	"github.com/dimsum/dimsum/wire/wirepb"
)

// reasonNames holds the name of every known reason, built once: the
// aggregator names the reason of every event it rejects.
var reasonNames = func() map[wirepb.RejectReason]string {
	m := map[wirepb.RejectReason]string{}
	for v := range wirepb.RejectReason_name {
		m[wirepb.RejectReason(v)] = reasonName(wirepb.RejectReason(v))
	}
	return m
}()

func reasonName(r wirepb.RejectReason) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "REJECT_REASON_"))
}

// ReasonName is a reject reason as metrics and reports show it:
// REJECT_REASON_TOO_OLD becomes too_old.
func ReasonName(r wirepb.RejectReason) string {
	if name, ok := reasonNames[r]; ok {
		return name
	}
	return reasonName(r)
}

package wire

import (
	"strings"

	"github.com/dimsum/dimsum/wire/wirepb"
)

// ReasonName is a reject reason as metrics and reports show it:
// REJECT_REASON_TOO_OLD becomes too_old.
func ReasonName(r wirepb.RejectReason) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "REJECT_REASON_"))
}

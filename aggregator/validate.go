package aggregator

import (
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// validator checks events of one batch, caching per family which dictionary
// entries name which label.
type validator struct {
	a    *Aggregator
	dict []string
	// oldest and newest bound the timestamps it takes. retained is the
	// oldest the finest resolution keeps; received, for a forwarded part,
	// when its batch was received.
	oldest, newest, retained, received int64
	slots                              [][]int8 // per family, per dict index: label slot, -1 none, -2 unknown yet
}

// newValidator checks events taken at now. An event a publisher pushed here
// must lie within MaxLateness and MaxFutureSkew of now; one checked before
// (replayed from the log) only within the finest resolution's retention, or
// it could not be stored.
func (a *Aggregator) newValidator(dict []string, now int64, checked bool) validator {
	v := validator{a: a, dict: dict, retained: now - a.window.Retention.Milliseconds(),
		oldest: now - a.opts.MaxLateness.Milliseconds(), newest: now + a.opts.MaxFutureSkew.Milliseconds()}
	if checked {
		v.oldest, v.newest = v.retained, math.MaxInt64
	}
	return v
}

// forwardedValidator checks the events of a part another aggregator
// forwarded at now: within MaxLateness and MaxFutureSkew of when that
// aggregator received the batch, as its publisher's events were checked
// there, and within the finest resolution's retention of now. A part may
// arrive long after it was received (its owner was down), so the bounds
// follow the reception, not now; the reception itself may lie at most
// MaxFutureSkew ahead of this node's clock, so no forwarded event lies more
// than twice the skew ahead of it. A part without a reception time (logged
// by an older version) is held to now.
func (a *Aggregator) forwardedValidator(dict []string, received, now int64) validator {
	if received == 0 {
		received = now
	}
	received = min(received, now+a.opts.MaxFutureSkew.Milliseconds())
	v := a.newValidator(dict, received, false)
	v.received = received
	v.retained = now - a.window.Retention.Milliseconds()
	v.oldest = max(v.oldest, v.retained)
	return v
}

const noReason = wirepb.RejectReason_REJECT_REASON_UNSPECIFIED

func (v *validator) check(e *wirepb.Event, ev *event) (wirepb.RejectReason, string) {
	if int(e.Family) >= len(v.dict) {
		return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("family index %d is outside the dictionary of %d strings", e.Family, len(v.dict))
	}
	fi, ok := v.a.byName[v.dict[e.Family]]
	if !ok {
		return wirepb.RejectReason_REJECT_REASON_UNKNOWN_FAMILY, fmt.Sprintf("unknown family %s", Quote(v.dict[e.Family]))
	}
	f := v.a.fams[fi]
	switch {
	case len(e.Labels)%2 != 0:
		return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("%d label indexes, want name/value pairs", len(e.Labels))
	case len(e.Labels) > 2*schema.MaxLevels:
		// No family has more labels; the loop below would stop at the
		// first one unknown or repeated, but this says why at once.
		return wirepb.RejectReason_REJECT_REASON_TOO_MANY_LABELS, fmt.Sprintf("%d labels, no family has more than %d", len(e.Labels)/2, schema.MaxLevels)
	}
	if v.slots == nil {
		v.slots = make([][]int8, len(v.a.fams))
	}
	if v.slots[fi] == nil {
		v.slots[fi] = make([]int8, len(v.dict))
		for i := range v.slots[fi] {
			v.slots[fi][i] = -2
		}
	}
	slots := v.slots[fi]
	var seen uint16
	for i := 0; i < len(e.Labels); i += 2 {
		n, val := e.Labels[i], e.Labels[i+1]
		if int(n) >= len(v.dict) || int(val) >= len(v.dict) {
			return wirepb.RejectReason_REJECT_REASON_BAD_REFERENCE, fmt.Sprintf("label indexes %d, %d: outside the dictionary of %d strings", n, val, len(v.dict))
		}
		if reason, detail := v.checkLength(v.dict[n], v.dict[val]); reason != noReason {
			return reason, detail
		}
		if slots[n] == -2 {
			slots[n] = -1
			if s, ok := f.LabelIndex(v.dict[n]); ok {
				slots[n] = int8(s)
			}
		}
		s := slots[n]
		switch {
		case s < 0:
			return wirepb.RejectReason_REJECT_REASON_UNKNOWN_DIMENSION, fmt.Sprintf("label %s is not a dimension of family %q", Quote(v.dict[n]), f.Name)
		case seen&(1<<s) != 0:
			return wirepb.RejectReason_REJECT_REASON_DUPLICATE_DIMENSION, fmt.Sprintf("label %q appears twice", v.dict[n])
		case v.dict[val] == "":
			return wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION, fmt.Sprintf("label %q is empty", v.dict[n])
		}
		seen |= 1 << s
		ev.vals[s] = val + 1
	}
	if want := uint16(1)<<len(f.Labels) - 1; seen != want {
		for s, l := range f.Labels {
			if seen&(1<<s) == 0 {
				return wirepb.RejectReason_REJECT_REASON_MISSING_DIMENSION, fmt.Sprintf("label %q of family %q is missing", l, f.Name)
			}
		}
	}
	switch {
	case math.IsNaN(e.Value) || math.IsInf(e.Value, 0):
		return wirepb.RejectReason_REJECT_REASON_NOT_FINITE, fmt.Sprintf("value %v is not finite", e.Value)
	case e.Value < 0 && f.Kind == schema.KindCounter:
		return wirepb.RejectReason_REJECT_REASON_NEGATIVE_DELTA, fmt.Sprintf("counter delta %v is negative", e.Value)
	case math.Abs(e.Value) > MaxValue:
		return wirepb.RejectReason_REJECT_REASON_VALUE_TOO_LARGE, fmt.Sprintf("value %v is beyond 2^53, past which sums of counts are no longer exact", e.Value)
	case e.TimestampMs < v.oldest || e.TimestampMs > v.newest:
		return v.outside(e.TimestampMs)
	}
	ev.fam = fi
	ev.ts = e.TimestampMs
	ev.value = e.Value
	return noReason, ""
}

// checkLength refuses a label name or value over the limits.
func (v *validator) checkLength(name, value string) (wirepb.RejectReason, string) {
	switch o := &v.a.opts; {
	case len(name) > o.MaxLabelNameBytes:
		return wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG, fmt.Sprintf("label name %s is %d bytes long, the limit is %d", Quote(name), len(name), o.MaxLabelNameBytes)
	case len(value) > o.MaxLabelValueBytes:
		return wirepb.RejectReason_REJECT_REASON_LABEL_TOO_LONG, fmt.Sprintf("label %s has a value of %d bytes, the limit is %d", Quote(name), len(value), o.MaxLabelValueBytes)
	}
	return noReason, ""
}

// outside is the reason and detail of a timestamp outside the validator's
// bounds.
func (v *validator) outside(ts int64) (wirepb.RejectReason, string) {
	at := time.UnixMilli(ts).UTC().Format(time.RFC3339Nano)
	switch {
	case ts > v.newest && v.received != 0:
		return wirepb.RejectReason_REJECT_REASON_TOO_NEW, fmt.Sprintf("timestamp %s is more than %s ahead of the time its batch was received, %s", at, v.a.opts.MaxFutureSkew, time.UnixMilli(v.received).UTC().Format(time.RFC3339Nano))
	case ts > v.newest:
		return wirepb.RejectReason_REJECT_REASON_TOO_NEW, fmt.Sprintf("timestamp %s is more than %s ahead of this node's clock", at, v.a.opts.MaxFutureSkew)
	case v.oldest == v.retained:
		return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the finest resolution's retention %s", at, v.a.window.Retention)
	case v.received != 0:
		return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the maximum lateness %s before its batch was received, %s", at, v.a.opts.MaxLateness, time.UnixMilli(v.received).UTC().Format(time.RFC3339Nano))
	}
	return wirepb.RejectReason_REJECT_REASON_TOO_OLD, fmt.Sprintf("timestamp %s is older than the maximum lateness %s", at, v.a.opts.MaxLateness)
}

// maxQuoted is the most bytes of a string a reject's detail quotes: a
// label may be megabytes long, and the detail goes back to the publisher.
const maxQuoted = 64

// Quote quotes s for a reject's detail, cut after maxQuoted bytes. Every
// ingest protocol quotes what it refuses with it.
func Quote(s string) string {
	if len(s) <= maxQuoted {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:maxQuoted]) + fmt.Sprintf("... (%d bytes)", len(s))
}

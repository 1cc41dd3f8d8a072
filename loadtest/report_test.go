package loadtest

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestReportOfNothingSent checks that a run that stopped before sending
// anything (its verification could not begin) still writes its report: a
// rate of 0, not NaN, which JSON cannot hold.
func TestReportOfNothingSent(t *testing.T) {
	var r Report
	if _, err := json.Marshal(r); err != nil {
		t.Errorf("the report of a run that sent nothing: %v", err)
	}
	if s := r.String(); !strings.Contains(s, ": 0 events/s acknowledged") {
		t.Errorf("the report of a run that sent nothing says:\n%s", s)
	}
}

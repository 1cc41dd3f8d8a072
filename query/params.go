package query

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/common/model"
)

// timeRange parses start and end, which default to the whole of time.
func timeRange(r *http.Request) (int64, int64, *apiError) {
	start, end := int64(math.MinInt64/2), int64(math.MaxInt64/2)
	if v := r.FormValue("start"); v != "" {
		t, err := parseTime(v)
		if err != nil {
			return 0, 0, badData("invalid parameter \"start\": %v", err)
		}
		start = t.UnixMilli()
	}
	if v := r.FormValue("end"); v != "" {
		t, err := parseTime(v)
		if err != nil {
			return 0, 0, badData("invalid parameter \"end\": %v", err)
		}
		end = t.UnixMilli()
	}
	if end < start {
		return 0, 0, badData("invalid parameter \"end\": end timestamp must not be before start time")
	}
	return start, end, nil
}

func limit(r *http.Request) (int, *apiError) {
	v := r.FormValue("limit")
	if v == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, badData("invalid parameter \"limit\": %q is not a non-negative integer", v)
	}
	return n, nil
}

// msThreshold is the smallest magnitude of a timestamp read as unix
// milliseconds rather than seconds: 10^12 seconds is the year 33658, while
// 10^12 milliseconds is 2001.
const msThreshold = 1e12

// parseTime reads a unix timestamp in seconds (with a fraction), or in
// milliseconds as some Grafana requests send it, or an RFC3339 time.
func parseTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, errors.New("missing timestamp")
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		if math.Abs(f) >= msThreshold {
			f /= 1000
		}
		if math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) > float64(math.MaxInt64/int64(time.Second)) {
			return time.Time{}, fmt.Errorf("cannot parse %q to a valid timestamp", s)
		}
		// Timestamps are milliseconds, as in Prometheus.
		sec, frac := math.Modf(f)
		return time.Unix(int64(sec), int64(math.Round(frac*1000))*int64(time.Millisecond)).UTC(), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("cannot parse %q to a valid timestamp", s)
}

// parseDuration reads seconds (with a fraction) or a Prometheus duration
// such as "5m".
func parseDuration(s string) (time.Duration, error) {
	if s == "" {
		return 0, errors.New("missing duration")
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		ts := f * float64(time.Second)
		if math.IsNaN(ts) || ts > float64(math.MaxInt64) || ts < float64(math.MinInt64) {
			return 0, fmt.Errorf("cannot parse %q to a valid duration. It overflows int64", s)
		}
		return time.Duration(ts), nil
	}
	if d, err := model.ParseDuration(s); err == nil {
		return time.Duration(d), nil
	}
	return 0, fmt.Errorf("cannot parse %q to a valid duration", s)
}

package loadtest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrMismatch marks a verification that read back something other than
// what was acknowledged.
var ErrMismatch = errors.New("loadtest: read back differs from what was acknowledged")

// ServerFigures are a node's own ingest counters (summed over the nodes).
type ServerFigures struct {
	Accepted   uint64 `json:"accepted"`
	Rejected   uint64 `json:"rejected"`
	Late       uint64 `json:"late"`
	Duplicates uint64 `json:"duplicate_batches"`
	// LiveCells is how many cells the nodes held in memory at the end of
	// the run; HeapBytes and HeapBytesBefore are the Go heap in use then
	// and before the run.
	LiveCells       uint64 `json:"live_cells"`
	HeapBytes       uint64 `json:"heap_inuse_bytes"`
	HeapBytesBefore uint64 `json:"heap_inuse_bytes_before"`
}

// BytesPerLiveCell estimates the nodes' memory per live cell: the heap the
// run added over the cells held at its end. It is meaningful when those
// cells are most of what the run left in memory (a long grace, so that
// nothing was flushed yet); 0 when unknown.
func (s ServerFigures) BytesPerLiveCell() float64 {
	if s.LiveCells == 0 || s.HeapBytes <= s.HeapBytesBefore {
		return 0
	}
	return float64(s.HeapBytes-s.HeapBytesBefore) / float64(s.LiveCells)
}

// minus returns the counters' increase from before to s, with the gauges
// at both ends.
func (s ServerFigures) minus(before ServerFigures) *ServerFigures {
	return &ServerFigures{
		Accepted:        s.Accepted - before.Accepted,
		Rejected:        s.Rejected - before.Rejected,
		Late:            s.Late - before.Late,
		Duplicates:      s.Duplicates - before.Duplicates,
		LiveCells:       s.LiveCells,
		HeapBytes:       s.HeapBytes,
		HeapBytesBefore: before.HeapBytes,
	}
}

// serverMetrics maps the metrics the report takes to their fields.
var serverMetrics = map[string]func(*ServerFigures) *uint64{
	"dimsum_aggregator_events_accepted_total":   func(s *ServerFigures) *uint64 { return &s.Accepted },
	"dimsum_aggregator_events_rejected_total":   func(s *ServerFigures) *uint64 { return &s.Rejected },
	"dimsum_aggregator_events_late_total":       func(s *ServerFigures) *uint64 { return &s.Late },
	"dimsum_aggregator_batches_duplicate_total": func(s *ServerFigures) *uint64 { return &s.Duplicates },
	"dimsum_aggregator_live_cells":              func(s *ServerFigures) *uint64 { return &s.LiveCells },
	"go_memstats_heap_inuse_bytes":              func(s *ServerFigures) *uint64 { return &s.HeapBytes },
}

// scrapeAll reads the ingest counters of every node's /metrics.
func scrapeAll(ctx context.Context, addrs []string) (ServerFigures, error) {
	var s ServerFigures
	for _, addr := range addrs {
		if err := scrape(ctx, addr, &s); err != nil {
			return s, err
		}
	}
	return s, nil
}

func scrape(ctx context.Context, addr string, s *ServerFigures) error {
	body, err := get(ctx, "http://"+addr+"/metrics")
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(line, '{'); i >= 0 && i < len(name) {
			name = line[:i]
			_, rest, _ = strings.Cut(line[strings.LastIndexByte(line, '}'):], " ")
		}
		field, ok := serverMetrics[name]
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
		if err != nil {
			return fmt.Errorf("loadtest: cannot read %s's metric %q: %w", addr, line, err)
		}
		*field(s) += uint64(v)
	}
	return nil
}

func get(ctx context.Context, u string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("loadtest: %w", err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := bufio.NewReader(resp.Body).WriteTo(&b); err != nil {
		return "", fmt.Errorf("loadtest: cannot read %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("loadtest: %s: HTTP %d: %s", u, resp.StatusCode, b.String())
	}
	return b.String(), nil
}

// verifyGrid lays the run's time out in pairs of windows from first, a
// window start at or before the earliest timestamp the run may send. The
// PromQL `sum_over_time(x_delta[2w])` evaluated at first+2w, first+4w, ...
// sums every window exactly once: a range of two windows makes the query
// layer read the finest resolution (its step must be at most half the
// range), and each evaluation time is a window end, so its range holds the
// samples of exactly the two windows before it.
type verifyGrid struct {
	first, pair int64 // ms
}

// maxPoints is how many evaluations one query_range asks for, below the
// API's limit of 11,000.
const maxPoints = 10_000

func newGrid(opts Options, now time.Time) verifyGrid {
	w := opts.Window.Milliseconds()
	earliest := now.Add(-opts.LateBound).UnixMilli()
	return verifyGrid{first: earliest - earliest%w, pair: 2 * w}
}

// read sums, per family and datacenter, every window from the grid's first
// through the one holding upto, over every node.
func (g verifyGrid) read(ctx context.Context, opts Options, upto time.Time) (map[string]float64, error) {
	points := (upto.UnixMilli() - g.first + g.pair) / g.pair // windows through upto's, in pairs
	query := fmt.Sprintf("sum by (datacenter) (sum_over_time(%s_delta[%ds]))", opts.Family, g.pair/1000)
	out := map[string]float64{}
	for _, addr := range opts.HTTPAddrs {
		for k := int64(1); k <= points; k += maxPoints {
			end := min(k+maxPoints-1, points)
			q := url.Values{
				"query": {query},
				"start": {seconds(g.first + k*g.pair)},
				"end":   {seconds(g.first + end*g.pair)},
				"step":  {strconv.FormatInt(g.pair/1000, 10)},
			}
			body, err := get(ctx, "http://"+addr+"/api/v1/query_range?"+q.Encode())
			if err != nil {
				return nil, err
			}
			var r struct {
				Data struct {
					Result []struct {
						Metric map[string]string `json:"metric"`
						Values [][2]any          `json:"values"`
					} `json:"result"`
				} `json:"data"`
			}
			if err := json.Unmarshal([]byte(body), &r); err != nil {
				return nil, fmt.Errorf("loadtest: cannot decode the answer to %s: %w", query, err)
			}
			for _, s := range r.Data.Result {
				for _, v := range s.Values {
					str, _ := v[1].(string)
					f, err := strconv.ParseFloat(str, 64)
					if err != nil {
						return nil, fmt.Errorf("loadtest: sample %v of %s: %w", v, query, err)
					}
					out[s.Metric["datacenter"]] += f
				}
			}
		}
	}
	return out, nil
}

func seconds(ms int64) string { return strconv.FormatFloat(float64(ms)/1000, 'f', 3, 64) }

// verify polls the nodes until what they hold over the run, less what they
// held there before it, equals what was acknowledged, or VerifyTimeout
// passes.
func verify(ctx context.Context, opts Options, g verifyGrid, base map[string]float64, rep *Report) error {
	want := rep.ByDatacenter[opts.Family]
	upto := opts.Now()
	deadline := time.Now().Add(opts.VerifyTimeout)
	for {
		after, err := g.read(ctx, opts, upto)
		if err != nil {
			return err
		}
		got := map[string]float64{}
		total := 0.0
		for dc, v := range after {
			if d := v - base[dc]; d != 0 {
				got[dc] = d
			}
		}
		for _, dc := range slices.Sorted(maps.Keys(got)) {
			total += got[dc]
		}
		var events uint64
		if rep.Server != nil {
			events = rep.Server.Accepted
		}
		rep.ReadBack = &ReadBack{
			Events:       events,
			Totals:       map[string]float64{opts.Family: total},
			ByDatacenter: map[string]map[string]float64{opts.Family: got},
		}
		if maps.Equal(got, want) && events == rep.Accepted {
			rep.ReadBack.Verified = true
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: after %s the nodes counted %d events and hold %v by datacenter; acknowledged were %d events and %v",
				ErrMismatch, opts.VerifyTimeout, events, got, rep.Accepted, want)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

package loadtest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

var (
	// ErrMismatch marks a verification that read back something other
	// than what was acknowledged.
	ErrMismatch = errors.New("loadtest: read back differs from what was acknowledged")
	// ErrPartial marks a verification that could not be exact: what was
	// read back differs, and the answers said they may lack data, such as
	// events waiting for an aggregator that is down.
	ErrPartial = errors.New("loadtest: cannot verify exactly: the answers say they may lack data")
)

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
	// Pending is how many flushes and forwarded batches the nodes held for
	// other members at the end of the run.
	Pending uint64 `json:"handoff_pending"`

	aggregators int               // nodes that export aggregator metrics
	pendingFor  map[string]uint64 // Pending by the member it waits for
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
		Pending:         s.Pending,
		aggregators:     s.aggregators,
	}
}

// serverMetrics maps the metrics the report takes to their fields.
var serverMetrics = map[string]func(*ServerFigures) *uint64{
	"dimsum_aggregator_events_accepted_total":    func(s *ServerFigures) *uint64 { return &s.Accepted },
	"dimsum_aggregator_events_rejected_total":    func(s *ServerFigures) *uint64 { return &s.Rejected },
	"dimsum_aggregator_events_late_total":        func(s *ServerFigures) *uint64 { return &s.Late },
	"dimsum_aggregator_batches_duplicate_total":  func(s *ServerFigures) *uint64 { return &s.Duplicates },
	"dimsum_aggregator_live_cells":               func(s *ServerFigures) *uint64 { return &s.LiveCells },
	"dimsum_aggregator_handoff_pending_requests": func(s *ServerFigures) *uint64 { return &s.Pending },
	"go_memstats_heap_inuse_bytes":               func(s *ServerFigures) *uint64 { return &s.HeapBytes },
}

// scrapeAll reads the ingest counters of every node's /metrics.
func scrapeAll(ctx context.Context, addrs []string) (ServerFigures, error) {
	s := ServerFigures{pendingFor: map[string]uint64{}}
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
		// A label value may hold spaces and braces: the value follows the
		// last "}".
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name, rest = name[:i], ""
			if j := strings.LastIndexByte(line, '}'); j >= 0 {
				_, rest, _ = strings.Cut(line[j+1:], " ")
			}
		}
		field, ok := serverMetrics[name]
		if !ok {
			continue
		}
		if name == "dimsum_aggregator_events_accepted_total" {
			s.aggregators++
		}
		value, _, _ := strings.Cut(rest, " ")
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return fmt.Errorf("loadtest: cannot read %s's metric %q: %w", addr, line, err)
		}
		*field(s) += uint64(v)
		if name == "dimsum_aggregator_handoff_pending_requests" && s.pendingFor != nil {
			s.pendingFor[labelValue(line, "replica")] += uint64(v)
		}
	}
	return nil
}

// labelValue returns the value of the label name in a /metrics line, ""
// when it has none.
func labelValue(line, name string) string {
	_, rest, ok := strings.Cut(line, "{"+name+`="`)
	if !ok {
		_, rest, ok = strings.Cut(line, ","+name+`="`)
	}
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, `"`)
	return v
}

// get fetches u and fails unless it answers 200.
func get(ctx context.Context, u string) (string, error) {
	body, status, err := fetch(ctx, u)
	if err == nil && status != http.StatusOK {
		err = fmt.Errorf("loadtest: %s: HTTP %d: %s", u, status, body)
	}
	return body, err
}

// fetch returns u's body and status.
func fetch(ctx context.Context, u string) (string, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", 0, fmt.Errorf("loadtest: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", 0, fmt.Errorf("loadtest: cannot read %s: %w", u, err)
	}
	return string(b), resp.StatusCode, nil
}

// settle waits until the nodes hold nothing unflushed from before the run:
// no live cell in an aggregator and nothing waiting for another member, in
// two scrapes in a row. Otherwise a previous run's last windows could reach
// the store after the baseline is read, and show as a mismatch. The nodes
// scraped are the alive aggregators of the clusters the HTTP addresses
// belong to (from /api/v1/status/cluster), or the addresses themselves;
// when none exports aggregator metrics, there is nothing to wait for. What
// waits for a member the cluster lists as dead cannot reach the store
// before it returns: settle says so and does not wait for it; the answers
// warn of it, which verify reports. An aggregator that stops answering is
// waited for until the cluster lists it as dead.
func settle(ctx context.Context, opts Options, out *progress) error {
	defer out.done()
	deadline := time.Now().Add(opts.VerifyTimeout)
	for quiet := 0; quiet < 2; {
		members, err := survey(ctx, opts.HTTPAddrs)
		if err != nil {
			return err
		}
		s, scrapeErr := scrapeAll(ctx, members.aggregators)
		quiet++
		var dead uint64
		for name := range members.dead {
			dead += s.pendingFor[name]
		}
		switch {
		case scrapeErr != nil:
			quiet = 0
			out.status("verify: an aggregator the cluster lists as alive does not answer (%v); waiting for it to answer, or for the cluster to list it as dead", scrapeErr)
		case s.aggregators == 0:
			return nil
		case s.LiveCells > 0 || s.Pending > dead:
			quiet = 0
			out.status("verify: waiting for the nodes to store what they hold from before the run: %d live cells, %d pending flushes", s.LiveCells, s.Pending-dead)
		case dead > 0:
			out.status("verify: %d flushes and forwarded batches wait for %s, which the cluster lists as dead: they are not waited for, and the answers say what they lack",
				dead, strings.Join(slices.Sorted(maps.Keys(members.dead)), ", "))
		}
		if time.Now().After(deadline) {
			if scrapeErr != nil {
				return fmt.Errorf("loadtest: after %s the cluster still lists as alive a member that does not answer: %w", opts.VerifyTimeout, scrapeErr)
			}
			return fmt.Errorf("loadtest: after %s the nodes still hold %d live cells and %d pending flushes from before the run", opts.VerifyTimeout, s.LiveCells, s.Pending-dead)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	return nil
}

// members is what the nodes say of their clusters.
type members struct {
	// aggregators are the HTTP addresses of the alive aggregators of the
	// clusters, and the addresses of the nodes outside a cluster.
	aggregators []string
	// dead holds the names of the members listed as dead.
	dead map[string]bool
}

// survey reads the members of the clusters addrs belong to; a node not in
// a cluster (or that says nothing of one) stands for itself.
func survey(ctx context.Context, addrs []string) (members, error) {
	out := members{dead: map[string]bool{}}
	for _, addr := range addrs {
		body, status, err := fetch(ctx, "http://"+addr+"/api/v1/status/cluster")
		if err != nil {
			return members{}, fmt.Errorf("loadtest: cannot read the cluster's members from %s: %w", addr, err)
		}
		var st struct {
			Data struct {
				Clustered bool `json:"clustered"`
				Members   []struct {
					Name  string   `json:"name"`
					Roles []string `json:"roles"`
					State string   `json:"state"`
					HTTP  string   `json:"http"`
				} `json:"members"`
			} `json:"data"`
		}
		if status != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil || !st.Data.Clustered {
			out.aggregators = append(out.aggregators, addr)
			continue
		}
		for _, m := range st.Data.Members {
			switch {
			case m.State == "dead":
				out.dead[m.Name] = true
			case m.State == "alive" && m.HTTP != "" && slices.Contains(m.Roles, "aggregator"):
				out.aggregators = append(out.aggregators, m.HTTP)
			}
		}
	}
	slices.Sort(out.aggregators)
	out.aggregators = slices.Compact(out.aggregators)
	return out, nil
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

// newGrid lays out the grid of windows of the given length from the one
// holding earliest (unix ms).
func newGrid(window time.Duration, earliest int64) verifyGrid {
	w := window.Milliseconds()
	return verifyGrid{first: earliest - mod(earliest, w), pair: 2 * w}
}

// readout is what the nodes hold over the grid: the sums by datacenter
// through PromQL and, where the nodes serve cube slices, through the slice
// API with the number of events.
type readout struct {
	promql map[string]float64
	slice  map[string]float64 // nil without the slice API
	events float64
	// warnings are what the answers said they may lack, sorted.
	warnings []string
}

// read sums, per datacenter, every window from the grid's first through the
// one holding upto, over every node, through both APIs.
func (g verifyGrid) read(ctx context.Context, opts Options, upto time.Time) (readout, error) {
	var r readout
	var err error
	points := (upto.UnixMilli() - g.first + g.pair) / g.pair // windows through upto's, in pairs
	if r.promql, err = g.readPromQL(ctx, opts, points, &r); err != nil {
		return r, err
	}
	r.slice, r.events, err = g.readSlice(ctx, opts, g.first+points*g.pair, &r)
	slices.Sort(r.warnings)
	r.warnings = slices.Compact(r.warnings)
	return r, err
}

// readSlice asks each node's slice API for the sum and event count by
// datacenter over [first, end); nil when a node serves no slices. It adds
// the answers' warnings to r.
func (g verifyGrid) readSlice(ctx context.Context, opts Options, end int64, r *readout) (map[string]float64, float64, error) {
	out := map[string]float64{}
	events := 0.0
	for _, addr := range opts.HTTPAddrs {
		q := url.Values{
			"family": {opts.Family}, "by": {"datacenter"}, "measures": {"sum,count"},
			"start": {seconds(g.first)}, "end": {seconds(end)}, "limit": {"0"},
		}
		u := "http://" + addr + "/api/v1/cube/slice?" + q.Encode()
		body, status, err := fetch(ctx, u)
		switch {
		case err != nil:
			return nil, 0, err
		case status == http.StatusNotFound:
			return nil, 0, nil
		case status != http.StatusOK:
			return nil, 0, fmt.Errorf("loadtest: %s: HTTP %d: %s", u, status, body)
		}
		var sl struct {
			Data struct {
				Groups []struct {
					Labels map[string]string  `json:"labels"`
					Values map[string]float64 `json:"values"`
				} `json:"groups"`
				Warnings []string `json:"warnings"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(body), &sl); err != nil {
			return nil, 0, fmt.Errorf("loadtest: cannot decode the slice %s: %w", u, err)
		}
		r.warnings = append(r.warnings, sl.Data.Warnings...)
		for _, gr := range sl.Data.Groups {
			out[gr.Labels["datacenter"]] += gr.Values["sum"]
			events += gr.Values["count"]
		}
	}
	return out, events, nil
}

// readPromQL sums the first points pairs of windows by datacenter through
// PromQL. It adds the answers' warnings to r.
func (g verifyGrid) readPromQL(ctx context.Context, opts Options, points int64, r *readout) (map[string]float64, error) {
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
			var ans struct {
				Data struct {
					Result []struct {
						Metric map[string]string `json:"metric"`
						Values [][2]any          `json:"values"`
					} `json:"result"`
				} `json:"data"`
				Warnings []string `json:"warnings"`
			}
			if err := json.Unmarshal([]byte(body), &ans); err != nil {
				return nil, fmt.Errorf("loadtest: cannot decode the answer to %s: %w", query, err)
			}
			r.warnings = append(r.warnings, ans.Warnings...)
			for _, s := range ans.Data.Result {
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
// passes: the sums by datacenter through PromQL and, where the nodes serve
// slices, the sums and the number of events through the slice API. Without
// slices, the event count is the aggregators' accepted counter.
func verify(ctx context.Context, opts Options, g verifyGrid, base readout, start time.Time, rep *Report, out *progress) error {
	want := rep.ByDatacenter[opts.Family]
	defer out.done()
	waiting, shown := time.Now(), time.Time{}
	upto := opts.Now()
	deadline := time.Now().Add(opts.VerifyTimeout)
	diff := func(after, before map[string]float64) map[string]float64 {
		out := map[string]float64{}
		for dc, v := range after {
			if d := v - before[dc]; d != 0 {
				out[dc] = d
			}
		}
		return out
	}
	for {
		after, err := g.read(ctx, opts, upto)
		if err != nil {
			return err
		}
		got := diff(after.promql, base.promql)
		total := sumValues(got)
		var events uint64
		ok := maps.Equal(got, want)
		if after.slice != nil {
			events = uint64(after.events - base.events)
			ok = ok && maps.Equal(diff(after.slice, base.slice), want)
		} else if rep.Server != nil {
			events = rep.Server.Accepted
		}
		ok = ok && events == rep.Accepted
		rep.ReadBack = &ReadBack{
			Events:       events,
			Totals:       map[string]float64{opts.Family: total},
			ByDatacenter: map[string]map[string]float64{opts.Family: got},
			Verified:     ok,
			SettledIn:    time.Since(start),
			Warnings:     after.warnings,
		}
		if ok {
			return nil
		}
		lacking := lackText(base, after)
		if time.Since(shown) >= opts.ProgressInterval {
			why := "waiting for the rest to become queryable (window + grace"
			if lacking != "" {
				why = "waiting for the rest: " + lacking + " (delivered once it returns"
			}
			out.status("verify: %d of %d events read back after %s, %s; timeout %s)",
				events, rep.Accepted, time.Since(waiting).Round(time.Second), why, opts.VerifyTimeout)
			shown = time.Now()
		}
		if time.Now().After(deadline) {
			err, why := ErrMismatch, ""
			if lacking != "" {
				err, why = ErrPartial, "; "+lacking
			}
			return fmt.Errorf("%w: after %s the nodes hold %d events and %v by datacenter (slices: %v); acknowledged were %d events and %v%s",
				err, opts.VerifyTimeout, events, got, diff(after.slice, base.slice), rep.Accepted, want, why)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// lackText says what the answers of the read before the run and of the
// latest read said they may lack; "" when nothing.
func lackText(base, after readout) string {
	var parts []string
	if len(after.warnings) > 0 {
		parts = append(parts, "the answers say: "+strings.Join(after.warnings, "; "))
	}
	if len(base.warnings) > 0 && !slices.Equal(base.warnings, after.warnings) {
		parts = append(parts, "the totals before the run were read while the answers said: "+strings.Join(base.warnings, "; "))
	}
	return strings.Join(parts, "; ")
}

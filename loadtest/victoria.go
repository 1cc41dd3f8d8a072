package loadtest

import (
	"bytes"
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
	"sync"
	"time"

	"github.com/dimsum/dimsum/publisher"
)

// runVictoria sends the events of a Series run to VictoriaMetrics, the peer
// the store is measured against, as what a Prometheus exporter of the same
// counters would give it: one cumulative counter a series,
// <family>_total, whose samples are the running totals of the events, in
// the exposition format with timestamps (/api/v1/import/prometheus),
// BatchSize samples a request and Concurrency requests in flight. With
// Verify it then asks the server to make what it took searchable and polls
// until the last sample of every series sums, by datacenter, to what was
// sent, so that the settled rate is measured as for dimsum.
func runVictoria(ctx context.Context, opts Options, w *seriesWorkload, start time.Time) (Report, error) {
	rep := Report{}
	addr := opts.HTTPAddrs[0]
	totals := map[string]float64{}
	running := make([]float64, opts.Series)
	bodies := make(chan []byte, opts.Concurrency)
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		sendErr error
	)
	for range opts.Concurrency {
		wg.Go(func() {
			for body := range bodies {
				if err := post(ctx, "http://"+addr+"/api/v1/import/prometheus", body); err != nil {
					mu.Lock()
					sendErr = err
					mu.Unlock()
				}
			}
		})
	}
	var buf []byte
	n := 0
	genErr := generate(ctx, opts, w, start, func(evs []publisher.Event) error {
		mu.Lock()
		err := sendErr
		mu.Unlock()
		if err != nil {
			return err
		}
		for i := range evs {
			e := &evs[i]
			s := int(uint64(n) % uint64(opts.Series))
			running[s] += e.Value
			totals[datacenter(e)] += e.Value
			buf = appendSample(buf, opts.Family, e, running[s])
			n++
			if n%opts.BatchSize == 0 {
				bodies <- buf
				buf = nil
			}
		}
		return nil
	})
	if len(buf) > 0 {
		bodies <- buf
	}
	close(bodies)
	wg.Wait()
	rep.Duration = time.Since(start)
	rep.Events, rep.Accepted = uint64(n), uint64(n)
	rep.ByDatacenter = map[string]map[string]float64{opts.Family: totals}
	rep.Totals = map[string]float64{opts.Family: sumValues(totals)}
	if genErr != nil || sendErr != nil {
		return rep, fmt.Errorf("loadtest: %w", errors.Join(genErr, sendErr))
	}
	if !opts.Verify {
		return rep, nil
	}
	// VictoriaMetrics makes what it took searchable within seconds; ask for
	// it at once, as dimsum's late windows go out at once.
	if _, err := get(ctx, "http://"+addr+"/internal/force_flush"); err != nil {
		return rep, fmt.Errorf("loadtest: %w", err)
	}
	query := fmt.Sprintf("sum by (datacenter) (last_over_time(%s_total[%ds]))", opts.Family, (w.last()-w.first)/1000+1)
	at := seconds(w.last())
	deadline := time.Now().Add(opts.VerifyTimeout)
	for {
		got, err := victoriaSums(ctx, addr, query, at)
		if err != nil {
			return rep, err
		}
		ok := maps.Equal(got, totals)
		rep.ReadBack = &ReadBack{
			Events:       rep.Accepted,
			Totals:       map[string]float64{opts.Family: sumValues(got)},
			ByDatacenter: map[string]map[string]float64{opts.Family: got},
			Verified:     ok,
			SettledIn:    time.Since(start),
		}
		if ok {
			return rep, nil
		}
		if time.Now().After(deadline) {
			return rep, fmt.Errorf("%w: after %s VictoriaMetrics holds %v by datacenter; sent were %v", ErrMismatch, opts.VerifyTimeout, got, totals)
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// appendSample appends one sample line of the exposition format.
func appendSample(dst []byte, family string, e *publisher.Event, value float64) []byte {
	dst = append(dst, family...)
	dst = append(dst, "_total{"...)
	for i := 0; i < len(e.Labels); i += 2 {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, e.Labels[i]...)
		dst = append(dst, '=')
		dst = strconv.AppendQuote(dst, e.Labels[i+1])
	}
	dst = append(dst, "} "...)
	dst = strconv.AppendFloat(dst, value, 'f', -1, 64)
	dst = append(dst, ' ')
	dst = strconv.AppendInt(dst, e.TimestampMS, 10)
	return append(dst, '\n')
}

func post(ctx context.Context, u string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("loadtest: %s: HTTP %d: %s", u, resp.StatusCode, msg)
	}
	return nil
}

// victoriaSums evaluates an instant query summed by datacenter.
func victoriaSums(ctx context.Context, addr, query, at string) (map[string]float64, error) {
	u := "http://" + addr + "/api/v1/query?" + url.Values{"query": {query}, "time": {at}}.Encode()
	body, err := get(ctx, u)
	if err != nil {
		return nil, err
	}
	var r struct {
		Data struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		return nil, fmt.Errorf("loadtest: cannot decode the answer to %s: %w", query, err)
	}
	out := map[string]float64{}
	for _, s := range r.Data.Result {
		str, _ := s.Value[1].(string)
		f, err := strconv.ParseFloat(str, 64)
		if err != nil {
			return nil, fmt.Errorf("loadtest: sample %v of %s: %w", s.Value, query, err)
		}
		out[s.Metric["datacenter"]] = f
	}
	return out, nil
}

// sumValues adds up the values of m in key order, so that the total does
// not depend on the map's iteration order.
func sumValues(m map[string]float64) float64 {
	total := 0.0
	for _, k := range slices.Sorted(maps.Keys(m)) {
		total += m[k]
	}
	return total
}

package node

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/dimsum/dimsum/query"
)

// chromiumMissing says how to get the browser the explorer test drives.
const chromiumMissing = "the explorer test drives Debian's chromium, which is not installed: apt-get update && apt-get install -y --no-install-recommends chromium"

// browserPath finds chromium. Without it the test is skipped, except in CI
// (CI=true), where it fails: the page must not go untested unnoticed.
func browserPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal(chromiumMissing)
	}
	t.Skip(chromiumMissing)
	return ""
}

// pageView is what the explorer shows, read from its DOM.
type pageView struct {
	Href, Search, State, Error string
	Cuboid, Resolution         string
	Where                      string
	By                         []string
	Sort                       map[string]string // column: aria-sort
	Lines                      int
	Rows                       []struct {
		Kind  string
		Cells []struct{ Text, Measure, Value string }
	}
}

const readView = `(() => {
  const $ = (s) => document.querySelector(s);
  const text = (s) => $(s) ? $(s).textContent : '';
  return {
    Href: location.href, Search: location.search, State: document.body.dataset.state,
    Error: $('#error').hidden ? '' : $('#error').textContent,
    Cuboid: text('[data-testid=cuboid]'), Resolution: text('[data-testid=resolution-used]'),
    Where: $('#where').value,
    By: [...document.querySelectorAll('#by input')].filter((c) => c.checked).map((c) => c.value),
    Sort: Object.fromEntries([...document.querySelectorAll('#table thead th')].map((th) => [th.querySelector('button').dataset.testid.slice(5), th.getAttribute('aria-sort')])),
    Lines: $('#chart-section').hidden ? 0 : document.querySelectorAll('#chart polyline').length,
    Rows: [...document.querySelectorAll('#table tbody tr[data-testid=row], #table tfoot tr')].map((tr) => ({
      Kind: tr.dataset.testid,
      Cells: [...tr.children].map((c) => ({ Text: c.textContent, Measure: c.dataset.measure || '', Value: c.dataset.value || '' })),
    })),
  };
})()`

// tab drives one browser tab.
type tab struct {
	t   *testing.T
	ctx context.Context
}

func (b tab) do(steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.ctx, steps...); err != nil {
		b.t.Fatal(err)
	}
}

// await waits until the page's JavaScript expression holds, then reads
// the view.
func (b tab) await(expr string) pageView {
	b.t.Helper()
	if _, err := chromedp.Run(b.ctx, chromedp.Poll[bool](expr)); err != nil {
		v, _ := chromedp.Run(b.ctx, chromedp.Evaluate[pageView](readView))
		b.t.Fatalf("waiting for %s: %v; the page shows %+v", expr, err, v)
	}
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[pageView](readView))
	if err != nil {
		b.t.Fatal(err)
	}
	return v
}

// ready waits until the page has shown the answer to a URL for which
// cond holds.
func (b tab) ready(cond string) pageView {
	b.t.Helper()
	return b.await(fmt.Sprintf("document.body.dataset.state === 'ready' && (%s)", cond))
}

// sliceOf asks the slice API for what the page's URL stands for.
func sliceOf(t *testing.T, addr string, v pageView) (*query.Slice, int, apiResponse) {
	t.Helper()
	p, err := url.ParseQuery(strings.TrimPrefix(v.Search, "?"))
	if err != nil {
		t.Fatalf("the page's URL %s: %v", v.Href, err)
	}
	p.Del("sort")
	code, r := get(t, addr, "/api/v1/cube/slice", p)
	if code != http.StatusOK {
		return nil, code, r
	}
	var sl query.Slice
	mustDecode(t, r.Data, &sl)
	return &sl, code, r
}

// checkTable requires the page's table to show exactly the slice: every
// group in order, the rest and the total, every number equal.
func checkTable(t *testing.T, v pageView, sl *query.Slice) {
	t.Helper()
	if v.Cuboid != strings.Join(sl.Cuboid, ", ") || v.Resolution != sl.Resolution {
		t.Errorf("the page says cuboid %q at %s; the API read [%s] at %s", v.Cuboid, v.Resolution, strings.Join(sl.Cuboid, ", "), sl.Resolution)
	}
	type want struct {
		kind   string
		labels []string
		values map[string]float64
	}
	var rows []want
	for _, g := range sl.Groups {
		lbls := make([]string, len(sl.By))
		for i, l := range sl.By {
			lbls[i] = g.Labels[l]
		}
		rows = append(rows, want{"row", lbls, g.Values})
	}
	if sl.Rest != nil {
		rows = append(rows, want{"rest", []string{fmt.Sprintf("(%d more)", sl.Rest.Groups)}, sl.Rest.Values})
	}
	rows = append(rows, want{"total", []string{"(total)"}, sl.Total.Values})
	if len(v.Rows) != len(rows) {
		t.Fatalf("the table has %d rows, the API %d groups, rest %v: %+v", len(v.Rows), len(sl.Groups), sl.Rest != nil, v.Rows)
	}
	for i, w := range rows {
		got := v.Rows[i]
		if got.Kind != w.kind || len(got.Cells) != len(w.labels)+len(sl.Measures) {
			t.Fatalf("row %d: %+v, want a %s row %v %v", i, got, w.kind, w.labels, w.values)
		}
		for j, l := range w.labels {
			if got.Cells[j].Text != l {
				t.Errorf("row %d cell %d: %q, want %q", i, j, got.Cells[j].Text, l)
			}
		}
		for k, m := range sl.Measures {
			c := got.Cells[len(w.labels)+k]
			exact, err := strconv.ParseFloat(c.Value, 64)
			if err != nil || c.Measure != m || exact != w.values[m] {
				t.Errorf("row %d %s: data-value %q (%s), want %v", i, m, c.Value, c.Measure, w.values[m])
			}
			// The text rounds to six decimals and groups thousands.
			shown, err := strconv.ParseFloat(strings.ReplaceAll(c.Text, ",", ""), 64)
			if err != nil || math.Abs(shown-w.values[m]) > 5e-7 {
				t.Errorf("row %d %s: shows %q, want %v", i, m, c.Text, w.values[m])
			}
		}
	}
}

// acceptedEvents reads the node's count of accepted events from /metrics.
func acceptedEvents(t *testing.T, addr string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "dimsum_aggregator_events_accepted_total "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatal("no dimsum_aggregator_events_accepted_total in /metrics")
	return 0
}

// TestExplorer drives the cube explorer in headless chromium against a node
// with data, and holds every number it shows to the slice API's answer for
// the request its URL stands for.
func TestExplorer(t *testing.T) {
	browser := browserPath(t)
	addr := startLoaded(t).HTTPAddr()

	// Every accepted event is stored before the page reads, so the page
	// and the API read the same data.
	accepted := acceptedEvents(t, addr)
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, r := get(t, addr, "/api/v1/cube/slice", url.Values{"family": {"requests"}, "since": {"1h"}, "measures": {"count"}})
		var sl query.Slice
		if code == http.StatusOK {
			mustDecode(t, r.Data, &sl)
		}
		if sl.Total.Values["count"] == accepted {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stored %v events, accepted %v (HTTP %d %s)", sl.Total.Values["count"], accepted, code, r.Error)
		}
		time.Sleep(100 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox)
	ctx, cancel = chromedp.NewExecAllocator(ctx, opts...)
	defer cancel()
	ctx, cancel = chromedp.NewContext(ctx)
	defer cancel()
	page := tab{t, ctx}

	// A fresh visit shows the defaults and writes them into the URL:
	// grouped by datacenter.
	page.do(chromedp.Navigate("http://" + addr + "/"))
	v := page.ready("location.search.includes('family=requests')")
	if !slices.Equal(v.By, []string{"datacenter"}) {
		t.Fatalf("the default group-by is %v, want [datacenter]", v.By)
	}

	// A filter, a top 2 (so a rest row), the share, a one-minute step.
	page.do(
		chromedp.SetValue(chromedp.CSS(`[data-testid=where]`), "status!=404"),
		chromedp.SetValue(chromedp.CSS(`[data-testid=limit]`), "2"),
		chromedp.SetValue(chromedp.CSS(`[data-testid=step]`), "1m"),
		chromedp.Click(chromedp.CSS(`#measures input[value=share]`)),
		chromedp.Click(chromedp.CSS(`[data-testid=run]`)),
	)
	byDC := page.ready("location.search.includes('where=status!=404') && location.search.includes('step=1m')")
	sl, code, r := sliceOf(t, addr, byDC)
	if sl == nil {
		t.Fatalf("HTTP %d: %s", code, r.Error)
	}
	if !slices.Equal(sl.By, []string{"datacenter"}) || sl.Rest == nil || !slices.Equal(sl.Measures, []string{"sum", "count", "share"}) {
		t.Fatalf("the URL %s stands for by %v, measures %v, rest %v", byDC.Search, sl.By, sl.Measures, sl.Rest)
	}
	checkTable(t, byDC, sl)
	if byDC.Lines != len(sl.Groups) {
		t.Errorf("the chart draws %d lines, want one a group (%d)", byDC.Lines, len(sl.Groups))
	}
	if byDC.Sort["sum"] != "descending" || byDC.Sort["datacenter"] != "none" {
		t.Errorf("aria-sort %v, want sum descending (the API's order)", byDC.Sort)
	}

	// A click on a header sorts by it, and the URL keeps the order.
	page.do(chromedp.Click(chromedp.CSS(`[data-testid=sort-datacenter]`)))
	sorted := page.ready("location.search.includes('sort=datacenter:asc')")
	if sorted.Sort["datacenter"] != "ascending" || sorted.Sort["sum"] != "none" {
		t.Errorf("after sorting by datacenter, aria-sort %v", sorted.Sort)
	}
	if a, b := sorted.Rows[0].Cells[0].Text, sorted.Rows[1].Cells[0].Text; a > b {
		t.Errorf("sorted by datacenter, the rows are %s, %s", a, b)
	}
	if last := sorted.Rows[len(sorted.Rows)-1]; last.Kind != "total" {
		t.Errorf("sorting moved the total row: the last row is %+v", last)
	}

	// A click on a row drills down to the clusters of its datacenter.
	dc := sorted.Rows[0].Cells[0].Text
	page.do(chromedp.Click(chromedp.CSS(`#table tbody tr[data-testid=row]`)))
	clusters := page.ready(fmt.Sprintf("location.search.includes('where=status!=404,datacenter=%s')", dc))
	sl, code, r = sliceOf(t, addr, clusters)
	if sl == nil {
		t.Fatalf("HTTP %d: %s", code, r.Error)
	}
	if !slices.Equal(sl.By, []string{"datacenter", "cluster"}) || len(sl.Groups) == 0 {
		t.Fatalf("after the drill-down the URL %s stands for by %v, %d groups", clusters.Search, sl.By, len(sl.Groups))
	}
	for _, g := range sl.Groups {
		if g.Labels["datacenter"] != dc {
			t.Errorf("drilled into %s, got group %v", dc, g.Labels)
		}
	}
	checkTable(t, clusters, sl)
	if want := "status!=404,datacenter=" + dc; clusters.Where != want {
		t.Errorf("the filter field holds %q, want %q", clusters.Where, want)
	}

	// The URL is the view: a fresh tab on it shows the same table.
	fresh, cancelFresh := chromedp.NewContext(ctx)
	defer cancelFresh()
	other := tab{t, fresh}
	other.do(chromedp.Navigate(clusters.Href))
	shared := other.ready("true")
	if shared.Search != clusters.Search || !slices.Equal(shared.By, clusters.By) || shared.Where != clusters.Where {
		t.Errorf("the shared URL shows %s by %v where %q, want %s by %v where %q", shared.Search, shared.By, shared.Where, clusters.Search, clusters.By, clusters.Where)
	}
	checkTable(t, shared, sl)

	// Up rolls the drill-down back up: datacenters again, under the filter.
	other.do(chromedp.Click(chromedp.CSS(`[data-testid="up-datacenter/cluster/host"]`)))
	up := other.ready(fmt.Sprintf("!location.search.includes('datacenter=%s')", dc))
	sl, code, r = sliceOf(t, addr, up)
	if sl == nil {
		t.Fatalf("HTTP %d: %s", code, r.Error)
	}
	if !slices.Equal(sl.By, []string{"datacenter"}) || !slices.Equal(sl.Where, []string{"status!=404"}) {
		t.Errorf("after Up the URL %s stands for where %v by %v", up.Search, sl.Where, sl.By)
	}
	checkTable(t, up, sl)

	// Back returns to the datacenters, as they were sorted.
	page.do(chromedp.Evaluate[chromedp.Void]("history.back()"))
	back := page.ready(fmt.Sprintf("!location.search.includes('datacenter=%s')", dc))
	if back.Search != sorted.Search {
		t.Errorf("back went to %s, want %s", back.Search, sorted.Search)
	}
	if sl, _, _ = sliceOf(t, addr, back); sl == nil || len(back.Rows) != len(sorted.Rows) {
		t.Errorf("back shows %d rows, want %d", len(back.Rows), len(sorted.Rows))
	}

	// A refused request shows the API's error.
	page.do(
		chromedp.SetValue(chromedp.CSS(`[data-testid=where]`), "nolabel=x"),
		chromedp.Click(chromedp.CSS(`[data-testid=run]`)),
	)
	bad := page.await("document.body.dataset.state === 'error'")
	sl, code, r = sliceOf(t, addr, bad)
	if sl != nil || code != http.StatusBadRequest {
		t.Fatalf("the API answered HTTP %d to %s", code, bad.Search)
	}
	if want := r.ErrorType + ": " + r.Error; bad.Error != want {
		t.Errorf("the page shows %q, want %q", bad.Error, want)
	}
	if len(bad.Rows) != 0 {
		t.Errorf("the page still shows a table under the error: %+v", bad.Rows)
	}
}

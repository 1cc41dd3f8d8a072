package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dimsum/dimsum/query"
)

// runSlice asks a node for a cube slice and prints it.
func runSlice(args []string) error {
	fs := newFlags("slice")
	addr := fs.String("addr", "127.0.0.1:9401", "HTTP `address` of a node")
	format := fs.String("format", "table", "table, csv or json")
	p := url.Values{}
	str := func(name, usage string) {
		fs.Func(name, usage, func(v string) error { p.Set(name, v); return nil })
	}
	str("where", "comma-separated `filters`: label=value, label!=value, label=~re, label!~re, label=a|b")
	str("by", "comma-separated group-by `labels`; a level brings the levels above it")
	str("since", "`duration` of a range ending now (default 1h)")
	str("start", "start `time` (unix seconds or RFC3339)")
	str("end", "end `time` (unix seconds or RFC3339)")
	str("step", "a series per group at this `step`; absent, one total per group")
	str("resolution", "read the resolution with this `step`")
	str("measures", "comma-separated: sum, count, rate, share (default sum)")
	str("order", "`measure` to order by; a - prefix or :desc for descending (default -sum)")
	str("offset", "groups to skip")
	fs.Func("top", "show the top `n` groups (the limit)", func(v string) error { p.Set("limit", v); return nil })
	str("drilldown", "drill into -value at this `dimension` or level")
	str("value", "the `value` to drill into")
	str("rollup", "roll up this `dimension` or level")
	var cf clientFlags
	cf.register(fs)
	family, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	p.Set("family", family[0])
	path := "/api/v1/cube/slice"
	switch {
	case p.Has("drilldown") && p.Has("rollup"):
		return errors.New("slice: -drilldown and -rollup exclude each other")
	case p.Has("drilldown"):
		path = "/api/v1/cube/drilldown"
		p.Set("dimension", p.Get("drilldown"))
		p.Del("drilldown")
	case p.Has("rollup"):
		path = "/api/v1/cube/rollup"
		p.Set("dimension", p.Get("rollup"))
		p.Del("rollup")
	}
	switch *format {
	case "table", "json":
	case "csv":
		p.Set("format", "csv")
	default:
		return fmt.Errorf("slice: -format must be table, csv or json, not %q", *format)
	}
	transport, err := cf.httpTransport()
	if err != nil {
		return fmt.Errorf("slice: %w", err)
	}
	return slice(os.Stdout, &http.Client{Timeout: 5 * time.Minute, Transport: transport}, "http://"+*addr+path+"?"+p.Encode(), *format)
}

// slice fetches one slice with client and writes it in the format asked.
func slice(w io.Writer, client *http.Client, u, format string) error {
	resp, err := client.Get(u)
	if err != nil {
		return fmt.Errorf("slice: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("slice: cannot read the answer: %w", err)
	}
	var env struct {
		Status    string          `json:"status"`
		Data      json.RawMessage `json:"data"`
		ErrorType string          `json:"errorType"`
		Error     string          `json:"error"`
	}
	if resp.StatusCode != http.StatusOK || format != "csv" {
		if err := json.Unmarshal(body, &env); err != nil {
			return fmt.Errorf("slice: HTTP %d: cannot decode the answer: %v", resp.StatusCode, err)
		}
		if env.Status != "success" {
			return fmt.Errorf("slice: %s (HTTP %d %s)", env.Error, resp.StatusCode, env.ErrorType)
		}
	}
	switch format {
	case "csv":
		_, err = w.Write(body)
	case "json":
		_, err = fmt.Fprintf(w, "%s\n", env.Data)
	default:
		var sl query.Slice
		if err := json.Unmarshal(env.Data, &sl); err != nil {
			return fmt.Errorf("slice: cannot decode the slice: %v", err)
		}
		err = printTable(w, &sl)
	}
	return err
}

// printTable writes a slice as aligned columns under a line saying where
// the answer came from.
func printTable(w io.Writer, sl *query.Slice) error {
	cuboid := strings.Join(sl.Cuboid, ",")
	if cuboid == "" {
		cuboid = "apex"
	}
	from, to := time.Unix(0, int64(sl.Range.Start*1e9)).UTC(), time.Unix(0, int64(sl.Range.End*1e9)).UTC()
	fmt.Fprintf(w, "%s from cuboid [%s] at %s, %s to %s (%s)\n", sl.Family, cuboid, sl.Resolution, from.Format(time.RFC3339), to.Format(time.RFC3339), sl.Range.Alignment)
	if len(sl.Where) > 0 {
		fmt.Fprintf(w, "where %s\n", strings.Join(sl.Where, ", "))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	header := slices.Clone(sl.By)
	if sl.Step != "" {
		header = append(header, "time")
	}
	header = append(header, sl.Measures...)
	fmt.Fprintln(tw, strings.Join(header, "\t")+"\t")
	row := func(labels []string, t string, vals map[string]float64) {
		cols := slices.Clone(labels)
		if sl.Step != "" {
			cols = append(cols, t)
		}
		for _, m := range sl.Measures {
			cols = append(cols, formatMeasure(m, vals[m]))
		}
		fmt.Fprintln(tw, strings.Join(cols, "\t")+"\t")
	}
	group := func(labels []string, g query.Group) {
		if sl.Step == "" {
			row(labels, "", g.Values)
			return
		}
		for _, pt := range g.Series {
			row(labels, time.Unix(int64(pt.T), 0).UTC().Format(time.RFC3339), pt.Values)
		}
	}
	for _, g := range sl.Groups {
		labels := make([]string, len(sl.By))
		for i, l := range sl.By {
			labels[i] = g.Labels[l]
		}
		group(labels, g)
	}
	if len(sl.By) > 0 {
		filler := make([]string, len(sl.By))
		if sl.Rest != nil {
			filler[0] = fmt.Sprintf("(%d more)", sl.Rest.Groups)
			group(filler, sl.Rest.Group)
		}
		filler[0] = "(total)"
		group(filler, sl.Total)
	} else if len(sl.Groups) == 0 {
		group(nil, sl.Total)
	}
	return tw.Flush()
}

// formatMeasure writes a measure for a reader: sums and counts in full,
// rates to four significant digits, shares as a percentage to a tenth. The
// CSV and JSON formats keep every digit.
func formatMeasure(measure string, v float64) string {
	switch {
	case measure == "share":
		return strconv.FormatFloat(100*v, 'f', 1, 64) + "%"
	case measure == "rate" && v != 0 && !math.IsInf(v, 0) && !math.IsNaN(v):
		decimals := max(0, 3-int(math.Floor(math.Log10(math.Abs(v)))))
		return strconv.FormatFloat(v, 'f', decimals, 64)
	}
	return strconv.FormatFloat(v, 'f', -1, 64)
}

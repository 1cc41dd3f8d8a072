package query

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"

	"github.com/dimsum/dimsum/schema"
)

// sliceHandler answers a slice request, or an error.
type sliceHandler func(r *http.Request, p url.Values) (*Slice, error)

// wrapSlice reads a slice request's parameters from the query string, a
// form body or a JSON body, runs h, and writes the answer as JSON in the
// Prometheus envelope or, with format=csv, as CSV. Errors are always in the
// envelope.
func (a *API) wrapSlice(h sliceHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		run, aerr := checkMethod(w, r)
		if !run {
			a.write(w, r, result{}, aerr)
			return
		}
		sl, p, aerr := answerSlice(r, h)
		if aerr == nil && p.Get("format") == "csv" {
			// CSV has no place for them: warnings go in headers.
			for _, warning := range sl.Warnings {
				w.Header().Add(WarningHeader, warning)
			}
			w.Header().Set("Content-Type", "text/csv; charset=utf-8")
			if err := writeCSV(w, sl); err != nil {
				a.opts.Logger.Debug("cannot write response", "err", err)
			}
			return
		}
		a.write(w, r, result{data: sl}, aerr)
	}
}

// answerSlice reads a slice request's parameters and runs h over them.
func answerSlice(r *http.Request, h sliceHandler) (*Slice, url.Values, *apiError) {
	p, err := sliceParams(r)
	if err != nil {
		return nil, nil, badData("%v", err)
	}
	if format := p.Get("format"); format != "" && format != "json" && format != "csv" {
		return nil, p, badData("invalid parameter \"format\": want json or csv, got %q", format)
	}
	sl, err := h(r, p)
	if err != nil {
		return nil, p, sliceError(err)
	}
	return sl, p, nil
}

// WarningHeader carries each warning of a slice answered as CSV.
const WarningHeader = "Dimsum-Warning"

// sliceError maps a slice error to its Prometheus error type.
func sliceError(err error) *apiError {
	var aerr *apiError
	switch {
	case errors.As(err, &aerr):
		return aerr
	case errors.Is(err, context.Canceled):
		return &apiError{typ: errCanceled, err: err}
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{typ: errTimeout, err: err}
	}
	return storageError(err)
}

// maxBodyBytes bounds a JSON request body.
const maxBodyBytes = 1 << 20

// sliceParams returns the request's parameters. A JSON body is an object
// with the same fields as the query string; a list stands for a
// comma-separated value.
func sliceParams(r *http.Request) (url.Values, error) {
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if r.Method != http.MethodPost || ct != "application/json" {
		if err := r.ParseForm(); err != nil {
			return nil, fmt.Errorf("cannot parse form: %v", err)
		}
		return r.Form, nil
	}
	var body map[string]any
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBodyBytes))
	if err := dec.Decode(&body); err != nil {
		return nil, fmt.Errorf("cannot decode the JSON body: %v", err)
	}
	p := url.Values{}
	for k, v := range body {
		switch v := v.(type) {
		case string:
			p.Set(k, v)
		case float64:
			p.Set(k, strconv.FormatFloat(v, 'f', -1, 64))
		case []any:
			parts := make([]string, len(v))
			for i, e := range v {
				s, ok := e.(string)
				if !ok {
					return nil, fmt.Errorf("invalid field %q: want a string or a list of strings", k)
				}
				parts[i] = s
			}
			p.Set(k, strings.Join(parts, ","))
		default:
			return nil, fmt.Errorf("invalid field %q: want a string, a number or a list of strings", k)
		}
	}
	return p, nil
}

func (a *API) slice(r *http.Request, p url.Values) (*Slice, error) {
	req, err := a.parseSlice(p)
	if err != nil {
		return nil, err
	}
	return a.runSlice(r.Context(), req)
}

func (a *API) runSlice(ctx context.Context, req sliceRequest) (*Slice, error) {
	view := a.opts.Source.Open(ctx, req.partial)
	defer view.Close()
	return runSlice(ctx, a.opts.Schema, view, req, a.opts.Now(), a.opts.MaxGroups)
}

// drillDown pins a value at one level of a dimension and groups by the
// level below: dimension names the level, or the whole dimension, whose
// first level without an equality filter is then the one pinned.
func (a *API) drillDown(r *http.Request, p url.Values) (*Slice, error) {
	req, err := a.parseSlice(p)
	if err != nil {
		return nil, err
	}
	value := p.Get("value")
	if !p.Has("value") {
		return nil, inputError("missing parameter \"value\": the value to drill into")
	}
	d, lvl, err := navLevel(req, p)
	if err != nil {
		return nil, err
	}
	levels := req.fam.Dimensions[d].Levels
	if lvl < 0 {
		lvl = 0
		for lvl < len(levels) && pinned(req.where, levels[lvl]) {
			lvl++
		}
	}
	if lvl >= len(levels)-1 {
		return nil, inputError("cannot drill down below %s, the finest level of %s", levels[len(levels)-1], req.fam.Dimensions[d].Name)
	}
	req.where = append(unpin(req.where, levels, lvl), labels.MustNewMatcher(labels.MatchEqual, levels[lvl], value))
	return a.regroup(r.Context(), req, d, levels[lvl+1])
}

// rollUp goes one level up a dimension. Named by a level, it drops the
// filters on that level and below and groups by the level above (by
// nothing of the dimension from its top level). Named as a whole, it undoes
// a drill-down: it drops the equality filter on the dimension's deepest
// pinned level and groups by that level; with no level pinned, it groups by
// the parent of the dimension's deepest group-by level.
func (a *API) rollUp(r *http.Request, p url.Values) (*Slice, error) {
	req, err := a.parseSlice(p)
	if err != nil {
		return nil, err
	}
	if p.Has("value") {
		return nil, inputError("unexpected parameter \"value\": a roll-up takes only the dimension")
	}
	d, lvl, err := navLevel(req, p)
	if err != nil {
		return nil, err
	}
	levels := req.fam.Dimensions[d].Levels
	above := func(lvl int) string {
		if lvl == 0 {
			return ""
		}
		return levels[lvl-1]
	}
	if lvl >= 0 {
		req.where = unpin(req.where, levels, lvl)
		return a.regroup(r.Context(), req, d, above(lvl))
	}
	for i := len(levels) - 1; i >= 0; i-- {
		if pinned(req.where, levels[i]) {
			req.where = unpin(req.where, levels, i)
			return a.regroup(r.Context(), req, d, levels[i])
		}
	}
	for i := len(levels) - 1; i >= 0; i-- {
		if slices.Contains(req.by, levels[i]) {
			return a.regroup(r.Context(), req, d, above(i))
		}
	}
	return nil, inputError("nothing to roll up: %s is neither filtered by equality nor in the group-by", req.fam.Dimensions[d].Name)
}

// unpin drops the filters on a dimension's levels from lvl down.
func unpin(ms []*labels.Matcher, levels []string, lvl int) []*labels.Matcher {
	return slices.DeleteFunc(ms, func(m *labels.Matcher) bool { return slices.Index(levels, m.Name) >= lvl })
}

// navLevel reads the dimension parameter: the dimension, and the level it
// names, or -1 when it names the whole dimension.
func navLevel(req sliceRequest, p url.Values) (dim, level int, err error) {
	name := p.Get("dimension")
	if name == "" {
		return 0, 0, inputError("missing parameter \"dimension\": a dimension or one of its levels")
	}
	if d, l, ok := levelOf(req.fam, name); ok && len(req.fam.Dimensions[d].Levels) > 1 {
		return d, l, nil
	}
	d, err := dimensionOf(req.fam, name)
	return d, -1, err
}

func pinned(ms []*labels.Matcher, label string) bool {
	return slices.ContainsFunc(ms, func(m *labels.Matcher) bool { return m.Name == label && m.Type == labels.MatchEqual })
}

// regroup replaces the dimension's levels in the group-by with level (none
// when "") and runs the slice.
func (a *API) regroup(ctx context.Context, req sliceRequest, dim int, level string) (*Slice, error) {
	levels := req.fam.Dimensions[dim].Levels
	by := slices.DeleteFunc(slices.Clone(req.by), func(l string) bool { return slices.Contains(levels, l) })
	if level != "" {
		by = append(by, level)
	}
	var err error
	if req.by, err = groupLabels(req.fam, by); err != nil {
		return nil, err
	}
	return a.runSlice(ctx, req)
}

// parseSlice reads and checks the slice parameters.
func (a *API) parseSlice(p url.Values) (sliceRequest, error) {
	s := a.opts.Schema
	name := p.Get("family")
	if name == "" {
		return sliceRequest{}, inputError("missing parameter \"family\"")
	}
	req := sliceRequest{fam: s.Family(name), res: -1}
	if req.fam == nil {
		names := make([]string, len(s.Families))
		for i, f := range s.Families {
			names[i] = f.Name
		}
		return sliceRequest{}, inputError("unknown family %q (the schema has %s)", name, strings.Join(names, ", "))
	}
	var err error
	if req.where, err = parseWhere(req.fam, p.Get("where")); err != nil {
		return sliceRequest{}, err
	}
	if req.by, err = groupLabels(req.fam, list(p.Get("by"))); err != nil {
		return sliceRequest{}, err
	}
	if req.start, req.end, err = sliceRange(p, a.opts.Now()); err != nil {
		return sliceRequest{}, err
	}
	if v := p.Get("step"); v != "" {
		if req.step, err = parseDuration(v); err != nil || req.step <= 0 || req.step%time.Millisecond != 0 {
			return sliceRequest{}, inputError("invalid parameter \"step\": %q is not a positive duration", v)
		}
	}
	if v := p.Get("resolution"); v != "" {
		d, err := parseDuration(v)
		req.res = slices.IndexFunc(s.Resolutions, func(r schema.Resolution) bool { return r.Step == d })
		if err != nil || req.res < 0 {
			return sliceRequest{}, inputError("invalid parameter \"resolution\": %q is not the step of a resolution (%s)", v, resolutionSteps(s))
		}
	}
	req.measures = list(p.Get("measures"))
	if len(req.measures) == 0 {
		req.measures = []string{measureSum}
	}
	for _, m := range req.measures {
		if !slices.Contains(allMeasures, m) {
			return sliceRequest{}, inputError("invalid parameter \"measures\": unknown measure %q (want %s)", m, strings.Join(allMeasures, ", "))
		}
	}
	if req.order, req.desc, err = parseOrder(p.Get("order")); err != nil {
		return sliceRequest{}, err
	}
	if req.limit, err = nonNegative(p, "limit"); err != nil {
		return sliceRequest{}, err
	}
	if req.offset, err = nonNegative(p, "offset"); err != nil {
		return sliceRequest{}, err
	}
	var aerr *apiError
	if req.partial, aerr = a.partial(p.Get); aerr != nil {
		return sliceRequest{}, aerr
	}
	return req, nil
}

// defaultSince is the range of a slice that names none.
const defaultSince = time.Hour

// sliceRange reads start and end, or since (a duration ending now); with
// none of them the slice covers the last hour.
func sliceRange(p url.Values, now time.Time) (int64, int64, error) {
	if v := p.Get("since"); v != "" {
		if p.Get("start") != "" || p.Get("end") != "" {
			return 0, 0, inputError("parameter \"since\" excludes \"start\" and \"end\"")
		}
		d, err := parseDuration(v)
		if err != nil || d <= 0 {
			return 0, 0, inputError("invalid parameter \"since\": %q is not a positive duration", v)
		}
		return now.Add(-d).UnixMilli(), now.UnixMilli(), nil
	}
	start, end := now.Add(-defaultSince), now
	var err error
	if v := p.Get("start"); v != "" {
		if start, err = parseTime(v); err != nil {
			return 0, 0, inputError("invalid parameter \"start\": %v", err)
		}
	}
	if v := p.Get("end"); v != "" {
		if end, err = parseTime(v); err != nil {
			return 0, 0, inputError("invalid parameter \"end\": %v", err)
		}
		if p.Get("start") == "" {
			return 0, 0, inputError("parameter \"end\" needs \"start\"")
		}
	}
	if !end.After(start) {
		return 0, 0, inputError("invalid parameter \"end\": end must be after start")
	}
	return start.UnixMilli(), end.UnixMilli(), nil
}

// parseOrder reads a measure, descending with a "-" prefix or a ":desc"
// suffix (":asc" is the explicit ascending). The default is sum descending.
func parseOrder(v string) (string, bool, error) {
	if v == "" {
		return measureSum, true, nil
	}
	m, desc := v, false
	if strings.HasPrefix(m, "-") {
		m, desc = m[1:], true
	} else if base, dir, ok := strings.Cut(m, ":"); ok {
		switch dir {
		case "desc":
			m, desc = base, true
		case "asc":
			m = base
		default:
			return "", false, inputError("invalid parameter \"order\": %q: the direction must be asc or desc", v)
		}
	}
	if !slices.Contains(allMeasures, m) {
		return "", false, inputError("invalid parameter \"order\": %q: want one of %s, with a - prefix or :desc for descending", v, strings.Join(allMeasures, ", "))
	}
	return m, desc, nil
}

func nonNegative(p url.Values, name string) (int, error) {
	v := p.Get(name)
	if v == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, inputError("invalid parameter %q: %q is not a non-negative integer", name, v)
	}
	return n, nil
}

// list reads a comma-separated list, dropping empty entries.
func list(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func resolutionSteps(s *schema.Schema) string {
	out := make([]string, len(s.Resolutions))
	for i, r := range s.Resolutions {
		out[i] = model.Duration(r.Step).String()
	}
	return strings.Join(out, ", ")
}

// writeCSV writes a slice as CSV: the group labels, the point's start time
// for a series, then the measures; the rest row, if any, comes last with
// "(rest)" as its first label.
func writeCSV(w http.ResponseWriter, sl *Slice) error {
	cw := csv.NewWriter(w)
	header := slices.Clone(sl.By)
	if sl.Step != "" {
		header = append(header, "t")
	}
	header = append(header, sl.Measures...)
	if err := cw.Write(header); err != nil {
		return err
	}
	rows := sl.Groups
	if sl.Rest != nil {
		rest := sl.Rest.Group
		rest.Labels = map[string]string{}
		if len(sl.By) > 0 {
			rest.Labels[sl.By[0]] = "(rest)"
		}
		rows = append(slices.Clip(rows), rest)
	}
	for _, g := range rows {
		lbls := make([]string, len(sl.By))
		for i, l := range sl.By {
			lbls[i] = g.Labels[l]
		}
		write := func(t string, vals map[string]float64) error {
			rec := slices.Clone(lbls)
			if t != "" {
				rec = append(rec, t)
			}
			for _, m := range sl.Measures {
				rec = append(rec, strconv.FormatFloat(vals[m], 'f', -1, 64))
			}
			return cw.Write(rec)
		}
		if sl.Step == "" {
			if err := write("", g.Values); err != nil {
				return err
			}
			continue
		}
		for _, pt := range g.Series {
			if err := write(strconv.FormatFloat(pt.T, 'f', -1, 64), pt.Values); err != nil {
				return err
			}
		}
	}
	cw.Flush()
	return cw.Error()
}

// CubeSchema describes the cube for analysts.
type CubeSchema struct {
	Families    []CubeFamily     `json:"families"`
	Resolutions []CubeResolution `json:"resolutions"`
}

// CubeFamily is one family of the cube.
type CubeFamily struct {
	Name       string          `json:"name"`
	Kind       string          `json:"kind"`
	Help       string          `json:"help"`
	Dimensions []CubeDimension `json:"dimensions"`
	Labels     []string        `json:"labels"`
	// Cuboids lists the labels each materialized cuboid keeps, finest
	// first.
	Cuboids [][]string `json:"cuboids"`
}

// CubeDimension is a hierarchy, coarsest level first.
type CubeDimension struct {
	Name   string   `json:"name"`
	Levels []string `json:"levels"`
}

// CubeResolution is one resolution the cube is kept at.
type CubeResolution struct {
	Step      string `json:"step"`
	Retention string `json:"retention"`
}

func (a *API) cubeSchema(*http.Request) (result, *apiError) {
	s := a.opts.Schema
	out := CubeSchema{}
	for _, f := range s.Families {
		cf := CubeFamily{Name: f.Name, Kind: f.Kind.String(), Help: f.Help, Labels: f.Labels}
		for _, d := range f.Dimensions {
			cf.Dimensions = append(cf.Dimensions, CubeDimension{Name: d.Name, Levels: d.Levels})
		}
		for _, c := range f.Cuboids() {
			cf.Cuboids = append(cf.Cuboids, append([]string{}, c.Labels...))
		}
		out.Families = append(out.Families, cf)
	}
	for _, r := range s.Resolutions {
		out.Resolutions = append(out.Resolutions, CubeResolution{Step: schema.FormatDuration(r.Step), Retention: schema.FormatDuration(r.Retention)})
	}
	return result{data: out}, nil
}

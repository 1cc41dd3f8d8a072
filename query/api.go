package query

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"runtime"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/util/annotations"
	"github.com/prometheus/prometheus/util/stats"

	"github.com/dimsum/dimsum/query/explorer"
	"github.com/dimsum/dimsum/schema"
)

// Options configure the HTTP API.
type Options struct {
	// Schema of the cube. Required.
	Schema *schema.Schema
	// Reader of the cube, on a node that holds all of it. Either Reader or
	// Source is required.
	Reader Reader
	// Source of the cube, on a node that reads it from others (the
	// combiners of a cluster). Either Reader or Source is required.
	Source Source
	// PartialResponse is what a request that does not say (with the
	// partial_response parameter) accepts when part of the cube cannot be
	// read: true answers from the rest with a warning naming what is
	// missing, false fails with errorType "unavailable" (503). nil means
	// true: a dashboard with a gap says so, and is better than none.
	PartialResponse *bool
	// Timeout bounds one query's evaluation; a request's own timeout
	// parameter may only shorten it. The default is 2m.
	Timeout time.Duration
	// MaxSamples bounds the samples one query may hold in memory at once,
	// and the samples it may synthesize from the store. The default is
	// 50,000,000, as Prometheus'.
	MaxSamples int
	// MaxSeries bounds the series one query may read from the store. The
	// default is 1,000,000.
	MaxSeries int
	// MaxGroups bounds the groups one cube slice may hold before its limit
	// and offset apply; a slice with more is refused. The default is
	// 10,000.
	MaxGroups int
	// LookbackDelta is how far back an instant selector looks for a sample.
	// The default is 5m, as Prometheus'.
	LookbackDelta time.Duration
	// MaxQueryLength bounds a PromQL expression, and each match[]
	// selector, in bytes. The default is 16 KiB, as VictoriaMetrics'.
	MaxQueryLength int
	// MaxQueryDepth bounds how deep an expression's brackets nest; the
	// parser's cost grows with the square of the nesting. The default is
	// 64.
	MaxQueryDepth int
	// Version is reported by /api/v1/status/buildinfo.
	Version string
	// Flags are what /api/v1/status/flags reports: the command-line flags
	// the node was started with, by name. The default is none.
	Flags map[string]string
	// Logger receives operational logs. nil discards them.
	Logger *slog.Logger
	// Registerer registers the engine's metrics. nil registers none.
	Registerer prometheus.Registerer
	// Now is the clock. The default is time.Now.
	Now func() time.Time
}

// EnsureDefaults fills every unset field with its default.
func (o *Options) EnsureDefaults() {
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.MaxSamples == 0 {
		o.MaxSamples = 50_000_000
	}
	if o.MaxSeries == 0 {
		o.MaxSeries = 1_000_000
	}
	if o.MaxGroups == 0 {
		o.MaxGroups = 10_000
	}
	if o.LookbackDelta == 0 {
		o.LookbackDelta = 5 * time.Minute
	}
	if o.MaxQueryLength == 0 {
		o.MaxQueryLength = 16 << 10
	}
	if o.MaxQueryDepth == 0 {
		o.MaxQueryDepth = 64
	}
	if o.Version == "" {
		o.Version = "devel"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.PartialResponse == nil {
		partial := true
		o.PartialResponse = &partial
	}
	if o.Flags == nil {
		o.Flags = map[string]string{}
	}
}

// API serves the Prometheus HTTP API over the cube.
type API struct {
	opts      Options
	engine    *promql.Engine
	queryable *Queryable
	// started is when the API was built, as /api/v1/status/runtimeinfo
	// reports it.
	started time.Time
}

// NewAPI builds the API and its PromQL engine.
func NewAPI(opts Options) (*API, error) {
	opts.EnsureDefaults()
	if opts.Schema == nil || (opts.Reader == nil) == (opts.Source == nil) {
		return nil, errors.New("query: invalid options: a schema, and either a reader or a source, are required")
	}
	if opts.Source == nil {
		opts.Source = Local(opts.Reader)
	}
	engine := promql.NewEngine(promql.EngineOpts{
		Logger:               opts.Logger,
		Reg:                  opts.Registerer,
		MaxSamples:           opts.MaxSamples,
		Timeout:              opts.Timeout,
		LookbackDelta:        opts.LookbackDelta,
		EnableAtModifier:     true,
		EnableNegativeOffset: true,
		EnablePerStepStats:   true,
		// A subquery without a step evaluates at one minute, Prometheus'
		// default global evaluation interval.
		NoStepSubqueryIntervalFn: func(int64) int64 { return time.Minute.Milliseconds() },
	})
	limits := Limits{MaxSeries: opts.MaxSeries, MaxSamples: opts.MaxSamples}
	return &API{opts: opts, engine: engine, queryable: NewSourceQueryable(opts.Schema, opts.Source, *opts.PartialResponse, limits, opts.Now), started: opts.Now()}, nil
}

// Register adds the API's routes to mux under /api/v1/, and the cube
// explorer page at / (package explorer).
func (a *API) Register(mux *http.ServeMux) {
	mux.HandleFunc("/api/v1/query", a.wrap(a.query))
	mux.HandleFunc("/api/v1/query_range", a.wrap(a.queryRange))
	mux.HandleFunc("/api/v1/labels", a.wrap(a.labelNames))
	mux.HandleFunc("/api/v1/label/{name}/values", a.wrap(a.labelValues))
	mux.HandleFunc("/api/v1/series", a.wrap(a.series))
	mux.HandleFunc("/api/v1/metadata", a.wrap(a.metadata))
	mux.HandleFunc("/api/v1/status/buildinfo", a.wrap(a.buildInfo))
	mux.HandleFunc("/api/v1/query_exemplars", a.wrap(a.queryExemplars))
	mux.HandleFunc("/api/v1/format_query", a.wrap(a.formatQuery))
	mux.HandleFunc("/api/v1/parse_query", a.wrap(a.parseQuery))
	mux.HandleFunc("/api/v1/rules", a.wrap(a.rules))
	mux.HandleFunc("/api/v1/alerts", a.wrap(a.alerts))
	mux.HandleFunc("/api/v1/targets", a.wrap(a.targets))
	mux.HandleFunc("/api/v1/targets/metadata", a.wrap(a.targetsMetadata))
	mux.HandleFunc("/api/v1/alertmanagers", a.wrap(a.alertmanagers))
	mux.HandleFunc("/api/v1/status/flags", a.wrap(a.flags))
	mux.HandleFunc("/api/v1/status/runtimeinfo", a.wrap(a.runtimeInfo))
	// Everything else under /api/v1/ (a Prometheus server's configuration,
	// its TSDB's status, its admin calls) has no counterpart here.
	mux.HandleFunc("/api/v1/", a.wrap(a.notServed))
	mux.HandleFunc("/api/v1/cube/schema", a.wrap(a.cubeSchema))
	mux.HandleFunc("/api/v1/cube/slice", a.wrapSlice(a.slice))
	mux.HandleFunc("/api/v1/cube/drilldown", a.wrapSlice(a.drillDown))
	mux.HandleFunc("/api/v1/cube/rollup", a.wrapSlice(a.rollUp))
	explorer.Register(mux)
}

type queryData struct {
	ResultType parser.ValueType `json:"resultType"`
	Result     parser.Value     `json:"result"`
	Stats      stats.QueryStats `json:"stats,omitempty"`
}

func (a *API) query(r *http.Request) (result, *apiError) {
	ts := a.opts.Now()
	if v := r.FormValue("time"); v != "" {
		var err error
		if ts, err = parseTime(v); err != nil {
			return result{}, badData("invalid parameter \"time\": %v", err)
		}
	}
	p, aerr := a.prepare(r)
	if aerr != nil {
		return result{}, aerr
	}
	defer p.cancel()
	q, err := a.engine.NewInstantQuery(p.ctx, p.queryable, p.opts, p.query, ts)
	if err != nil {
		return result{}, badData("invalid parameter \"query\": %v", err)
	}
	return a.exec(p, q)
}

// maxPoints is Prometheus' limit of points per series in a range query.
const maxPoints = 11000

func (a *API) queryRange(r *http.Request) (result, *apiError) {
	start, err := parseTime(r.FormValue("start"))
	if err != nil {
		return result{}, badData("invalid parameter \"start\": %v", err)
	}
	end, err := parseTime(r.FormValue("end"))
	if err != nil {
		return result{}, badData("invalid parameter \"end\": %v", err)
	}
	if end.Before(start) {
		return result{}, badData("invalid parameter \"end\": end timestamp must not be before start time")
	}
	step, err := parseDuration(r.FormValue("step"))
	if err != nil {
		return result{}, badData("invalid parameter \"step\": %v", err)
	}
	if step <= 0 {
		return result{}, badData("zero or negative query resolution step widths are not accepted. Try a positive integer")
	}
	if end.Sub(start)/step > maxPoints {
		return result{}, badData("exceeded maximum resolution of %d points per timeseries. Try decreasing the query resolution (?step=XX)", maxPoints)
	}
	p, aerr := a.prepare(r)
	if aerr != nil {
		return result{}, aerr
	}
	defer p.cancel()
	q, err := a.engine.NewRangeQuery(p.ctx, p.queryable, p.opts, p.query, start, end, step)
	if err != nil {
		return result{}, badData("invalid parameter \"query\": %v", err)
	}
	return a.exec(p, q)
}

// prepared is a request's expression after planning, with what the request
// asks of its evaluation.
type prepared struct {
	query     string // the planned expression
	queryable *Queryable
	opts      promql.QueryOpts
	stats     string
	ctx       context.Context
	// cancel ends the request's context and closes its view.
	cancel context.CancelFunc
}

// partial reads the partial_response parameter, as Thanos names it.
func (a *API) partial(get func(string) string) (bool, *apiError) {
	switch v := get("partial_response"); v {
	case "":
		return *a.opts.PartialResponse, nil
	case "true", "1":
		return true, nil
	case "false", "0":
		return false, nil
	default:
		return false, badData("invalid parameter \"partial_response\": want true or false, got %q", v)
	}
}

// open opens the view a request reads through, as its partial_response
// parameter asks.
func (a *API) open(ctx context.Context, get func(string) string) (View, *apiError) {
	partial, aerr := a.partial(get)
	if aerr != nil {
		return nil, aerr
	}
	return a.opts.Source.Open(ctx, partial), nil
}

// prepare parses and plans the query parameter and reads the parameters
// that shape its evaluation: timeout, lookback_delta, stats,
// max_source_resolution and partial_response.
func (a *API) prepare(r *http.Request) (prepared, *apiError) {
	expr, aerr := a.readQuery(r)
	if aerr != nil {
		return prepared{}, aerr
	}
	if err := checkReserved(expr); err != nil {
		return prepared{}, badData("invalid parameter \"query\": %v", err)
	}
	plan(a.opts.Schema, expr)
	p := prepared{query: expr.String(), queryable: a.queryable, stats: r.FormValue("stats")}
	if v := r.FormValue("max_source_resolution"); v != "" && v != "auto" {
		d, err := parseDuration(v)
		if v == "raw" {
			d, err = 0, nil
		}
		if err != nil || d < 0 {
			return prepared{}, badData("invalid parameter \"max_source_resolution\": want a duration, \"raw\" or \"auto\", got %q", v)
		}
		p.queryable = a.queryable.WithMaxResolution(d)
	}
	var lookback time.Duration
	if v := r.FormValue("lookback_delta"); v != "" {
		var err error
		if lookback, err = parseDuration(v); err != nil || lookback < 0 {
			return prepared{}, badData("invalid parameter \"lookback_delta\": %q is not a non-negative duration", v)
		}
	}
	p.opts = promql.NewPrometheusQueryOpts(p.stats == "all", lookback, nil)
	p.ctx, p.cancel = r.Context(), func() {}
	if v := r.FormValue("timeout"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d <= 0 {
			return prepared{}, badData("invalid parameter \"timeout\": %q is not a positive duration", v)
		}
		p.ctx, p.cancel = context.WithTimeout(p.ctx, d)
	}
	view, aerr := a.open(p.ctx, r.FormValue)
	if aerr != nil {
		p.cancel()
		return prepared{}, aerr
	}
	p.queryable = p.queryable.withView(view)
	cancel := p.cancel
	p.cancel = func() { view.Close(); cancel() }
	return p, nil
}

func (a *API) exec(p prepared, q promql.Query) (result, *apiError) {
	defer q.Close()
	// A timeout that passed while the request was parsed and planned: the
	// context's timer may not have fired yet, and the engine would run.
	if d, ok := p.ctx.Deadline(); ok && !time.Now().Before(d) {
		return result{}, &apiError{typ: errTimeout, err: fmt.Errorf("query timed out before its evaluation began: %w", context.DeadlineExceeded)}
	}
	res := q.Exec(p.ctx)
	if res.Err != nil {
		return result{annos: res.Warnings}, engineError(res.Err)
	}
	data := queryData{ResultType: res.Value.Type(), Result: emptyList(res.Value)}
	if p.stats != "" {
		data.Stats = stats.NewQueryStats(q.Stats())
	}
	return result{data: data, annos: res.Warnings}, nil
}

// emptyList returns v with a nil vector or matrix made empty, so that an
// answer without series is "result":[], as Prometheus writes it, not null.
func emptyList(v parser.Value) parser.Value {
	switch v := v.(type) {
	case promql.Vector:
		if v == nil {
			return promql.Vector{}
		}
	case promql.Matrix:
		if v == nil {
			return promql.Matrix{}
		}
	}
	return v
}

// engineError classifies an evaluation error the way Prometheus' API does.
func engineError(err error) *apiError {
	var (
		canceled promql.ErrQueryCanceled
		timeout  promql.ErrQueryTimeout
		stor     promql.ErrStorage
	)
	switch {
	case errors.As(err, &canceled), errors.Is(err, context.Canceled):
		return &apiError{typ: errCanceled, err: err}
	case errors.As(err, &timeout), errors.Is(err, context.DeadlineExceeded):
		return &apiError{typ: errTimeout, err: err}
	case errors.Is(err, ErrUnavailable), errors.As(err, &stor) && errors.Is(stor.Err, ErrUnavailable):
		return &apiError{typ: errUnavailable, err: err}
	case errors.As(err, &stor):
		return &apiError{typ: errInternal, err: err}
	}
	return &apiError{typ: errExec, err: err}
}

// storageError classifies an error of the store outside the engine.
func storageError(err error) *apiError {
	if errors.Is(err, ErrUnavailable) {
		return &apiError{typ: errUnavailable, err: err}
	}
	return &apiError{typ: errInternal, err: err}
}

// promqlParser parses match[] selectors with PromQL's default options, as
// the engine parses queries.
var promqlParser = parser.NewParser(parser.Options{})

// selectors parses the match[] parameters. Each must have a matcher that
// the empty string fails.
func (a *API) selectors(r *http.Request) ([][]*labels.Matcher, *apiError) {
	var out [][]*labels.Matcher
	for _, s := range r.Form["match[]"] {
		if aerr := a.checkQuery("match[]", s); aerr != nil {
			return nil, aerr
		}
		ms, err := promqlParser.ParseMetricSelector(s)
		if err == nil {
			err = reservedMatcher(ms)
		}
		if err != nil {
			return nil, badData("invalid parameter \"match[]\": %v", err)
		}
		if !selectsSomething(ms) {
			return nil, errEmptySelector(s)
		}
		out = append(out, ms)
	}
	return out, nil
}

// truncate cuts a list to the limit, warning as Prometheus does.
func truncate[T any](list []T, n int) ([]T, annotations.Annotations) {
	if n == 0 || len(list) <= n {
		return list, nil
	}
	var annos annotations.Annotations
	annos.Add(errors.New("results truncated due to limit"))
	return list[:n], annos
}

// labelQuery runs f over the union of the match[] selectors (or once with no
// matchers) and merges the sorted results.
func (a *API) labelQuery(r *http.Request, f func(storage.Querier, []*labels.Matcher) ([]string, error)) (result, *apiError) {
	start, end, aerr := timeRange(r)
	if aerr != nil {
		return result{}, aerr
	}
	sels, aerr := a.selectors(r)
	if aerr != nil {
		return result{}, aerr
	}
	n, aerr := limit(r)
	if aerr != nil {
		return result{}, aerr
	}
	if len(sels) == 0 {
		sels = [][]*labels.Matcher{nil}
	}
	view, aerr := a.open(r.Context(), r.FormValue)
	if aerr != nil {
		return result{}, aerr
	}
	defer view.Close()
	q, _ := a.queryable.withView(view).Querier(start, end)
	defer q.Close()
	set := map[string]struct{}{}
	for _, ms := range sels {
		vals, err := f(q, ms)
		if err != nil {
			return result{}, storageError(err)
		}
		for _, v := range vals {
			set[v] = struct{}{}
		}
	}
	out, annos := truncate(nonNil(slices.Sorted(maps.Keys(set))), n)
	return result{data: out, annos: annos.Merge(view.Warnings())}, nil
}

func (a *API) labelNames(r *http.Request) (result, *apiError) {
	return a.labelQuery(r, func(q storage.Querier, ms []*labels.Matcher) ([]string, error) {
		names, _, err := q.LabelNames(r.Context(), nil, ms...)
		return names, err
	})
}

func (a *API) labelValues(r *http.Request) (result, *apiError) {
	name := r.PathValue("name")
	if !model.UTF8Validation.IsValidLabelName(name) {
		return result{}, badData("invalid label name: %q", name)
	}
	return a.labelQuery(r, func(q storage.Querier, ms []*labels.Matcher) ([]string, error) {
		vals, _, err := q.LabelValues(r.Context(), name, nil, ms...)
		return vals, err
	})
}

func (a *API) series(r *http.Request) (result, *apiError) {
	sels, aerr := a.selectors(r)
	if aerr != nil {
		return result{}, aerr
	}
	if len(sels) == 0 {
		return result{}, badData("no match[] parameter provided")
	}
	start, end, aerr := timeRange(r)
	if aerr != nil {
		return result{}, aerr
	}
	n, aerr := limit(r)
	if aerr != nil {
		return result{}, aerr
	}
	view, aerr := a.open(r.Context(), r.FormValue)
	if aerr != nil {
		return result{}, aerr
	}
	defer view.Close()
	q, _ := a.queryable.withView(view).Querier(start, end)
	defer q.Close()
	var sets []storage.SeriesSet
	for _, ms := range sels {
		sets = append(sets, q.Select(r.Context(), true, &storage.SelectHints{Start: start, End: end, Func: "series"}, ms...))
	}
	set := storage.NewMergeSeriesSet(sets, 0, storage.ChainedSeriesMerge)
	out := []labels.Labels{}
	for set.Next() {
		out = append(out, set.At().Labels())
	}
	if err := set.Err(); err != nil {
		return result{}, engineError(err)
	}
	out, annos := truncate(out, n)
	return result{data: out, annos: annos.Merge(set.Warnings())}, nil
}

type metadata struct {
	Type string `json:"type"`
	Help string `json:"help"`
	Unit string `json:"unit"`
}

func (a *API) metadata(r *http.Request) (result, *apiError) {
	n, aerr := limit(r)
	if aerr != nil {
		return result{}, aerr
	}
	metric := r.FormValue("metric")
	out := map[string][]metadata{}
	var names []string
	for _, f := range a.opts.Schema.Families {
		for _, m := range []struct {
			name string
			md   metadata
		}{
			{f.Name + TotalSuffix, metadata{Type: "counter", Help: f.Help + " Cumulative view: use rate() or increase(); raw values are offsets."}},
			{f.Name + DeltaSuffix, metadata{Type: "gauge", Help: f.Help + " Per-step view: each sample is the exact count of its step."}},
		} {
			if metric == "" || metric == m.name {
				out[m.name] = []metadata{m.md}
				names = append(names, m.name)
			}
		}
	}
	if n > 0 && len(names) > n {
		slices.Sort(names)
		for _, name := range names[n:] {
			delete(out, name)
		}
	}
	return result{data: out}, nil
}

func (a *API) buildInfo(*http.Request) (result, *apiError) {
	return result{data: map[string]string{
		"version":   a.opts.Version,
		"revision":  "",
		"branch":    "",
		"buildUser": "",
		"buildDate": "",
		"goVersion": runtime.Version(),
	}}, nil
}

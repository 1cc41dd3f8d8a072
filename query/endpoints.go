package query

import (
	"fmt"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/prometheus/prometheus/promql/parser"
)

// The endpoints below exist so that Grafana and Prometheus' own tools find
// everything they call. dimsum keeps no exemplars, evaluates no rules,
// scrapes no targets and notifies no Alertmanager: those answer empty
// successes, in the shapes Prometheus gives them. What belongs to a
// Prometheus server alone (its configuration, its TSDB's status, its admin
// calls) is not served: a 404 in the error envelope, as Thanos' query
// nodes answer it.

func (a *API) queryExemplars(r *http.Request) (result, *apiError) {
	if _, _, aerr := timeRange(r); aerr != nil {
		return result{}, aerr
	}
	if _, aerr := a.readQuery(r); aerr != nil {
		return result{}, aerr
	}
	return result{data: []any{}}, nil
}

func (*API) rules(*http.Request) (result, *apiError) {
	return result{data: map[string]any{"groups": []any{}}}, nil
}

func (*API) alerts(*http.Request) (result, *apiError) {
	return result{data: map[string]any{"alerts": []any{}}}, nil
}

func (*API) targets(*http.Request) (result, *apiError) {
	return result{data: map[string]any{"activeTargets": []any{}, "droppedTargets": []any{}, "droppedTargetCounts": map[string]int{}}}, nil
}

func (*API) targetsMetadata(*http.Request) (result, *apiError) {
	return result{data: []any{}}, nil
}

func (*API) alertmanagers(*http.Request) (result, *apiError) {
	return result{data: map[string]any{"activeAlertmanagers": []any{}, "droppedAlertmanagers": []any{}}}, nil
}

func (a *API) flags(*http.Request) (result, *apiError) {
	return result{data: a.opts.Flags}, nil
}

// runtimeInfo answers /api/v1/status/runtimeinfo with Prometheus' fields;
// the storage retention is the schema's resolutions, each with its own.
func (a *API) runtimeInfo(*http.Request) (result, *apiError) {
	cwd, _ := os.Getwd()
	host, _ := os.Hostname()
	retention := make([]string, len(a.opts.Schema.Resolutions))
	for i, r := range a.opts.Schema.Resolutions {
		retention[i] = r.String()
	}
	return result{data: map[string]any{
		"startTime":           a.started,
		"CWD":                 cwd,
		"hostname":            host,
		"serverTime":          a.opts.Now().UTC(),
		"reloadConfigSuccess": true,
		"lastConfigTime":      a.started,
		"corruptionCount":     0,
		"goroutineCount":      runtime.NumGoroutine(),
		"GOMAXPROCS":          runtime.GOMAXPROCS(0),
		"GOMEMLIMIT":          debug.SetMemoryLimit(-1),
		"GOGC":                os.Getenv("GOGC"),
		"GODEBUG":             os.Getenv("GODEBUG"),
		"storageRetention":    strings.Join(retention, ", "),
	}}, nil
}

// notServed answers every path under /api/v1/ that no endpoint serves.
func (*API) notServed(r *http.Request) (result, *apiError) {
	return result{}, &apiError{typ: errNotFound, err: fmt.Errorf("dimsum does not serve %s; docs/grafana.md lists the endpoints it serves", r.URL.Path)}
}

func (a *API) formatQuery(r *http.Request) (result, *apiError) {
	expr, aerr := a.readQuery(r)
	if aerr != nil {
		return result{}, aerr
	}
	return result{data: parser.Prettify(expr)}, nil
}

func (a *API) parseQuery(r *http.Request) (result, *apiError) {
	expr, aerr := a.readQuery(r)
	if aerr != nil {
		return result{}, aerr
	}
	return result{data: syntaxTree(expr)}, nil
}

// readQuery checks the query parameter against the limits and parses it.
func (a *API) readQuery(r *http.Request) (parser.Expr, *apiError) {
	q := r.FormValue("query")
	if aerr := a.checkQuery("query", q); aerr != nil {
		return nil, aerr
	}
	expr, err := promqlParser.ParseExpr(q)
	if err != nil {
		return nil, badData("invalid parameter \"query\": %v", err)
	}
	return expr, nil
}

// syntaxTree renders an expression as the JSON tree Prometheus' parse_query
// answers with: one object per node, with its "type", the fields that node
// kind has, and its operands.
func syntaxTree(e parser.Expr) any {
	if e == nil {
		return nil
	}
	n := map[string]any{}
	switch e := e.(type) {
	case *parser.AggregateExpr:
		n["type"], n["op"], n["without"] = "aggregation", e.Op.String(), e.Without
		n["grouping"] = nonNil(e.Grouping)
		n["expr"], n["param"] = syntaxTree(e.Expr), syntaxTree(e.Param)
	case *parser.BinaryExpr:
		n["type"], n["op"], n["bool"] = "binaryExpr", e.Op.String(), e.ReturnBool
		n["lhs"], n["rhs"] = syntaxTree(e.LHS), syntaxTree(e.RHS)
		n["matching"] = nil
		if m := e.VectorMatching; m != nil {
			n["matching"] = map[string]any{
				"card": m.Card.String(), "on": m.On,
				"labels": nonNil(m.MatchingLabels), "include": nonNil(m.Include),
			}
		}
	case *parser.Call:
		args := make([]any, len(e.Args))
		for i, a := range e.Args {
			args[i] = syntaxTree(a)
		}
		n["type"], n["args"] = "call", args
		n["func"] = map[string]any{
			"name": e.Func.Name, "argTypes": e.Func.ArgTypes,
			"variadic": e.Func.Variadic, "returnType": e.Func.ReturnType,
		}
	case *parser.MatrixSelector:
		n = selectorNode(e.VectorSelector.(*parser.VectorSelector))
		n["type"], n["range"] = "matrixSelector", e.Range.Milliseconds()
	case *parser.SubqueryExpr:
		n["type"], n["expr"] = "subquery", syntaxTree(e.Expr)
		n["range"], n["step"], n["offset"] = e.Range.Milliseconds(), e.Step.Milliseconds(), e.OriginalOffset.Milliseconds()
		n["timestamp"], n["startOrEnd"] = e.Timestamp, startOrEnd(e.StartOrEnd)
	case *parser.NumberLiteral:
		n["type"], n["val"] = "numberLiteral", strconv.FormatFloat(e.Val, 'f', -1, 64)
	case *parser.StringLiteral:
		n["type"], n["val"] = "stringLiteral", e.Val
	case *parser.ParenExpr:
		n["type"], n["expr"] = "parenExpr", syntaxTree(e.Expr)
	case *parser.UnaryExpr:
		n["type"], n["op"], n["expr"] = "unaryExpr", e.Op.String(), syntaxTree(e.Expr)
	case *parser.VectorSelector:
		n = selectorNode(e)
		n["type"] = "vectorSelector"
	default:
		n["type"], n["expr"] = "unknown", e.String()
	}
	return n
}

func selectorNode(vs *parser.VectorSelector) map[string]any {
	ms := make([]map[string]string, len(vs.LabelMatchers))
	for i, m := range vs.LabelMatchers {
		ms[i] = map[string]string{"name": m.Name, "type": m.Type.String(), "value": m.Value}
	}
	return map[string]any{
		"name": vs.Name, "matchers": ms, "offset": vs.OriginalOffset.Milliseconds(),
		"timestamp": vs.Timestamp, "startOrEnd": startOrEnd(vs.StartOrEnd),
	}
}

func startOrEnd(t parser.ItemType) any {
	switch t {
	case parser.START:
		return "start"
	case parser.END:
		return "end"
	}
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

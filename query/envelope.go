package query

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/prometheus/prometheus/util/annotations"
)

// Error types of the Prometheus API (web/api/v1 names these and no
// others), with the HTTP status each maps to.
type errorType string

const (
	errBadData  errorType = "bad_data"
	errExec     errorType = "execution"
	errCanceled errorType = "canceled"
	errTimeout  errorType = "timeout"
	errInternal errorType = "internal"
	errNotFound errorType = "not_found"
	// errUnavailable is a query asking for a complete answer when part of
	// the cube cannot be read.
	errUnavailable errorType = "unavailable"
)

func (t errorType) status() int {
	switch t {
	case errBadData:
		return http.StatusBadRequest
	case errExec:
		return http.StatusUnprocessableEntity
	case errCanceled:
		return 499
	case errTimeout, errUnavailable:
		return http.StatusServiceUnavailable
	case errNotFound:
		return http.StatusNotFound
	default:
		return http.StatusInternalServerError
	}
}

type apiError struct {
	typ errorType
	err error
	// status, when set, is the HTTP status in place of the type's.
	status int
}

func (e *apiError) httpStatus() int {
	if e.status != 0 {
		return e.status
	}
	return e.typ.status()
}

func (e *apiError) Error() string { return string(e.typ) + ": " + e.err.Error() }

func badData(format string, args ...any) *apiError {
	return &apiError{typ: errBadData, err: fmt.Errorf(format, args...)}
}

type response struct {
	Status    string   `json:"status"`
	Data      any      `json:"data,omitempty"`
	ErrorType string   `json:"errorType,omitempty"`
	Error     string   `json:"error,omitempty"`
	Warnings  []string `json:"warnings,omitempty"`
	Infos     []string `json:"infos,omitempty"`
}

type result struct {
	data  any
	annos annotations.Annotations
}

type handler func(r *http.Request) (result, *apiError)

// wrap parses the form (GET query or POST form body), runs h and writes the
// Prometheus JSON envelope.
func (a *API) wrap(h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var res result
		run, aerr := checkMethod(w, r)
		if run {
			if err := r.ParseForm(); err != nil {
				aerr = badData("cannot parse form: %v", err)
			} else {
				res, aerr = h(r)
			}
		}
		a.write(w, r, res, aerr)
	}
}

// allowedMethods are the methods every endpoint takes, as the Allow header
// lists them.
const allowedMethods = "GET, POST, OPTIONS"

// checkMethod reports whether the endpoint runs for r's method: GET and
// POST run it; OPTIONS answers an empty success, as Prometheus does; any
// other method is refused with 405 and errorType bad_data, Prometheus'
// type for a request that cannot be served as sent.
func checkMethod(w http.ResponseWriter, r *http.Request) (bool, *apiError) {
	switch r.Method {
	case http.MethodGet, http.MethodPost:
		return true, nil
	case http.MethodOptions:
		w.Header().Set("Allow", allowedMethods)
		return false, nil
	}
	w.Header().Set("Allow", allowedMethods)
	return false, &apiError{typ: errBadData, status: http.StatusMethodNotAllowed,
		err: fmt.Errorf("method %s is not allowed on %s; use GET or POST", r.Method, r.URL.Path)}
}

// write writes a handler's answer in the Prometheus JSON envelope. An error
// carries no warnings, as in Prometheus.
func (a *API) write(w http.ResponseWriter, r *http.Request, res result, aerr *apiError) {
	resp := response{Status: "success", Data: res.data}
	status := http.StatusOK
	if aerr != nil {
		resp = response{Status: "error", ErrorType: string(aerr.typ), Error: aerr.err.Error()}
		status = aerr.httpStatus()
		if aerr.typ == errInternal {
			a.opts.Logger.Error("query failed", "path", r.URL.Path, "err", aerr.err)
		}
	} else {
		resp.Warnings, resp.Infos = res.annos.AsStrings(r.FormValue("query"), 10, 10)
	}
	if err := writeResponse(w, status, resp); err != nil {
		a.opts.Logger.Debug("cannot write response", "err", err)
	}
}

// WriteSuccess writes data as a successful answer in the Prometheus JSON
// envelope, for the node's endpoints beside the query API's.
func WriteSuccess(w http.ResponseWriter, data any) error {
	return writeResponse(w, http.StatusOK, response{Status: "success", Data: data})
}

func writeResponse(w http.ResponseWriter, status int, resp response) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(resp)
}

package query

import (
	"github.com/prometheus/prometheus/model/labels"
)

// checkQuery refuses a PromQL expression longer than MaxQueryLength bytes
// or nesting brackets deeper than MaxQueryDepth, before it is parsed: the
// PromQL parser's time grows with the square of the nesting (50,000 nested
// parentheses cost 15.7 s of CPU), and the engine walks the tree
// recursively.
func (a *API) checkQuery(param, q string) *apiError {
	if len(q) > a.opts.MaxQueryLength {
		return badData("invalid parameter %q: %d bytes, the limit is %d", param, len(q), a.opts.MaxQueryLength)
	}
	if d := nesting(q); d > a.opts.MaxQueryDepth {
		return badData("invalid parameter %q: brackets nest %d deep, the limit is %d", param, d, a.opts.MaxQueryDepth)
	}
	return nil
}

// nesting returns the deepest nesting of (, [ and { in a PromQL expression,
// outside string literals and comments. It does not check that brackets
// match: the parser does.
func nesting(q string) int {
	depth, deepest := 0, 0
	for i := 0; i < len(q); i++ {
		switch c := q[i]; c {
		case '(', '[', '{':
			depth++
			deepest = max(deepest, depth)
		case ')', ']', '}':
			depth--
		case '#':
			for i < len(q) && q[i] != '\n' {
				i++
			}
		case '"', '\'', '`':
			// A string runs to its closing quote; in "" and '' a
			// backslash escapes the next byte, in a raw `` string
			// nothing does.
			for i++; i < len(q) && q[i] != c; i++ {
				if q[i] == '\\' && c != '`' {
					i++
				}
			}
		}
	}
	return deepest
}

// selectsSomething reports whether a selector has a matcher that the empty
// string fails, as Prometheus requires of match[]: without one, {} or
// {a=""} reads every series of the store.
func selectsSomething(ms []*labels.Matcher) bool {
	for _, m := range ms {
		if !m.Matches("") {
			return true
		}
	}
	return false
}

// errEmptySelector is the error of a match[] that selects everything.
func errEmptySelector(s string) *apiError {
	return badData("invalid parameter \"match[]\": %q has no matcher that needs a non-empty value, so it would read every series", s)
}

package node

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"
)

// notFound is how the YAML decoder reports an unknown key.
var notFound = regexp.MustCompile(`^line (\d+): field (.+) not found in type (\S+)$`)

// configError rewrites a decoding error in the config's terms: an unknown
// key is named with the section it stands in and the key it most likely
// meant, not with the Go type the decoder fills ("field http_listn not
// found in type node.Config").
func configError(err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	msgs := make([]string, len(te.Errors))
	for i, e := range te.Errors {
		msgs[i] = e
		m := notFound.FindStringSubmatch(e)
		if m == nil {
			continue
		}
		sec, ok := configSections()[m[3]]
		if !ok {
			continue
		}
		msgs[i] = fmt.Sprintf("line %s: unknown key %q in %s", m[1], m[2], sec.where)
		if guess := closest(m[2], sec.keys); guess != "" {
			msgs[i] += fmt.Sprintf("; did you mean %q?", guess)
		} else {
			msgs[i] += fmt.Sprintf(" (its keys: %s)", strings.Join(sec.keys, ", "))
		}
	}
	return fmt.Errorf("%w: %s", ErrConfig, strings.Join(msgs, "; "))
}

// section is one mapping of the config: where it stands and its keys.
type section struct {
	where string
	keys  []string
}

// configSections maps each Go type of the config to its section, found by
// walking Config's yaml tags.
var configSections = sync.OnceValue(func() map[string]section {
	out := map[string]section{}
	var walk func(t reflect.Type, path string)
	walk = func(t reflect.Type, path string) {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice || t.Kind() == reflect.Map {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct {
			return
		}
		where := "the top level"
		if path != "" {
			where = path
		}
		sec := out[t.String()]
		if sec.where != "" && sec.where != where {
			// One type in several places (tls, cluster.tls).
			where = sec.where + " or " + where
		}
		var keys []string
		for i := range t.NumField() {
			f := t.Field(i)
			key, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if key == "" || key == "-" || !f.IsExported() {
				continue
			}
			keys = append(keys, key)
			walk(f.Type, strings.TrimPrefix(path+"."+key, "."))
		}
		slices.Sort(keys)
		out[t.String()] = section{where: where, keys: keys}
	}
	walk(reflect.TypeFor[Config](), "")
	return out
})

// closest returns the key nearest to name by edit distance, if it is near
// enough to be a typo: at most two edits, or a third of the key.
func closest(name string, keys []string) string {
	best, bestD := "", max(2, len(name)/3)+1
	for _, k := range keys {
		if d := editDistance(name, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev, cur := make([]int, len(b)+1), make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

package auth

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

func sum(token string) string {
	s := sha256.Sum256([]byte(token))
	return hex.EncodeToString(s[:])
}

func TestParse(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	good := fmt.Sprintf("credentials:\n  - {name: a, token_sha256: %s, rights: [push]}\n  - {name: b, username: u, password_bcrypt: '%s', rights: [query, admin]}\n", sum("t"), hash)
	s, err := Parse([]byte(good))
	if err != nil || s.Len() != 2 {
		t.Fatalf("Parse: %v, %d credentials", err, s.Len())
	}
	if s, err := Parse(nil); err != nil || s.Len() != 0 {
		t.Errorf("an empty file: %v, %v; want no credential", s, err)
	}
	for _, c := range []struct{ name, yaml, want string }{
		{"unknown field", "credentials: [{name: a, token: t, rights: [push]}]", "field token not found"},
		{"no name", "credentials: [{token_sha256: " + sum("t") + ", rights: [push]}]", "credential 1 has no name"},
		{"name twice", "credentials: [{name: a, token_sha256: " + sum("t") + ", rights: [push]}, {name: a, token_sha256: " + sum("u") + ", rights: [push]}]", `credential 2 ("a"): the name is used twice`},
		{"neither token nor user", "credentials: [{name: a, rights: [push]}]", "either token_sha256 or username"},
		{"both token and user", "credentials: [{name: a, token_sha256: " + sum("t") + ", username: u, rights: [push]}]", "either token_sha256 or username"},
		{"user without password", "credentials: [{name: a, username: u, rights: [push]}]", `username "u" needs password_bcrypt`},
		{"token with password", "credentials: [{name: a, token_sha256: " + sum("t") + ", password_bcrypt: x, rights: [push]}]", "goes with a username"},
		{"no rights", "credentials: [{name: a, token_sha256: " + sum("t") + "}]", "has no rights"},
		{"unknown right", "credentials: [{name: a, token_sha256: " + sum("t") + ", rights: [root]}]", `unknown right "root"`},
		{"short token hash", "credentials: [{name: a, token_sha256: abcd, rights: [push]}]", "64 hex digits"},
		{"plain token", "credentials: [{name: a, token_sha256: secret-token-secret-token-secret-token-secret-token-secret-token, rights: [push]}]", "64 hex digits"},
		{"token twice", "credentials: [{name: a, token_sha256: " + sum("t") + ", rights: [push]}, {name: b, token_sha256: " + sum("t") + ", rights: [query]}]", `the token is also "a"'s`},
		{"plain password", "credentials: [{name: a, username: u, password_bcrypt: hunter2, rights: [push]}]", "not a bcrypt hash"},
		{"user twice", fmt.Sprintf("credentials: [{name: a, username: u, password_bcrypt: '%s', rights: [push]}, {name: b, username: u, password_bcrypt: '%s', rights: [push]}]", hash, hash), `username "u" is also "a"'s`},
		{"not YAML", "credentials: {", "invalid credentials file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse([]byte(c.yaml))
			if !errors.Is(err, ErrFile) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%v, want ErrFile naming %q", err, c.want)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Parse([]byte(fmt.Sprintf("credentials:\n  - {name: pipeline, token_sha256: %s, rights: [push]}\n  - {name: grafana, username: g, password_bcrypt: '%s', rights: [query]}\n", sum("tok"), hash)))
	if err != nil {
		t.Fatal(err)
	}
	basic := func(u, p string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(u+":"+p)) }
	for _, c := range []struct {
		header string
		need   Right
		name   string
		err    error
	}{
		{"Bearer tok", Push, "pipeline", nil},
		{"bearer   tok", Push, "pipeline", nil},
		{"Bearer tok", Query, "pipeline", ErrForbidden},
		{"Bearer tok", Push | Query, "pipeline", ErrForbidden},
		{"Bearer other", Push, "", ErrUnauthenticated},
		{"Bearer ", Push, "", ErrUnauthenticated},
		{"", Push, "", ErrUnauthenticated},
		{"tok", Push, "", ErrUnauthenticated},
		{basic("g", "pw"), Query, "grafana", nil},
		{basic("g", "pw"), Query, "grafana", nil}, // the second time from the cache
		{basic("g", "pw"), Admin, "grafana", ErrForbidden},
		{basic("g", "wrong"), Query, "", ErrUnauthenticated},
		{basic("nobody", "pw"), Query, "", ErrUnauthenticated},
		{"Basic !!!", Query, "", ErrUnauthenticated},
		{"Basic " + base64.StdEncoding.EncodeToString([]byte("no colon")), Query, "", ErrUnauthenticated},
	} {
		name, err := s.Check(c.header, c.need)
		if name != c.name || !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Errorf("Check(%q, %v) = %q, %v; want %q, %v", c.header, c.need, name, err, c.name, c.err)
		}
	}
}

// FuzzParse checks that no credentials file panics the parser, that every
// refusal is classified, and that every credential parsed has a name and
// a right.
func FuzzParse(f *testing.F) {
	f.Add([]byte("credentials:\n  - {name: a, token_sha256: " + sum("t") + ", rights: [push, query]}\n"))
	f.Add([]byte("credentials:\n  - {name: b, username: u, password_bcrypt: '$2a$04$abcdefghijklmnopqrstuuOQ3Z1P0gSgQ5dTh1hzkYnybbHfhUNdyq', rights: [admin]}\n"))
	f.Add([]byte("credentials: [{name: a}]"))
	f.Add([]byte("credentials: {"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse(data)
		if err != nil {
			if !errors.Is(err, ErrFile) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		for _, c := range s.tokens {
			if c.name == "" || c.rights == 0 {
				t.Fatalf("a token credential %+v", c)
			}
		}
		for _, c := range s.users {
			if c.name == "" || c.rights == 0 || len(c.hash) == 0 {
				t.Fatalf("a user credential %+v", c)
			}
		}
	})
}

// TestGuardRefusesEmptyFile: a guard never puts in force a file without a
// credential, which would refuse every call; at start that is an error,
// and on a reload the credentials before it stay.
func TestGuardRefusesEmptyFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "credentials.yaml")
	for _, empty := range []string{"", "credentials: []\n", "# rewritten\n"} {
		if err := os.WriteFile(file, []byte(empty), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := NewGuard(Options{File: file}); !errors.Is(err, ErrFile) {
			t.Errorf("a guard over %q: %v, want ErrFile", empty, err)
		}
	}
	if err := os.WriteFile(file, []byte("credentials:\n  - {name: a, token_sha256: "+sum("t")+", rights: [push]}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	g, err := NewGuard(Options{File: file})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := g.Reload(); !errors.Is(err, ErrFile) {
		t.Errorf("reloading an empty file: %v, want ErrFile", err)
	}
	if _, err := g.Check("grpc", "Bearer t", Push); err != nil {
		t.Errorf("the credential in force before the empty file: %v", err)
	}
}

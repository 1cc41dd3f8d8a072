package auth

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync/atomic"

	"go.yaml.in/yaml/v3"
	"golang.org/x/crypto/bcrypt"
)

// Right is a set of things a credential may do.
type Right uint8

// The rights. ONLY APPEND: they are named in credential files.
const (
	// Push sends batches of events (gRPC Push).
	Push Right = 1 << iota
	// Query reads: the Prometheus API, cube slices, the explorer page.
	Query
	// Admin reads the node's own state (/metrics, cluster status) and
	// asks it to read its files again (/-/reload).
	Admin
)

var rightNames = []string{"push", "query", "admin"}

func (r Right) String() string {
	var names []string
	for i, n := range rightNames {
		if r&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, ",")
}

var (
	// ErrFile marks a credentials file that cannot be used.
	ErrFile = errors.New("auth: invalid credentials file")
	// ErrUnauthenticated marks a call with no credential, a malformed one
	// or one not in force (HTTP 401, gRPC Unauthenticated).
	ErrUnauthenticated = errors.New("auth: no valid credential")
	// ErrForbidden marks a call whose credential lacks the right it needs
	// (HTTP 403, gRPC PermissionDenied).
	ErrForbidden = errors.New("auth: permission denied")
)

// file is the YAML form of a credentials file.
type file struct {
	Credentials []struct {
		Name           string   `yaml:"name"`
		TokenSHA256    string   `yaml:"token_sha256"`
		Username       string   `yaml:"username"`
		PasswordBcrypt string   `yaml:"password_bcrypt"`
		Rights         []string `yaml:"rights"`
	} `yaml:"credentials"`
}

// Set is the credentials of one file, ready to check calls against.
type Set struct {
	tokens map[[sha256.Size]byte]*credential
	users  map[string]*credential
}

type credential struct {
	name   string
	rights Right
	hash   []byte // bcrypt, for a user
	// verified is the SHA-256 of the last password that matched hash:
	// bcrypt costs tens of milliseconds by design, and Grafana sends the
	// password with every request.
	verified atomic.Pointer[[sha256.Size]byte]
}

// Len is the number of credentials.
func (s *Set) Len() int { return len(s.tokens) + len(s.users) }

// Parse reads a credentials file. Every credential needs a name, either a
// token_sha256 (64 hex digits) or a username with a password_bcrypt, and
// at least one right; names, tokens and usernames are distinct. Unknown
// fields are refused.
func Parse(data []byte) (*Set, error) {
	var f file
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: %v", ErrFile, err)
	}
	s := &Set{tokens: map[[sha256.Size]byte]*credential{}, users: map[string]*credential{}}
	names := map[string]bool{}
	for i, c := range f.Credentials {
		where := fmt.Sprintf("credential %d", i+1)
		if c.Name != "" {
			where = fmt.Sprintf("credential %d (%q)", i+1, c.Name)
		}
		cr := &credential{name: c.Name}
		switch {
		case c.Name == "":
			return nil, fmt.Errorf("%w: %s has no name", ErrFile, where)
		case names[c.Name]:
			return nil, fmt.Errorf("%w: %s: the name is used twice", ErrFile, where)
		case (c.TokenSHA256 == "") == (c.Username == ""):
			return nil, fmt.Errorf("%w: %s needs either token_sha256 or username, not both", ErrFile, where)
		case c.Username != "" && c.PasswordBcrypt == "":
			return nil, fmt.Errorf("%w: %s: username %q needs password_bcrypt", ErrFile, where, c.Username)
		case c.TokenSHA256 != "" && c.PasswordBcrypt != "":
			return nil, fmt.Errorf("%w: %s: password_bcrypt goes with a username, not a token", ErrFile, where)
		case len(c.Rights) == 0:
			return nil, fmt.Errorf("%w: %s has no rights; give it some of %s", ErrFile, where, strings.Join(rightNames, ", "))
		}
		names[c.Name] = true
		for _, r := range c.Rights {
			i := slices.Index(rightNames, r)
			if i < 0 {
				return nil, fmt.Errorf("%w: %s: unknown right %q, want %s", ErrFile, where, r, strings.Join(rightNames, ", "))
			}
			cr.rights |= 1 << i
		}
		if c.TokenSHA256 != "" {
			h, err := hex.DecodeString(c.TokenSHA256)
			if err != nil || len(h) != sha256.Size {
				return nil, fmt.Errorf("%w: %s: token_sha256 must be 64 hex digits, the SHA-256 of the token", ErrFile, where)
			}
			key := [sha256.Size]byte(h)
			if s.tokens[key] != nil {
				return nil, fmt.Errorf("%w: %s: the token is also %q's", ErrFile, where, s.tokens[key].name)
			}
			s.tokens[key] = cr
			continue
		}
		if _, err := bcrypt.Cost([]byte(c.PasswordBcrypt)); err != nil {
			return nil, fmt.Errorf("%w: %s: password_bcrypt is not a bcrypt hash: %v", ErrFile, where, err)
		}
		if s.users[c.Username] != nil {
			return nil, fmt.Errorf("%w: %s: username %q is also %q's", ErrFile, where, c.Username, s.users[c.Username].name)
		}
		cr.hash = []byte(c.PasswordBcrypt)
		s.users[c.Username] = cr
	}
	return s, nil
}

// Check finds the credential of an Authorization header ("Bearer <token>"
// or "Basic <base64 of user:password>") and returns its name if it holds
// need. The error wraps ErrUnauthenticated or ErrForbidden.
func (s *Set) Check(authorization string, need Right) (string, error) {
	c, err := s.find(authorization)
	if err != nil {
		return "", err
	}
	if c.rights&need != need {
		return c.name, fmt.Errorf("%w: %q may %s, not %s", ErrForbidden, c.name, c.rights, need)
	}
	return c.name, nil
}

func (s *Set) find(authorization string) (*credential, error) {
	scheme, value, _ := strings.Cut(authorization, " ")
	value = strings.TrimSpace(value)
	switch {
	case authorization == "":
		return nil, fmt.Errorf("%w: no Authorization header", ErrUnauthenticated)
	case strings.EqualFold(scheme, "Bearer") && value != "":
		if c := s.tokens[sha256.Sum256([]byte(value))]; c != nil {
			return c, nil
		}
		return nil, fmt.Errorf("%w: unknown bearer token", ErrUnauthenticated)
	case strings.EqualFold(scheme, "Basic"):
		raw, err := base64.StdEncoding.DecodeString(value)
		user, password, ok := strings.Cut(string(raw), ":")
		if err != nil || !ok {
			return nil, fmt.Errorf("%w: malformed basic credentials", ErrUnauthenticated)
		}
		if c := s.users[user]; c != nil && c.matches(password) {
			return c, nil
		}
		return nil, fmt.Errorf("%w: wrong user name or password", ErrUnauthenticated)
	}
	return nil, fmt.Errorf("%w: the Authorization header is neither Bearer nor Basic", ErrUnauthenticated)
}

// matches checks a password against the user's hash, at bcrypt's cost only
// when it differs from the last one that matched.
func (c *credential) matches(password string) bool {
	sum := sha256.Sum256([]byte(password))
	if v := c.verified.Load(); v != nil && subtle.ConstantTimeCompare(v[:], sum[:]) == 1 {
		return true
	}
	if bcrypt.CompareHashAndPassword(c.hash, []byte(password)) != nil {
		return false
	}
	c.verified.Store(&sum)
	return true
}

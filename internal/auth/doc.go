// Package auth checks the credentials of calls on a node's public
// listeners: bearer tokens and basic auth users, as Grafana's Prometheus
// data source sends them, each with its rights (push, query, admin), read
// from a file that is read again when it changes.
//
// The file is YAML; a token is kept as the hex SHA-256 of its value, a
// password as a bcrypt hash, so the file holds no secret a reader could
// replay:
//
//	credentials:
//	  - name: grafana                  # in logs and metrics
//	    token_sha256: 3f7a...          # printf %s "$TOKEN" | sha256sum
//	    rights: [query]
//	  - name: pipeline
//	    token_sha256: 9c1e...
//	    rights: [push]
//	  - name: ops
//	    username: ops
//	    password_bcrypt: $2y$10$...    # htpasswd -nbBC 10 "" "$PASSWORD" | tr -d ':\n'
//	    rights: [query, admin]
//
// A Guard holds the credentials in force; its Check takes an Authorization
// header (HTTP, or gRPC metadata) and the right a call needs:
//
//	g, err := auth.NewGuard(auth.Options{File: "credentials.yaml", Logger: log, Registerer: reg})
//	name, err := g.Check(r.Header.Get("Authorization"), auth.Query) // wraps ErrUnauthenticated or ErrForbidden
package auth

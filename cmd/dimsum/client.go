package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dimsum/dimsum/publisher"
)

// clientFlags are how the load and slice commands reach a node that serves
// TLS and checks credentials.
type clientFlags struct {
	tlsCA, tokenFile, user, passwordFile string
	tls                                  bool
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&c.tls, "tls", false, "speak TLS to the node, trusting the system's CAs (see -tls-ca)")
	fs.StringVar(&c.tlsCA, "tls-ca", "", "speak TLS to the node, trusting the CA certificates in this PEM `file`")
	fs.StringVar(&c.tokenFile, "token-file", "", "send the bearer token in this `file` (its first line) with every call")
	fs.StringVar(&c.user, "user", "", "send basic auth as this `user`, with the password of -password-file")
	fs.StringVar(&c.passwordFile, "password-file", "", "the basic auth password, the first line of this `file`")
}

// firstLine reads a secret from a file: its first line, trimmed.
func firstLine(file string) (string, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(data), "\n")
	if line = strings.TrimSpace(line); line == "" {
		return "", fmt.Errorf("%s holds no secret on its first line", file)
	}
	return line, nil
}

// client is what the flags ask for: a TLS config (nil for plain text) and
// the Authorization value to send ("" for none).
func (c *clientFlags) client() (*tls.Config, string, error) {
	var tc *tls.Config
	if c.tls || c.tlsCA != "" {
		tc = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if c.tlsCA != "" {
		data, err := os.ReadFile(c.tlsCA)
		if err != nil {
			return nil, "", fmt.Errorf("-tls-ca: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(data) {
			return nil, "", fmt.Errorf("-tls-ca: %s holds no PEM certificate", c.tlsCA)
		}
	}
	switch {
	case c.tokenFile != "" && c.user != "":
		return nil, "", errors.New("-token-file and -user exclude each other")
	case (c.user == "") != (c.passwordFile == ""):
		return nil, "", errors.New("-user and -password-file go together")
	case c.tokenFile != "":
		token, err := firstLine(c.tokenFile)
		if err != nil {
			return nil, "", fmt.Errorf("-token-file: %w", err)
		}
		return tc, "Bearer " + token, nil
	case c.user != "":
		password, err := firstLine(c.passwordFile)
		if err != nil {
			return nil, "", fmt.Errorf("-password-file: %w", err)
		}
		md, err := publisher.BasicAuth(c.user, password).GetRequestMetadata(context.Background())
		return tc, md["authorization"], err
	}
	return tc, "", nil
}

// grpcOptions are the publisher's dial options and credential for the
// flags.
func (c *clientFlags) grpcOptions() ([]grpc.DialOption, credentials.PerRPCCredentials, error) {
	tc, authorization, err := c.client()
	if err != nil {
		return nil, nil, err
	}
	dial := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if tc != nil {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc))}
	}
	var creds credentials.PerRPCCredentials
	if authorization != "" {
		creds = publisher.Authorization(authorization)
	}
	return dial, creds, nil
}

// httpTransport is an http.RoundTripper for the flags: it sends the
// Authorization value with every request and, with TLS, turns the http
// URLs the commands build into https ones.
func (c *clientFlags) httpTransport() (http.RoundTripper, error) {
	tc, authorization, err := c.client()
	if err != nil {
		return nil, err
	}
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.TLSClientConfig = tc
	return authTransport{base: base, authorization: authorization, https: tc != nil}, nil
}

type authTransport struct {
	base          http.RoundTripper
	authorization string
	https         bool
}

func (t authTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	if t.authorization != "" {
		r.Header.Set("Authorization", t.authorization)
	}
	if t.https && r.URL.Scheme == "http" {
		r.URL.Scheme = "https"
	}
	return t.base.RoundTrip(r)
}

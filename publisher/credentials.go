package publisher

import (
	"context"
	"encoding/base64"

	"google.golang.org/grpc/credentials"
)

// BearerToken is a credential sent with every push as "authorization:
// Bearer <token>", for a node whose auth.credentials_file lists the
// token's SHA-256 with the push right (Options.Credentials).
func BearerToken(token string) credentials.PerRPCCredentials {
	return Authorization("Bearer " + token)
}

// BasicAuth is a user name and password sent with every push as HTTP basic
// credentials are (Options.Credentials).
func BasicAuth(user, password string) credentials.PerRPCCredentials {
	return Authorization("Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password)))
}

// Authorization is a credential sent with every push as the
// "authorization" metadata, an HTTP Authorization header's value
// (Options.Credentials).
func Authorization(value string) credentials.PerRPCCredentials { return header(value) }

// header is an Authorization value sent with every call.
type header string

func (h header) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(h)}, nil
}

// RequireTransportSecurity is false so that a node on loopback may check
// credentials without TLS; across a network, give the node a certificate
// and the publisher TLS in DialOptions, or the credential travels in
// clear.
func (header) RequireTransportSecurity() bool { return false }

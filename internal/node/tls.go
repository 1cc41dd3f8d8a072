package node

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
)

// TLSConfig names PEM files: a certificate and its key, and a CA.
type TLSConfig struct {
	// CertFile and KeyFile are the node's certificate (with any
	// intermediates after it) and private key. Both or neither.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// CAFile holds the certificates of the CA that signs the peers' own:
	// on the public listeners, clients must then present a certificate it
	// signed; in cluster.tls, it is the cluster's CA, which signs every
	// member's certificate and nothing else.
	CAFile string `yaml:"ca_file"`
}

func (c TLSConfig) enabled() bool { return c.CertFile != "" || c.KeyFile != "" || c.CAFile != "" }

// validate checks the form of the file names; needCA requires a CA.
func (c TLSConfig) validate(field string, needCA bool) error {
	switch {
	case (c.CertFile == "") != (c.KeyFile == ""):
		return fmt.Errorf("%w: %s needs both cert_file and key_file", ErrConfig, field)
	case c.CAFile != "" && c.CertFile == "":
		return fmt.Errorf("%w: %s.ca_file needs cert_file and key_file", ErrConfig, field)
	case needCA && c.CAFile == "":
		return fmt.Errorf("%w: %s needs ca_file, cert_file and key_file: members prove themselves to each other with certificates of the cluster's CA", ErrConfig, field)
	}
	return nil
}

// keyPair is a certificate and key read from files, read again by reload
// so that a renewed certificate is served without a restart.
type keyPair struct {
	certFile, keyFile string
	cur               atomic.Pointer[tls.Certificate]
}

func loadKeyPair(certFile, keyFile string) (*keyPair, error) {
	kp := &keyPair{certFile: certFile, keyFile: keyFile}
	return kp, kp.reload()
}

func (kp *keyPair) reload() error {
	c, err := tls.LoadX509KeyPair(kp.certFile, kp.keyFile)
	if err != nil {
		return fmt.Errorf("%w: cannot load the certificate %s and key %s: %v", ErrConfig, kp.certFile, kp.keyFile, err)
	}
	kp.cur.Store(&c)
	return nil
}

func (kp *keyPair) certificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return kp.cur.Load(), nil
}

func (kp *keyPair) clientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return kp.cur.Load(), nil
}

// loadCA reads a PEM file of CA certificates.
func loadCA(file string) (*x509.CertPool, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot read the CA %s: %v", ErrConfig, file, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%w: %s holds no PEM certificate", ErrConfig, file)
	}
	return pool, nil
}

// tlsFiles is a TLSConfig loaded: the key pair, and the CA when named.
type tlsFiles struct {
	pair *keyPair
	ca   *x509.CertPool
}

func loadTLS(c TLSConfig) (*tlsFiles, error) {
	if !c.enabled() {
		return nil, nil
	}
	pair, err := loadKeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, err
	}
	f := &tlsFiles{pair: pair}
	if c.CAFile != "" {
		if f.ca, err = loadCA(c.CAFile); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// server is the TLS config of a listener: the node's certificate, and with
// a CA, a client certificate it signed required of every connection.
func (f *tlsFiles) server() *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: f.pair.certificate}
	if f.ca != nil {
		c.ClientAuth, c.ClientCAs = tls.RequireAndVerifyClientCert, f.ca
	}
	return c
}

// client is the TLS config that dials other members: their certificate
// must be signed by the cluster's CA for the address dialed, and this
// node's goes with every connection.
func (f *tlsFiles) client() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: f.ca, GetClientCertificate: f.pair.clientCertificate}
}

// errNoTLS is what a secure cluster member says of a config without it.
var errNoTLS = errors.New("a cluster member needs cluster.tls (ca_file, cert_file, key_file) and cluster.gossip_key_file, so that only members reach its internal listener and gossip; set cluster.insecure: true to run a cluster without them, on a network no one else reaches")

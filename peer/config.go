package peer

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"time"
)

// Config is a pool member's identity and trust for the control channel.
// The same Config serves both sides: its certificate is presented as a
// server certificate to peers that dial in and as a client certificate
// when dialling out.
type Config struct {
	// Name is this server's name in the pool, as its certificate names
	// it. It appears in logs.
	Name string
	// Certificate is this server's certificate chain and private key,
	// issued by the pool CA for Name.
	Certificate tls.Certificate
	// Roots holds the pool CA: the only issuer whose certificates are
	// accepted, from servers dialled and from clients alike.
	Roots *x509.CertPool
	// HandshakeTimeout bounds the TLS handshake and the protocol hello
	// of each connection, both when dialling and when accepting. Zero
	// means 5 seconds.
	HandshakeTimeout time.Duration
	// MaxFrame is the largest frame payload this side accepts, in bytes;
	// it bounds the memory one frame can make it allocate. A Transfer's
	// frame carries all its items. Zero means 64 MiB.
	MaxFrame int
	// FrameMemory bounds the memory the frames of large requests (over
	// 64 KiB: Transfers of big queues or of many connections, process
	// images) hold at once, across every connection this server
	// accepts, from the arrival of a frame's length until its handler
	// returns: a frame that would go over it waits to be read, and its
	// connection with it. Zero means twice MaxFrame; less than MaxFrame
	// means MaxFrame.
	FrameMemory int64
	// MaxRequestTime bounds every request this server runs, from its
	// arrival: a request whose caller set no deadline, or a later one,
	// gets this one instead. Zero means 10 minutes.
	MaxRequestTime time.Duration
	// Log receives refused connections, protocol errors and handler
	// panics. Nil discards them.
	Log *slog.Logger
	// Credentials, if set, replaces Certificate and Roots: each
	// connection, accepted or dialled, takes the certificate and pool CA
	// it holds when the connection starts, so that they can be replaced
	// while the Config is in use (a renewed certificate, a new pool CA).
	// Connections already open keep theirs.
	Credentials *Credentials
	// Members, if set, says whether a peer name (from its certificate)
	// is a member of the pool as this server's configuration has it:
	// a client it refuses is refused at the handshake, whatever its
	// certificate (a member taken out of the pool whose certificate is
	// still valid, another CA's member during a CA rotation). Nil
	// accepts every holder of a pool CA certificate.
	Members func(name string) bool
}

func (c *Config) name() string {
	if c.Name != "" {
		return c.Name
	}
	return "the peer"
}

func (c *Config) handshakeTimeout() time.Duration {
	if c.HandshakeTimeout > 0 {
		return c.HandshakeTimeout
	}
	return defaultHandshakeTimeout
}

func (c *Config) maxFrame() int {
	if c.MaxFrame > 0 {
		return min(c.MaxFrame, 1<<32-1)
	}
	return defaultMaxFrame
}

func (c *Config) frameMemory() int64 {
	if c.FrameMemory > 0 {
		return max(c.FrameMemory, int64(c.maxFrame()))
	}
	return 2 * int64(c.maxFrame())
}

func (c *Config) maxRequestTime() time.Duration {
	if c.MaxRequestTime > 0 {
		return c.MaxRequestTime
	}
	return defaultMaxRequestTime
}

func (c *Config) log() *slog.Logger {
	if c.Log != nil {
		return c.Log
	}
	return slog.New(slog.DiscardHandler)
}

// Credentials holds a member's certificate and pool CA for a [Config]
// whose connections should take them as they are replaced. It is safe for
// concurrent use.
type Credentials struct {
	v atomic.Pointer[credentials]
}

type credentials struct {
	cert  tls.Certificate
	roots *x509.CertPool
}

// NewCredentials returns Credentials holding cert and roots.
func NewCredentials(cert tls.Certificate, roots *x509.CertPool) *Credentials {
	c := &Credentials{}
	c.Set(cert, roots)
	return c
}

// Set replaces the certificate and pool CA for the connections that
// start from now on.
func (c *Credentials) Set(cert tls.Certificate, roots *x509.CertPool) {
	c.v.Store(&credentials{cert: cert, roots: roots})
}

// current returns the certificate and pool CA a new connection uses.
func (c *Config) current() (tls.Certificate, *x509.CertPool) {
	if c.Credentials != nil {
		if v := c.Credentials.v.Load(); v != nil {
			return v.cert, v.roots
		}
		return tls.Certificate{}, nil
	}
	return c.Certificate, c.Roots
}

func (c *Config) check() error {
	if c == nil {
		return errors.New("no peer.Config")
	}
	cert, roots := c.current()
	if len(cert.Certificate) == 0 || cert.PrivateKey == nil {
		return errors.New("peer.Config has no certificate and key: load them with TLSFiles.Config")
	}
	if roots == nil {
		return errors.New("peer.Config has no pool CA (Roots): load it with TLSFiles.Config")
	}
	return nil
}

// serverTLS is the TLS configuration of accepted connections: TLS 1.3
// only, client certificate required and verified against the pool CA.
// Each handshake takes the credentials current when it starts.
func (c *Config) serverTLS() *tls.Config {
	base := c.serverTLSNow()
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) { return c.serverTLSNow(), nil }
	return base
}

// serverTLSNow is serverTLS with the credentials current now.
func (c *Config) serverTLSNow() *tls.Config {
	cert, roots := c.current()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    roots,
		NextProtos:   []string{alpn},
		// Connections last; resumption would only add a second path
		// to authentication.
		SessionTicketsDisabled: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if cs.NegotiatedProtocol != alpn {
				return fmt.Errorf("client does not speak %s (ALPN): it is not an mtcp peer", alpn)
			}
			if len(cs.PeerCertificates) == 0 || identity(cs.PeerCertificates[0]) == "" {
				return errors.New("client certificate names no peer for sure (its common name must be one of its DNS names, or it must have one DNS name and no common name)")
			}
			if id := identity(cs.PeerCertificates[0]); c.Members != nil && !c.Members(id) {
				return fmt.Errorf("client %q is not one of %s's peers (its configuration lists them)", id, c.name())
			}
			return memberUsages(cs.PeerCertificates[0])
		},
	}
}

// clientTLS is the TLS configuration for dialling peerName: the server
// must prove it is peerName with a certificate of the pool CA.
func (c *Config) clientTLS(peerName string) *tls.Config {
	cert, roots := c.current()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      roots,
		ServerName:   peerName,
		NextProtos:   []string{alpn},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if cs.NegotiatedProtocol != alpn {
				return fmt.Errorf("server does not speak %s (ALPN): it is not an mtcp peer", alpn)
			}
			// The name checked above may be one of several in the
			// certificate: the member it names for sure must be the
			// one dialled (unless dialled by address).
			if _, err := netip.ParseAddr(peerName); err != nil {
				if id := identity(cs.PeerCertificates[0]); id != peerName {
					return fmt.Errorf("server's certificate is valid for %q but names member %q: another member answers at %s's address", peerName, id, peerName)
				}
			}
			return memberUsages(cs.PeerCertificates[0])
		},
	}
}

// memberUsages checks that a member's certificate says, in so many
// words, that it serves as both server and client: x509 verification
// takes a certificate without extended key usages, or with "any", for
// both, which mtcp's own certificates and the documented openssl steps
// never make.
func memberUsages(cert *x509.Certificate) error {
	if !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return fmt.Errorf("certificate of %q does not list both extended key usages serverAuth and clientAuth (a member is both)", cert.Subject.CommonName)
	}
	return nil
}

// identity is the pool member a verified certificate names, or "" if it
// names none for sure: the name a peer checks when it dials the member
// is a DNS name of the certificate (its subject alternative names), so
// the member's identity must be one of those too. It is the common name
// if that is one of the DNS names, or else the only DNS name of a
// certificate without a common name. A common name that is not among
// the DNS names would let a member be one name when it dials and another
// when it is dialled.
func identity(cert *x509.Certificate) string {
	cn := cert.Subject.CommonName
	switch {
	case cn != "" && slices.Contains(cert.DNSNames, cn):
		return cn
	case cn == "" && len(cert.DNSNames) == 1:
		return cert.DNSNames[0]
	}
	return ""
}

// TLSFiles names the PEM files of a pool member's identity.
type TLSFiles struct {
	CA   string // the pool CA's certificate (ca.pem); may hold several CAs during a rotation
	Cert string // this member's certificate, optionally followed by intermediates
	Key  string // this member's private key; must not be readable by group or others
}

// Config loads the files and checks them before any peer sees them: the
// certificate must be issued by the pool CA, valid now, usable as both
// client and server certificate, and issued for name. An empty name
// takes the name from the certificate.
func (f TLSFiles) Config(name string) (*Config, error) {
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("pool CA certificate: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("pool CA certificate %s holds no PEM certificate", f.CA)
	}
	certPEM, err := os.ReadFile(f.Cert)
	if err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	st, err := os.Stat(f.Key)
	if err != nil {
		return nil, fmt.Errorf("private key: %w", err)
	}
	if m := st.Mode().Perm(); m&0o077 != 0 {
		return nil, fmt.Errorf("private key %s is readable by group or others (mode %04o): anyone who reads it can hijack connections; chmod 600 %s", f.Key, m, f.Key)
	}
	keyPEM, err := os.ReadFile(f.Key)
	if err != nil {
		return nil, fmt.Errorf("private key: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate %s and key %s: %w (they must be PEM files, the key matching the certificate)", f.Cert, f.Key, err)
	}
	leaf, err := verifyOwn(cert, roots)
	if err != nil {
		return nil, fmt.Errorf("certificate %s is not valid for the pool whose CA is %s: %w (issue a new one: mtcpctl certs issue)", f.Cert, f.CA, err)
	}
	if err := memberUsages(leaf); err != nil {
		return nil, fmt.Errorf("certificate %s: %w (issue one: mtcpctl certs issue)", f.Cert, err)
	}
	id := identity(leaf)
	switch {
	case id == "":
		return nil, fmt.Errorf("certificate %s names no member for sure (common name %q, DNS names %q): its common name must be one of its DNS names (issue one: mtcpctl certs issue)", f.Cert, leaf.Subject.CommonName, leaf.DNSNames)
	case name == "":
		name = id
	case leaf.VerifyHostname(name) != nil || id != name:
		return nil, fmt.Errorf("certificate %s is issued to %q, not to this server %q: peers dialling %q would refuse it (issue one for %q: mtcpctl certs issue --name %s)", f.Cert, id, name, name, name, name)
	}
	return &Config{Name: name, Certificate: cert, Roots: roots}, nil
}

// verifyOwn checks that cert is valid now for the pool of roots, as both
// server and client certificate, and returns its leaf.
func verifyOwn(cert tls.Certificate, roots *x509.CertPool) (*x509.Certificate, error) {
	if len(cert.Certificate) == 0 {
		return nil, errors.New("no certificate")
	}
	leaf := cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, err
		}
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("intermediate certificate: %w", err)
		}
		inter.AddCert(c)
	}
	for _, use := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{use}}); err != nil {
			return nil, err
		}
	}
	return leaf, nil
}

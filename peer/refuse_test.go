package peer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

// expiredConfig is a member whose certificate, issued by ca, expired an
// hour ago.
func expiredConfig(t *testing.T, ca *CA, name string) *Config {
	t.Helper()
	now := time.Now()
	certPEM, keyPEM, err := ca.issue(name, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil, now.Add(-2*time.Hour), now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return configFromPEM(t, ca, name, certPEM, keyPEM)
}

// TestRefused: peers that cannot prove membership of the pool are refused
// during the handshake; the handler never runs.
func TestRefused(t *testing.T) {
	pool := testCA(t, "test-pool")
	evil := testCA(t, "evil-pool")
	poolRoots := x509.NewCertPool()
	poolRoots.AddCert(pool.Cert)

	// withRoots returns cfg trusting roots instead.
	withRoots := func(cfg *Config, ca *CA) *Config {
		c := *cfg
		c.Roots = x509.NewCertPool()
		c.Roots.AddCert(ca.Cert)
		return &c
	}

	for _, tc := range []struct {
		name      string
		server    *Config // default: s1 of the pool
		members   bool    // server is s1 of the pool, which takes c2 but not c1
		client    *Config // Dial with it, dialling "s1" unless dialAs is set
		dialAs    string
		raw       *tls.Config // or connect with this raw TLS client
		wantErr   []string    // in the client's error
		serverLog []string    // in the server's log
	}{{
		name:      "client without certificate",
		raw:       &tls.Config{RootCAs: poolRoots, ServerName: "s1", NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13},
		wantErr:   []string{"certificate required"},
		serverLog: []string{"refused connection", "didn't provide a certificate"},
	}, {
		name:      "client certificate from another CA",
		client:    withRoots(memberConfig(t, evil, "c1"), pool),
		wantErr:   []string{"peer s1: TLS handshake: s1 refused this server's certificate", "this server's certificate is not valid for the pool", "certificate signed by unknown authority"},
		serverLog: []string{"refused connection"},
	}, {
		// Go's client withholds a certificate the server's CA list
		// does not match; force it through.
		name:      "client certificate from another CA, sent anyway",
		raw:       forceCert(poolRoots, memberConfig(t, evil, "c1").Certificate),
		wantErr:   []string{"unknown certificate authority"},
		serverLog: []string{"refused connection", "certificate signed by unknown authority"},
	}, {
		name:      "client of the pool CA that is not a configured member",
		members:   true,
		client:    memberConfig(t, pool, "c1"),
		wantErr:   []string{"peer s1: TLS handshake"},
		serverLog: []string{"refused connection", `client \"c1\" is not one of s1's peers`},
	}, {
		name:      "expired client certificate, sent anyway",
		raw:       forceCert(poolRoots, expiredConfig(t, pool, "c1").Certificate),
		wantErr:   []string{"expired certificate"},
		serverLog: []string{"refused connection", "certificate has expired"},
	}, {
		// The identity a peer acts under must be a name it can be
		// dialled at: a common name that is not among the DNS names
		// (s3's, here) would let s3 act as s2.
		name:      "client certificate whose common name is not among its DNS names",
		raw:       forceCert(poolRoots, crossNamedCert(t, pool, "s2", "s3")),
		wantErr:   []string{"bad certificate"},
		serverLog: []string{"refused connection", "names no peer for sure"},
	}, {
		// x509 takes a certificate without extended key usages for any
		// use; a member's must say it is a client and a server.
		name:      "client certificate without extended key usages",
		raw:       forceCert(poolRoots, testCert(t, pool, "c1", "c1", nil)),
		wantErr:   []string{"bad certificate"},
		serverLog: []string{"refused connection", "does not list both extended key usages"},
	}, {
		name:    "server certificate from another CA",
		server:  withRoots(memberConfig(t, evil, "s1"), pool),
		client:  memberConfig(t, pool, "c1"),
		wantErr: []string{"peer s1: TLS handshake: s1's certificate is not issued by the pool CA", "certificate signed by unknown authority"},
	}, {
		name:    "wrong server name",
		client:  memberConfig(t, pool, "c1"),
		dialAs:  "s2",
		wantErr: []string{"peer s2: TLS handshake: the server at this address is not s2", "certificate is valid for s1, not s2"},
	}, {
		name:      "expired client certificate",
		client:    expiredConfig(t, pool, "c1"),
		wantErr:   []string{"peer s1: TLS handshake: s1 refused this server's certificate", "expired certificate", "certificate has expired"},
		serverLog: []string{"refused connection", "certificate has expired"},
	}, {
		name:    "expired server certificate",
		server:  expiredConfig(t, pool, "s1"),
		client:  memberConfig(t, pool, "c1"),
		wantErr: []string{"peer s1: TLS handshake: s1's certificate is expired", "certificate has expired"},
	}, {
		name: "TLS 1.2 client",
		raw: &tls.Config{RootCAs: poolRoots, ServerName: "s1", NextProtos: []string{alpn}, MaxVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{memberConfig(t, pool, "c1").Certificate}},
		wantErr:   []string{"protocol version not supported"},
		serverLog: []string{"refused connection", "unsupported versions"},
	}, {
		name: "client not speaking the peer protocol",
		raw: &tls.Config{RootCAs: poolRoots, ServerName: "s1", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13,
			Certificates: []tls.Certificate{memberConfig(t, pool, "c1").Certificate}},
		wantErr:   []string{"no application protocol"},
		serverLog: []string{"refused connection"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			h := &testHandler{}
			scfg := tc.server
			if scfg == nil {
				scfg = memberConfig(t, pool, "s1")
			}
			if tc.members {
				scfg.Members = func(name string) bool { return name == "c2" }
			}
			s := startServer(t, scfg, h)
			var err error
			if tc.raw != nil {
				err = rawExchange(s.addr, tc.raw)
			} else {
				name := tc.dialAs
				if name == "" {
					name = "s1"
				}
				var c *Client
				c, err = Dial(context.Background(), s.addr, name, tc.client)
				if err == nil {
					c.Close()
				}
			}
			if err == nil {
				t.Fatal("connection accepted")
			}
			t.Logf("client error: %v", err)
			mustContain(t, "client error", err.Error(), tc.wantErr...)
			var oe *OpError
			if tc.raw == nil && (!errors.As(err, &oe) || oe.Op != "TLS handshake") {
				t.Errorf("error %#v is not an OpError of the TLS handshake", err)
			}
			for _, want := range tc.serverLog {
				waitFor(t, "server log to contain "+want, func() bool { return strings.Contains(s.log.String(), want) })
			}
			if n := h.calls.Load(); n != 0 {
				t.Errorf("handler called %d times for a refused peer", n)
			}
			// The server keeps serving good members.
			c, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, pool, "c2"))
			if err == nil {
				_, err = c.Status(context.Background())
				c.Close()
			}
			switch {
			case tc.server != nil && err == nil:
				t.Error("a good member accepted a bad server")
			case tc.server == nil && err != nil:
				t.Errorf("good member after the refusal: %v", err)
			case tc.server == nil && h.calls.Load() != 1:
				t.Errorf("handler called %d times, want once (the good member)", h.calls.Load())
			}
		})
	}
}

// rawExchange connects with a raw TLS client, sends a valid hello and a
// Status request, and returns the first error.
func rawExchange(addr string, cfg *tls.Config) error {
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	// A refusal may break the pipe before the alert is read: the
	// writes' errors do not count.
	conn.Write(encodeFrame(msgHello, 0, &hello{version: protoVersion, maxFrame: defaultMaxFrame}))
	conn.Write(encodeRequest(msgStatus, 1, &StatusRequest{}))
	for {
		if _, err := readFrame(conn, defaultMaxFrame); err != nil {
			return err
		}
	}
}

// encodeFrame returns the bytes of one frame.
func encodeFrame(t msgType, id uint64, b body) []byte {
	e := newEncoder(t, id)
	b.encode(e)
	segs, _, err := e.finish()
	if err != nil {
		panic(err)
	}
	var out []byte
	for _, s := range segs {
		out = append(out, s...)
	}
	return out
}

// encodeRequest returns the bytes of a request frame without deadline.
func encodeRequest(t msgType, id uint64, b body) []byte {
	e := newEncoder(t, id)
	e.u64(0)
	b.encode(e)
	segs, _, err := e.finish()
	if err != nil {
		panic(err)
	}
	var out []byte
	for _, s := range segs {
		out = append(out, s...)
	}
	return out
}

// forceCert is a raw TLS client configuration that presents cert whatever
// the server asks for.
func forceCert(roots *x509.CertPool, cert tls.Certificate) *tls.Config {
	return &tls.Config{RootCAs: roots, ServerName: "s1", NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}
}

// crossNamedCert is a certificate of ca with common name cn and the one
// DNS name dns, as an operator might sign from a crafted request.
func crossNamedCert(t *testing.T, ca *CA, cn, dns string) tls.Certificate {
	t.Helper()
	return testCert(t, ca, cn, dns, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth})
}

// testCert is a certificate of ca with common name cn, the one DNS name
// dns and the extended key usages eku.
func testCert(t *testing.T, ca *CA, cn, dns string, eku []x509.ExtKeyUsage) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: eku,
		DNSNames:    []string{dns},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestIdentity: a certificate names a member only by a name it can be
// dialled at.
func TestIdentity(t *testing.T) {
	for _, tc := range []struct {
		cn   string
		dns  []string
		want string
	}{
		{"s1", []string{"s1"}, "s1"},
		{"s1", []string{"s1.pool.example", "s1"}, "s1"},
		{"s2", []string{"s3"}, ""},
		{"s2", nil, ""},
		{"", []string{"s3"}, "s3"},
		{"", []string{"s3", "s4"}, ""},
		{"", nil, ""},
	} {
		c := &x509.Certificate{Subject: pkix.Name{CommonName: tc.cn}, DNSNames: tc.dns}
		if got := identity(c); got != tc.want {
			t.Errorf("common name %q, DNS names %q: identity %q, want %q", tc.cn, tc.dns, got, tc.want)
		}
	}
}

// TestHandshakesBounded: connections that never authenticate hold a
// descriptor each until the handshake timeout; from one address, only
// maxHandshakesPerAddr of them at a time get that far, the others are
// closed at once, and members elsewhere still get through.
func TestHandshakesBounded(t *testing.T) {
	p := newPool(t, &testHandler{})
	idle := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	for range maxHandshakesPerAddr {
		c, err := idle.Dial("tcp", p.server.addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	extra, err := idle.Dial("tcp", p.server.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetReadDeadline(time.Now().Add(3 * time.Second)) // the handshake timeout is 5s
	if _, err := extra.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection %d from one address: read %v, want it closed at once", maxHandshakesPerAddr+1, err)
	}
	waitFor(t, "the refusal to be logged", func() bool { return strings.Contains(p.server.log.String(), "too many handshakes") })
	// A member from another address gets in meanwhile.
	if _, err := p.dial(t).Status(context.Background()); err != nil {
		t.Fatalf("a member's call while the idle connections wait: %v", err)
	}
	// Once they are gone, that address may handshake again.
	for _, c := range held {
		c.Close()
	}
	held = nil
	tlsDialer := &tls.Dialer{NetDialer: idle, Config: p.client.clientTLS("s1")}
	waitFor(t, "a handshake from the idle connections' address", func() bool {
		c, err := tlsDialer.DialContext(context.Background(), "tcp", p.server.addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// TestGateKey: the handshake bound counts IPv4 addresses one by one and
// IPv6 addresses by /64.
func TestGateKey(t *testing.T) {
	key := func(s string) netip.Addr { return gateKey(net.TCPAddrFromAddrPort(netip.MustParseAddrPort(s))) }
	for _, tc := range []struct {
		a, b string
		same bool
	}{
		{"192.0.2.1:1000", "192.0.2.1:2000", true},
		{"192.0.2.1:1000", "192.0.2.2:1000", false},
		{"[::ffff:192.0.2.1]:1000", "192.0.2.1:1000", true},
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:2:ffff:ffff:ffff:ffff]:1000", true},
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:3::1]:1000", false},
		{"[fe80::1%eth0]:1000", "[fe80::2%eth1]:1000", true},
	} {
		if got := key(tc.a) == key(tc.b); got != tc.same {
			t.Errorf("%s and %s counted together: %v, want %v (%v, %v)", tc.a, tc.b, got, tc.same, key(tc.a), key(tc.b))
		}
	}
	if k := key("[2001:db8:1:2::1]:1000"); k != netip.MustParseAddr("2001:db8:1:2::") {
		t.Errorf("key of 2001:db8:1:2::1: %v", k)
	}
}

// TestServerNamesOtherMember: a server whose certificate is valid for the
// name dialled but names another member (common name s2, DNS names s1 and
// s2) is refused: it is s2 answering at s1's address.
func TestServerNamesOtherMember(t *testing.T) {
	ca := testCA(t, "test-pool")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "s2"},
		NotBefore:    time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    []string{"s1", "s2"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	scfg := memberConfig(t, ca, "s2")
	scfg.Certificate = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	s := startServer(t, scfg, &testHandler{})
	_, err = Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c1"))
	if err == nil || !strings.Contains(err.Error(), `names member "s2"`) {
		t.Fatalf("dialling s1, answered by s2 with a certificate valid for both names: %v, want refused", err)
	}
	c, err := Dial(context.Background(), s.addr, "s2", memberConfig(t, ca, "c1"))
	if err != nil {
		t.Fatalf("dialling s2, its own name: %v", err)
	}
	c.Close()
}

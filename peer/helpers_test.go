package peer

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testCA returns a pool CA for one test.
func testCA(t testing.TB, name string) *CA {
	t.Helper()
	ca, err := NewCA(name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// memberConfig issues a certificate for name (valid for 127.0.0.1 too)
// and returns the member's Config trusting ca.
func memberConfig(t testing.TB, ca *CA, name string) *Config {
	t.Helper()
	certPEM, keyPEM, err := ca.Issue(name, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return configFromPEM(t, ca, name, certPEM, keyPEM)
}

func configFromPEM(t testing.TB, ca *CA, name string, certPEM, keyPEM []byte) *Config {
	t.Helper()
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	return &Config{Name: name, Certificate: cert, Roots: roots}
}

// logBuffer collects a server's log.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testHandler records calls; its fields, when set, replace the default
// behaviour (echoing requests back in the replies).
type testHandler struct {
	calls atomic.Int64

	prepare  func(ctx context.Context, from string, r *PrepareRequest) (*PrepareReply, error)
	transfer func(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error)
	commit   func(ctx context.Context, from string, r *CommitRequest) (*CommitReply, error)
	abort    func(ctx context.Context, from string, r *AbortRequest) error
	status   func(ctx context.Context, from string) (*StatusReply, error)
}

func (h *testHandler) Prepare(ctx context.Context, from string, r *PrepareRequest) (*PrepareReply, error) {
	h.calls.Add(1)
	if h.prepare != nil {
		return h.prepare(ctx, from, r)
	}
	return &PrepareReply{OK: true, Reason: from + " " + r.Service}, nil
}

func (h *testHandler) Transfer(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error) {
	h.calls.Add(1)
	if h.transfer != nil {
		return h.transfer(ctx, from, r)
	}
	rep := &TransferReply{}
	for _, it := range r.Items {
		rep.Results = append(rep.Results, ItemResult{OK: true, Error: it.Service})
	}
	return rep, nil
}

func (h *testHandler) Commit(ctx context.Context, from string, r *CommitRequest) (*CommitReply, error) {
	h.calls.Add(1)
	if h.commit != nil {
		return h.commit(ctx, from, r)
	}
	return &CommitReply{Results: []ItemResult{{OK: true}}}, nil
}

func (h *testHandler) Abort(ctx context.Context, from string, r *AbortRequest) error {
	h.calls.Add(1)
	if h.abort != nil {
		return h.abort(ctx, from, r)
	}
	return nil
}

func (h *testHandler) Status(ctx context.Context, from string) (*StatusReply, error) {
	h.calls.Add(1)
	if h.status != nil {
		return h.status(ctx, from)
	}
	return &StatusReply{Name: "s1", Conns: 3, Services: []string{":7000"}, Time: time.Unix(1700000000, 5)}, nil
}

// steeringHandler is a testHandler that also steers.
type steeringHandler struct {
	*testHandler
	got chan *SteerRequest
}

func (h steeringHandler) Steer(ctx context.Context, from string, r *SteerRequest) error {
	h.calls.Add(1)
	h.got <- r
	if r.Op == "bad" {
		return errors.New("unknown steering operation")
	}
	return nil
}

// testServer is a running Server on loopback.
type testServer struct {
	addr string
	log  *logBuffer
	stop func() error // stops Serve and returns its error
}

func startServer(t testing.TB, cfg *Config, h Handler) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{addr: ln.Addr().String(), log: &logBuffer{}}
	c := *cfg
	c.Log = slog.New(slog.NewTextHandler(ts.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- NewServer(&c, h).Serve(ctx, ln) }()
	var once sync.Once
	var serr error
	ts.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case serr = <-errc:
			case <-time.After(10 * time.Second):
				serr = errors.New("Serve did not return within 10s of its context's end")
			}
		})
		return serr
	}
	t.Cleanup(func() {
		if err := ts.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

// pool is a CA, a server s1 serving h, and a client config c1.
type pool struct {
	ca     *CA
	server *testServer
	client *Config
}

func newPool(t testing.TB, h Handler) *pool {
	t.Helper()
	ca := testCA(t, "test-pool")
	return &pool{ca: ca, server: startServer(t, memberConfig(t, ca, "s1"), h), client: memberConfig(t, ca, "c1")}
}

func (p *pool) dial(t testing.TB) *Client {
	t.Helper()
	c, err := Dial(context.Background(), p.server.addr, "s1", p.client)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func mustContain(t testing.TB, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s %q does not contain %q", what, s, sub)
		}
	}
}

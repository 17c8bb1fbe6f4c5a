package apptest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/app"
)

// Timeout bounds every wait of this package.
const Timeout = 10 * time.Second

// Server is one application server with its own registry.
type Server struct {
	// Name identifies the server in logs and failures.
	Name string
	// Registry is the server's daemon side.
	Registry *app.Registry
	// Socket is the path of the registry's application socket.
	Socket string
	// Service is the service the application registered: its listen
	// address, 127.0.0.1:port. Clients dial it.
	Service string
}

// Start starts a Registry and an application serving h on a free port of
// 127.0.0.1, and waits until the application has registered. Both stop
// when the test ends; a Serve error fails the test.
func Start(t testing.TB, name string, h app.Handler) *Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "mtcp-apptest-") // short: sun_path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &Server{Name: name, Registry: app.NewRegistry(Logger(t, name+"/registry")), Socket: filepath.Join(dir, "app.sock")}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.Socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := s.Registry.Serve(ctx, ln); err != nil {
			t.Errorf("%s: registry: %v", name, err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(Timeout):
			t.Errorf("%s: the application or the registry did not stop within %v", name, Timeout)
		}
	})
	// The port is chosen before Serve listens; another test may take it
	// in between, hence the retries.
	for attempt := 0; ; attempt++ {
		s.Service = freePort(t)
		errc := make(chan error, 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- app.Serve(ctx, app.Config{Service: s.Service, Daemon: s.Socket, Handler: h, Logger: Logger(t, name)})
		}()
		var serr error
		Eventually(t, Timeout, name+"'s application to register", func() (bool, string) {
			select {
			case serr = <-errc:
				return true, ""
			default:
			}
			return slices.Contains(s.Registry.Services(), s.Service), fmt.Sprint(s.Registry.Services())
		})
		switch {
		case serr == nil:
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := <-errc; err != nil {
					t.Errorf("%s: app.Serve: %v", name, err)
				}
			}()
			return s
		case errors.Is(serr, syscall.EADDRINUSE) && attempt < 5:
			continue
		default:
			t.Fatalf("%s: app.Serve: %v", name, serr)
		}
	}
}

func freePort(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Dial connects a client to the server's service.
func (s *Server) Dial(t testing.TB) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.Service, Timeout)
	if err != nil {
		t.Fatalf("dial %s: %v", s.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// WaitConn waits until the server's application reports the connection
// of client c.
func (s *Server) WaitConn(t testing.TB, c net.Conn) app.Tuple {
	t.Helper()
	tup := TupleOf(c)
	Eventually(t, Timeout, fmt.Sprintf("%s to report connection %v", s.Name, tup), func() (bool, string) {
		conns := s.Registry.Conns(s.Service)
		return slices.Contains(conns, tup), fmt.Sprint(conns)
	})
	return tup
}

// TupleOf returns the server-side tuple of client connection c.
func TupleOf(c net.Conn) app.Tuple {
	l := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	r := c.LocalAddr().(*net.TCPAddr).AddrPort()
	return app.Tuple{Local: l, Remote: r}
}

// Migrate moves the connection tup from one server's application to
// another's: export from from, import into to, and commit. It returns
// the snapshot that moved. Any failure fails the test.
func Migrate(t testing.TB, from, to *Server, tup app.Tuple) []byte {
	t.Helper()
	e := Export(t, from, tup)
	Import(t, to, e)
	if err := e.Finish(context.Background(), true); err != nil {
		t.Fatalf("commit %v on %s: %v", tup, from.Name, err)
	}
	e.Socket.Close()
	return e.Snapshot
}

// Export exports tup from s; the caller finishes it. The daemon's copy of
// the socket, e.Socket, is closed when the test ends at the latest; close
// it once finished, as mtcpd does, or the connection cannot end (a
// socket lives until its last descriptor is closed).
func Export(t testing.TB, s *Server, tup app.Tuple) *app.Exported {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	e, err := s.Registry.Export(ctx, s.Service, tup)
	if err != nil {
		t.Fatalf("export %v from %s: %v", tup, s.Name, err)
	}
	t.Cleanup(func() { e.Socket.Close() })
	return e
}

// Import hands e's socket and snapshot to s's application.
func Import(t testing.TB, s *Server, e *app.Exported) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	if err := s.Registry.Import(ctx, s.Service, e.Socket, e.Snapshot); err != nil {
		t.Fatalf("import %v into %s: %v", e.Tuple, s.Name, err)
	}
}

// Eventually polls cond until it holds, failing the test with what and
// cond's last explanation if it does not within timeout.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (ok bool, why string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for wait := time.Millisecond; ; wait = min(2*wait, 50*time.Millisecond) {
		ok, why := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %s", timeout, what, why)
		}
		time.Sleep(wait)
	}
}

// Logger returns a logger writing to the test log, prefixed with name.
// Set MTCP_TEST_DEBUG=1 for debug records.
func Logger(t testing.TB, name string) *slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("MTCP_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level})).With("node", name)
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

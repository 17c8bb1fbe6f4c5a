package app_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// counterState is the snapshot of the counter handler.
type counterState struct {
	N  int    `json:"n"`
	In []byte `json:"in"`
}

// counter answers each line L with "n name L", n counting the lines of
// the session. snaps, if not nil, receives the snapshot of every call.
func counter(name string, snaps chan<- []byte) app.Handler {
	return app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		if snaps != nil {
			snaps <- snap
		}
		var st counterState
		if snap != nil {
			if err := json.Unmarshal(snap, &st); err != nil {
				return nil, err
			}
		}
		buf := make([]byte, 4096)
		for {
			for {
				i := bytes.IndexByte(st.In, '\n')
				if i < 0 {
					break
				}
				line := st.In[:i]
				st.In = st.In[i+1:]
				st.N++
				if _, err := fmt.Fprintf(conn, "%d %s %s\n", st.N, name, line); err != nil {
					return nil, err // the tests never migrate during a reply
				}
			}
			n, err := conn.Read(buf)
			st.In = append(st.In, buf[:n]...)
			if err != nil {
				if errors.Is(err, app.ErrMigrating) {
					return json.Marshal(&st)
				}
				if errors.Is(err, io.EOF) {
					return nil, nil
				}
				return nil, err
			}
		}
	})
}

type client struct {
	c  *net.TCPConn
	rd *bufio.Reader
}

func dial(t *testing.T, s *apptest.Server) *client {
	c := s.Dial(t)
	return &client{c: c, rd: bufio.NewReader(c)}
}

func (c *client) send(t *testing.T, s string) {
	t.Helper()
	c.c.SetWriteDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.WriteString(c.c, s); err != nil {
		t.Fatalf("send %q: %v", s, err)
	}
}

func (c *client) line(t *testing.T) string {
	t.Helper()
	c.c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	l, err := c.rd.ReadString('\n')
	if err != nil {
		t.Fatalf("read reply: %v (got %q)", err, l)
	}
	return strings.TrimSuffix(l, "\n")
}

func (c *client) do(t *testing.T, cmd, want string) {
	t.Helper()
	c.send(t, cmd+"\n")
	if got := c.line(t); got != want {
		t.Fatalf("%q: got %q, want %q", cmd, got, want)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), apptest.Timeout)
	t.Cleanup(cancel)
	return ctx
}

func TestLocalMigrationCarriesStateAndBufferedBytes(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	b := apptest.Start(t, "B", counter("B", nil))
	c := dial(t, a)
	c.do(t, "x", "1 A x")
	c.do(t, "y", "2 A y")
	tup := a.WaitConn(t, c.c)

	// "w" stays in the handler's buffer, unprocessed: it must move.
	c.send(t, "z\nw")
	if got := c.line(t); got != "3 A z" {
		t.Fatalf("got %q, want 3 A z", got)
	}
	e := apptest.Export(t, a, tup)
	var st counterState
	if err := json.Unmarshal(e.Snapshot, &st); err != nil {
		t.Fatal(err)
	}
	if st.N != 3 || string(st.In) != "w" {
		t.Fatalf("snapshot %+v (%q), want n=3 in=\"w\"", st, st.In)
	}
	// Sent while the connection is exported: it waits in the socket.
	c.send(t, "\n")
	apptest.Import(t, b, e)
	if err := e.Finish(ctxT(t), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close() // as mtcpd does
	if got := c.line(t); got != "4 B w" {
		t.Fatalf("got %q, want 4 B w", got)
	}
	c.do(t, "v", "5 B v")
	if conns := a.Registry.Conns(a.Service); len(conns) != 0 {
		t.Errorf("A still reports %v", conns)
	}
	if conns := b.Registry.Conns(b.Service); !slices.Contains(conns, tup) {
		t.Errorf("B reports %v, want %v among them", conns, tup)
	}
	// And back.
	apptest.Migrate(t, b, a, tup)
	c.do(t, "u", "6 A u")
}

func TestAbortResumesOnSameServer(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	c := dial(t, a)
	c.do(t, "x", "1 A x")
	tup := a.WaitConn(t, c.c)
	e := apptest.Export(t, a, tup)
	c.send(t, "y\n") // sent while exported
	if err := e.Finish(ctxT(t), false); err != nil {
		t.Fatal(err)
	}
	if got := c.line(t); got != "2 A y" {
		t.Fatalf("got %q, want 2 A y", got)
	}
	// Finish is idempotent: a second call changes nothing.
	if err := e.Finish(ctxT(t), true); err != nil {
		t.Fatal(err)
	}
	c.do(t, "z", "3 A z")
	if conns := a.Registry.Conns(a.Service); !slices.Contains(conns, tup) {
		t.Errorf("A reports %v, want %v among them", conns, tup)
	}
	// It can be exported again.
	e = apptest.Export(t, a, tup)
	if err := e.Finish(ctxT(t), false); err != nil {
		t.Fatal(err)
	}
	c.do(t, "w", "4 A w")
}

func TestExportUnknown(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	bogus := app.Tuple{Local: netip.MustParseAddrPort(a.Service), Remote: netip.MustParseAddrPort("127.0.0.1:1")}
	_, err := a.Registry.Export(ctxT(t), a.Service, bogus)
	if !errors.Is(err, app.ErrNoConn) || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("export of an unknown tuple: %v, want ErrNoConn naming the tuple", err)
	}
	_, err = a.Registry.Export(ctxT(t), "no-such-service", bogus)
	if !errors.Is(err, app.ErrNoService) || !strings.Contains(err.Error(), a.Service) {
		t.Errorf("export from an unknown service: %v, want ErrNoService listing %s", err, a.Service)
	}
	if err := a.Registry.Import(ctxT(t), "no-such-service", os.Stdin, nil); !errors.Is(err, app.ErrNoService) {
		t.Errorf("import into an unknown service: %v, want ErrNoService", err)
	}
	if _, err := a.Registry.ExportAll(ctxT(t), "no-such-service", 0); !errors.Is(err, app.ErrNoService) {
		t.Errorf("export all of an unknown service: %v, want ErrNoService", err)
	}
	t.Log(err)
}

func TestBlockedReadGetsErrMigratingPromptly(t *testing.T) {
	type call struct {
		snap  []byte
		err   error
		cause error
	}
	calls := make(chan call, 4)
	entered := make(chan []byte, 4)
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		entered <- snap
		_, err := conn.Read(make([]byte, 10)) // the client sends nothing
		calls <- call{snap, err, context.Cause(ctx)}
		return []byte("state"), err
	})
	a := apptest.Start(t, "A", h)
	c := dial(t, a)
	tup := a.WaitConn(t, c.c)
	<-entered
	start := time.Now()
	e := apptest.Export(t, a, tup)
	took := time.Since(start)
	got := <-calls
	if !errors.Is(got.err, app.ErrMigrating) || !errors.Is(got.cause, app.ErrMigrating) {
		t.Fatalf("blocked Read returned %v (ctx cause %v), want ErrMigrating", got.err, got.cause)
	}
	var ne net.Error
	if !errors.As(got.err, &ne) || ne.Timeout() {
		t.Errorf("Read error %v: want a net.Error that is not a timeout", got.err)
	}
	if took > time.Second {
		t.Errorf("export took %v", took)
	}
	if string(e.Snapshot) != "state" {
		t.Errorf("snapshot %q", e.Snapshot)
	}
	if err := e.Finish(ctxT(t), false); err != nil {
		t.Fatal(err)
	}
	if got := <-entered; string(got) != "state" {
		t.Fatalf("resumed with %q, want \"state\"", got)
	}
}

func TestBlockedReadResumesWithSnapshot(t *testing.T) {
	snaps := make(chan []byte, 4)
	a := apptest.Start(t, "A", counter("A", snaps))
	c := dial(t, a)
	if s := <-snaps; s != nil {
		t.Fatalf("fresh connection got snapshot %q", s)
	}
	tup := a.WaitConn(t, c.c)
	e := apptest.Export(t, a, tup)
	if err := e.Finish(ctxT(t), false); err != nil {
		t.Fatal(err)
	}
	if s := <-snaps; !bytes.Equal(s, e.Snapshot) {
		t.Fatalf("resumed with %q, want %q", s, e.Snapshot)
	}
	c.do(t, "x", "1 A x")
}

func TestExportAllDrains(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	b := apptest.Start(t, "B", counter("B", nil))
	var cs []*client
	for i := range 5 {
		c := dial(t, a)
		c.do(t, fmt.Sprint(i), fmt.Sprintf("1 A %d", i))
		a.WaitConn(t, c.c)
		cs = append(cs, c)
	}
	es, err := a.Registry.ExportAll(ctxT(t), a.Service, 2)
	if err != nil || len(es) != len(cs) {
		t.Fatalf("ExportAll: %d exported, err %v", len(es), err)
	}
	for _, e := range es {
		t.Cleanup(func() { e.Socket.Close() })
		apptest.Import(t, b, e)
		if err := e.Finish(ctxT(t), true); err != nil {
			t.Fatal(err)
		}
		e.Socket.Close()
	}
	for _, c := range cs {
		c.do(t, "again", "2 B again")
	}
	if n := len(b.Registry.Conns(b.Service)); n != len(cs) {
		t.Errorf("B reports %d connections, want %d", n, len(cs))
	}
}

func TestLateExportAnswerResumes(t *testing.T) {
	release := make(chan struct{})
	calls := make(chan []byte, 4)
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		calls <- snap
		if snap != nil {
			_, err := conn.Write([]byte("resumed\n"))
			conn.Read(make([]byte, 1))
			return nil, err
		}
		<-ctx.Done()
		<-release // a handler slow to reach its safe point
		return []byte("late"), nil
	})
	a := apptest.Start(t, "A", h)
	c := dial(t, a)
	<-calls
	tup := a.WaitConn(t, c.c)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := a.Registry.Export(ctx, a.Service, tup); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("export: %v, want a deadline error", err)
	}
	close(release)
	if s := <-calls; string(s) != "late" {
		t.Fatalf("resumed with %q, want \"late\"", s)
	}
	if got := (&client{c: c.c, rd: c.rd}).line(t); got != "resumed" {
		t.Fatalf("got %q", got)
	}
}

func TestHandlerEndingDuringExport(t *testing.T) {
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		<-ctx.Done()
		return nil, nil // "done", not a snapshot
	})
	a := apptest.Start(t, "A", h)
	c := dial(t, a)
	tup := a.WaitConn(t, c.c)
	_, err := a.Registry.Export(ctxT(t), a.Service, tup)
	if err == nil || !strings.Contains(err.Error(), "ended the connection") {
		t.Fatalf("export: %v, want an error saying the handler ended the connection", err)
	}
	c.c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if n, err := c.c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read %d, %v; want EOF", n, err)
	}
	apptest.Eventually(t, apptest.Timeout, "the connection to be gone", func() (bool, string) {
		conns := a.Registry.Conns(a.Service)
		return len(conns) == 0, fmt.Sprint(conns)
	})
}

// TestHandlerHugeError: a handler that ends its connection during an
// export with an error of megabytes (a client's input in it, say) fails
// that export only: the link to mtcpd stays, and the next connection
// exports.
func TestHandlerHugeError(t *testing.T) {
	var first atomic.Bool
	first.Store(true)
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		<-ctx.Done()
		if first.CompareAndSwap(true, false) {
			return nil, errors.New(strings.Repeat("x", 3<<20))
		}
		return []byte{}, nil
	})
	a := apptest.Start(t, "A", h)
	c1, c2 := dial(t, a), dial(t, a)
	t1, t2 := a.WaitConn(t, c1.c), a.WaitConn(t, c2.c)
	if _, err := a.Registry.Export(ctxT(t), a.Service, t1); err == nil || !strings.Contains(err.Error(), "ended the connection: xxx") || len(err.Error()) > 8<<10 {
		t.Fatalf("first export: want the handler's error, cut short; got %d bytes: %.100v", len(fmt.Sprint(err)), err)
	}
	e, err := a.Registry.Export(ctxT(t), a.Service, t2)
	if err != nil {
		t.Fatalf("second export, on the same link: %v", err)
	}
	e.Finish(ctxT(t), false)
}

func TestOversizedSnapshotKeepsConnection(t *testing.T) {
	calls := make(chan []byte, 4)
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		calls <- snap
		if snap != nil {
			conn.Write([]byte("still here\n"))
		}
		_, err := conn.Read(make([]byte, 1))
		return make([]byte, app.MaxSnapshot+1), err
	})
	a := apptest.Start(t, "A", h)
	c := dial(t, a)
	<-calls
	tup := a.WaitConn(t, c.c)
	if _, err := a.Registry.Export(ctxT(t), a.Service, tup); err == nil || !strings.Contains(err.Error(), "snapshot") {
		t.Fatalf("export: %v, want an error about the snapshot size", err)
	}
	if s := <-calls; len(s) != app.MaxSnapshot+1 {
		t.Fatalf("resumed with %d bytes", len(s))
	}
	if got := (&client{c: c.c, rd: bufio.NewReader(c.c)}).line(t); got != "still here" {
		t.Fatalf("got %q", got)
	}
}

func TestLargeSnapshotMoves(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), app.MaxSnapshot/16)
	calls := make(chan []byte, 4)
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		calls <- snap
		_, err := conn.Read(make([]byte, 1))
		return big, err
	})
	a := apptest.Start(t, "A", h)
	b := apptest.Start(t, "B", h)
	c := dial(t, a)
	<-calls
	tup := a.WaitConn(t, c.c)
	apptest.Migrate(t, a, b, tup)
	if s := <-calls; !bytes.Equal(s, big) {
		t.Fatalf("B got a snapshot of %d bytes, want the %d sent", len(s), len(big))
	}
}

// raw is a bare protocol client of a registry.
type raw struct{ *net.UnixConn }

func dialRaw(t *testing.T, sock string) raw {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return raw{c}
}

func (r raw) frame(t *testing.T, body string, fd int) {
	t.Helper()
	b := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	b = append(b, body...)
	var oob []byte
	if fd >= 0 {
		oob = syscall.UnixRights(fd)
	}
	if _, _, err := r.WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
}

// reply reads one answer frame.
func (r raw) reply(t *testing.T) map[string]any {
	t.Helper()
	r.SetReadDeadline(time.Now().Add(apptest.Timeout))
	var n uint32
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		t.Fatalf("read answer: %v", err)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// closed waits for the registry to close the connection.
func (r raw) closed(t *testing.T) {
	t.Helper()
	r.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatalf("registry did not close the connection: %v", err)
	}
}

func TestGarbageOnAppSocket(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	c := dial(t, a)
	c.do(t, "x", "1 A x")
	tup := a.WaitConn(t, c.c)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	reg := func(svc string) string {
		return fmt.Sprintf(`{"type":"register","version":1,"service":%q,"pid":1}`, svc)
	}
	for _, tc := range []struct {
		name string
		send func(r raw)
	}{
		{"http", func(r raw) { r.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")) }},
		{"bad json", func(r raw) { r.frame(t, "{{{{", -1) }},
		{"no type", func(r raw) { r.frame(t, `{"id":3}`, -1) }},
		{"not register first", func(r raw) { r.frame(t, `{"type":"opened"}`, -1) }},
		{"fd claimed, none sent", func(r raw) { r.frame(t, `{"type":"register","fds":1}`, -1) }},
		{"fd with register", func(r raw) {
			r.frame(t, reg("garbage-1"), int(devnull.Fd()))
			r.frame(t, `{"type":"closed","service":"garbage-1","tuple":{"local":"1.2.3.4:5","remote":"6.7.8.9:10"}}`, -1)
		}},
		{"wrong version", func(r raw) { r.frame(t, `{"type":"register","version":99,"service":"x"}`, -1) }},
		{"empty service", func(r raw) { r.frame(t, `{"type":"register","version":1}`, -1) }},
		{"unknown type", func(r raw) {
			r.frame(t, reg("garbage-2"), -1)
			r.frame(t, `{"type":"launch-missiles"}`, -1)
		}},
		{"answer to nothing", func(r raw) {
			r.frame(t, reg("garbage-3"), -1)
			r.frame(t, `{"type":"finished","id":424242}`, -1)
		}},
		{"fd with opened", func(r raw) {
			r.frame(t, reg("garbage-4"), -1)
			r.frame(t, `{"type":"opened","service":"garbage-4","tuple":{"local":"1.2.3.4:5","remote":"6.7.8.9:10"},"fds":1}`, int(devnull.Fd()))
		}},
		{"bad tuple", func(r raw) {
			r.frame(t, reg("garbage-5"), -1)
			r.frame(t, `{"type":"opened","service":"garbage-5","tuple":{"local":"nonsense"}}`, -1)
		}},
		{"huge frame", func(r raw) { r.Write([]byte{0x7f, 0xff, 0xff, 0xff}) }},
		{"nothing", func(r raw) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, a.Socket)
			tc.send(r)
			if tc.name == "nothing" {
				r.CloseWrite()
			}
			r.closed(t)
		})
	}
	// The registry works on: the application is registered, its
	// connection serves and can be exported.
	if got := a.Registry.Services(); !slices.Equal(got, []string{a.Service}) {
		t.Errorf("services after the garbage: %v", got)
	}
	e := apptest.Export(t, a, tup)
	if err := e.Finish(ctxT(t), false); err != nil {
		t.Fatal(err)
	}
	c.do(t, "y", "2 A y")
}

func TestSecondRegistrationRefused(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	// Through the protocol: the service's name is taken.
	r := dialRaw(t, a.Socket)
	r.frame(t, fmt.Sprintf(`{"type":"register","version":1,"service":%q}`, a.Service), -1)
	m := r.reply(t)
	if m["type"] != "error" || m["code"] != "taken" || !strings.Contains(fmt.Sprint(m["error"]), "stop that process") {
		t.Fatalf("answer %v", m)
	}
	r.closed(t)

	// Through Serve: a second application for a service someone holds.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := ln.Addr().String()
	ln.Close()
	holder := dialRaw(t, a.Socket)
	holder.frame(t, fmt.Sprintf(`{"type":"register","version":1,"service":%q}`, svc), -1)
	if m := holder.reply(t); m["type"] != "registered" {
		t.Fatalf("answer %v", m)
	}
	err = app.Serve(ctxT(t), app.Config{Service: svc, Daemon: a.Socket, Handler: counter("X", nil)})
	if !errors.Is(err, app.ErrServiceTaken) || !strings.Contains(err.Error(), svc) {
		t.Fatalf("Serve: %v, want ErrServiceTaken naming %s", err, svc)
	}
	t.Log(err)
	if strings.Count(err.Error(), app.ErrServiceTaken.Error()) != 1 {
		t.Errorf("error repeats itself: %v", err)
	}
	// Serve released its listener.
	ln, err = net.Listen("tcp", svc)
	if err != nil {
		t.Fatalf("Serve kept its listener: %v", err)
	}
	ln.Close()
	if got := a.Registry.Services(); !slices.Equal(got, []string{a.Service, svc}) && !slices.Equal(got, []string{svc, a.Service}) {
		t.Errorf("services %v", got)
	}
}

func TestRegistryRefusesUID(t *testing.T) {
	dir, err := os.MkdirTemp("", "mtcp-apptest-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "app.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	reg := app.NewRegistry(apptest.Logger(t, "registry"))
	app.SetAllowUID(reg, func(uid uint32) bool { return false })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- reg.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	err = app.Serve(ctxT(t), app.Config{Service: "127.0.0.1:0", Daemon: sock, Handler: counter("X", nil)})
	if !errors.Is(err, app.ErrPeerRefused) || !strings.Contains(err.Error(), fmt.Sprint(os.Getuid())) {
		t.Fatalf("Serve: %v, want ErrPeerRefused naming uid %d", err, os.Getuid())
	}
	t.Log(err)
	if len(reg.Services()) != 0 {
		t.Errorf("services %v", reg.Services())
	}
}

func TestAppReconnectsAfterDaemonRestart(t *testing.T) {
	dir, err := os.MkdirTemp("", "mtcp-apptest-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "app.sock")
	startRegistry := func() (*app.Registry, func()) {
		os.Remove(sock)
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		reg := app.NewRegistry(apptest.Logger(t, "registry"))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- reg.Serve(ctx, ln) }()
		return reg, func() {
			cancel()
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	}
	reg1, stop1 := startRegistry()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error)
	go func() {
		served <- app.Serve(ctx, app.Config{Service: svc, Daemon: sock, Handler: counter("A", nil), Logger: apptest.Logger(t, "A")})
	}()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	apptest.Eventually(t, apptest.Timeout, "registration", func() (bool, string) {
		return len(reg1.Services()) == 1, fmt.Sprint(reg1.Services())
	})
	nc, err := net.Dial("tcp", svc)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := &client{c: nc.(*net.TCPConn), rd: bufio.NewReader(nc)}
	c.do(t, "x", "1 A x")
	tup := apptest.TupleOf(nc)

	stop1()
	reg2, stop2 := startRegistry()
	defer stop2()
	apptest.Eventually(t, apptest.Timeout, "the application to register again and report its connection", func() (bool, string) {
		conns := reg2.Conns(svc)
		return slices.Contains(conns, tup), fmt.Sprint(reg2.Services(), conns)
	})
	c.do(t, "y", "2 A y")
	e, err := reg2.Export(ctxT(t), svc, tup)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Socket.Close()
	if err := e.Finish(ctxT(t), false); err != nil {
		t.Fatal(err)
	}
	c.do(t, "z", "3 A z")
}

func TestServeConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  app.Config
		want string
	}{
		{app.Config{Service: ":0"}, "Handler"},
		{app.Config{Handler: counter("x", nil)}, "Service"},
		{app.Config{Service: "127.0.0.1:0", Handler: counter("x", nil), Daemon: "/nonexistent/app.sock"}, "is mtcpd running"},
		{app.Config{Service: "256.0.0.1:0", Handler: counter("x", nil)}, "listen"},
	} {
		err := app.Serve(ctxT(t), tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Serve(%+v): %v, want an error mentioning %q", tc.cfg, err, tc.want)
		}
	}
}

// TestNothingBeforeRegistered: a request for a service sent while its
// application registers never reaches the application ahead of its
// "registered" answer (which it would take for a protocol violation).
func TestNothingBeforeRegistered(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	for i := range 50 {
		svc := fmt.Sprintf("127.0.0.1:%d", 20000+i)
		r := dialRaw(t, a.Socket)
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			tu := app.Tuple{Local: netip.MustParseAddrPort(svc), Remote: netip.MustParseAddrPort("10.0.0.1:1")}
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
				a.Registry.Export(ctx, svc, tu)
				cancel()
			}
		}()
		r.frame(t, fmt.Sprintf(`{"type":"register","version":1,"service":%q}`, svc), -1)
		m := r.reply(t)
		close(stop)
		<-done
		if m["type"] != "registered" {
			t.Fatalf("registration %d: first answer %v, want registered", i, m)
		}
		r.Close()
	}
}

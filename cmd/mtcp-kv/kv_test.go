package main

import (
	"bufio"
	"context"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/app/apptest"
)

type client struct {
	t  *testing.T
	c  *net.TCPConn
	rd *bufio.Reader
}

func dial(t *testing.T, s *apptest.Server) *client {
	c := s.Dial(t)
	return &client{t: t, c: c, rd: bufio.NewReader(c)}
}

func (c *client) send(s string) {
	c.t.Helper()
	c.c.SetWriteDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.WriteString(c.c, s); err != nil {
		c.t.Fatalf("send %q: %v", s, err)
	}
}

func (c *client) line() string {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	l, err := c.rd.ReadString('\n')
	if err != nil {
		c.t.Fatalf("read: %v (got %q)", err, l)
	}
	return strings.TrimSuffix(l, "\n")
}

func (c *client) do(cmd, want string) {
	c.t.Helper()
	c.send(cmd + "\n")
	if got := c.line(); got != want {
		c.t.Fatalf("%s: got %q, want %q", cmd, got, want)
	}
}

func TestSessionMigratesWithStateAndBufferedInput(t *testing.T) {
	a := apptest.Start(t, "A", kv{name: "server-a"})
	b := apptest.Start(t, "B", kv{name: "server-b"})
	c := dial(t, a)
	c.do("SET greeting hello world", "OK")
	c.do("GET greeting", "hello world")
	c.do("HOST", "server-a")
	tup := a.WaitConn(t, c.c)

	// One segment: a command and the start of the next, which the server
	// has read but cannot process yet.
	c.send("SET k 1\nGET ")
	if got := c.line(); got != "OK" {
		t.Fatalf("SET k 1: %q", got)
	}
	e := apptest.Export(t, a, tup)
	var s session
	if err := s.unmarshal(e.Snapshot); err != nil {
		t.Fatal(err)
	}
	if s.Count != 4 || s.Data["k"] != "1" || string(s.In) != "GET " || len(s.Out) != 0 {
		t.Fatalf("snapshot %s", e.Snapshot)
	}
	c.send("k\n") // while exported: waits in the socket
	apptest.Import(t, b, e)
	if err := e.Finish(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close() // as mtcpd does
	if got := c.line(); got != "1" {
		t.Fatalf("GET k after migration: %q, want 1", got)
	}
	c.do("COUNT", "6")
	c.do("GET greeting", "hello world")
	c.do("HOST", "server-b")
	if conns := a.Registry.Conns(a.Service); len(conns) != 0 {
		t.Errorf("A still reports %v", conns)
	}
	if conns := b.Registry.Conns(b.Service); !slices.Contains(conns, tup) {
		t.Errorf("B reports %v", conns)
	}
	c.do("QUIT", "BYE")
	c.c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if n, err := c.rd.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after QUIT: read %d, %v; want EOF", n, err)
	}
	apptest.Eventually(t, apptest.Timeout, "B to forget the session", func() (bool, string) {
		return len(b.Registry.Conns(b.Service)) == 0, ""
	})
}

func TestAbortedMigrationContinuesOnSource(t *testing.T) {
	a := apptest.Start(t, "A", kv{name: "server-a"})
	c := dial(t, a)
	c.do("SET x 42", "OK")
	tup := a.WaitConn(t, c.c)
	e := apptest.Export(t, a, tup)
	c.send("GET x\n")
	if err := e.Finish(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if got := c.line(); got != "42" {
		t.Fatalf("GET x: %q", got)
	}
	c.do("COUNT", "3")
	c.do("HOST", "server-a")
}

func TestSessionPingPong(t *testing.T) {
	a := apptest.Start(t, "A", kv{name: "server-a"})
	b := apptest.Start(t, "B", kv{name: "server-b"})
	c := dial(t, a)
	tup := a.WaitConn(t, c.c)
	from, to := a, b
	for i := range 10 {
		c.do("SET k"+string(rune('a'+i)), "ERR usage: SET key value") // counted too
		c.do("SET k v", "OK")
		apptest.Migrate(t, from, to, tup)
		from, to = to, from
		c.do("HOST", map[*apptest.Server]string{a: "server-a", b: "server-b"}[from])
	}
	c.do("COUNT", "31")
	c.do("GET k", "v")
}

func TestCommands(t *testing.T) {
	h := kv{name: "n"}
	s := &session{Data: map[string]string{}}
	for _, tc := range []struct{ in, want string }{
		{"GET a", "NIL"},
		{"SET a  two  spaces ", "OK"},
		{"GET a", " two  spaces "},
		{"set b 1", "OK"},
		{"GET", "ERR usage: GET key"},
		{"GET a b", "ERR usage: GET key"},
		{"SET a", "ERR usage: SET key value"},
		{"", "ERR empty command"},
		{"HOST", "n"},
		{"FLY", `ERR unknown command "FLY" (commands: SET k v, GET k, COUNT, HOST, QUIT)`},
		{"COUNT", "11"},
		{"QUIT", "BYE"},
	} {
		if got := h.do(s, tc.in); got != tc.want {
			t.Errorf("%q: got %q, want %q", tc.in, got, tc.want)
		}
	}
	if !s.Quit {
		t.Error("QUIT did not end the session")
	}
}

func TestFlags(t *testing.T) {
	var out strings.Builder
	if code := run([]string{"--help"}, &out); code != 0 || !strings.Contains(out.String(), "--listen") && !strings.Contains(out.String(), "-listen") {
		t.Errorf("--help: exit %d, output %q", code, out.String())
	}
	if code := run([]string{"--bogus"}, io.Discard); code != 2 {
		t.Errorf("--bogus: exit %d, want 2", code)
	}
	if code := run([]string{"--listen", "127.0.0.1:0", "--daemon", "/nonexistent/app.sock", "--name", "x"}, io.Discard); code != 1 {
		t.Errorf("no daemon: exit %d, want 1", code)
	}
}

package app_test

import (
	"bufio"
	"context"
	"net"
	"testing"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// greeter greets a fresh connection (snapshot nil), then echoes lines. It
// keeps no state, and gives up a connection by returning the error it
// got, as the Handler documentation allows.
func greeter() app.Handler {
	return app.HandlerFunc(func(ctx context.Context, conn net.Conn, snapshot []byte) ([]byte, error) {
		if snapshot == nil {
			if _, err := conn.Write([]byte("HELLO\n")); err != nil {
				return nil, err
			}
		}
		rd := bufio.NewReader(conn)
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				return nil, err // ErrMigrating: no state to give (the client sends one line at a time)
			}
			if _, err := conn.Write([]byte(line)); err != nil {
				return nil, err
			}
		}
	})
}

// TestStatelessHandlerNotFresh: a connection whose stateless handler gave
// it up by returning the error it got is not greeted again as a fresh
// one, after an aborted export here or an import elsewhere.
func TestStatelessHandlerNotFresh(t *testing.T) {
	a := apptest.Start(t, "A", greeter())
	b := apptest.Start(t, "B", greeter())
	c := dial(t, a)
	if got := c.line(t); got != "HELLO" { // the greeting, for a fresh connection
		t.Fatalf("first line %q, want the greeting", got)
	}
	c.do(t, "x", "x")
	tup := apptest.TupleOf(c.c)

	e, err := a.Registry.Export(ctxT(t), a.Service, tup)
	if err != nil {
		t.Fatal(err)
	}
	if e.Snapshot == nil {
		t.Fatal("exported with a nil snapshot: the next server would take the connection for a fresh one")
	}
	if err := e.Finish(ctxT(t), false); err != nil { // aborted: it resumes at A
		t.Fatal(err)
	}
	e.Socket.Close()
	c.do(t, "y", "y")

	apptest.Migrate(t, a, b, tup)
	c.do(t, "z", "z")
}

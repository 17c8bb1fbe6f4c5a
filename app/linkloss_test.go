//go:build linux

package app_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// TestLinkLossWhileFrozen: the application's link to mtcpd breaks while
// mtcpd has an exported connection frozen (repair mode), and mtcpd then
// aborts the migration: it thaws the socket and closes its copy. The
// application waited for the thaw instead of resuming a handler on a
// socket it could not read (which ended the connection), and the client
// is served on.
func TestLinkLossWhileFrozen(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: freezes a socket with TCP_REPAIR")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "app.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	reg := app.NewRegistry(apptest.Logger(t, "registry"))
	rctx, stopRegistry := context.WithCancel(context.Background())
	defer stopRegistry()
	registryDone := make(chan error, 1)
	go func() { registryDone <- reg.Serve(rctx, ln) }()

	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := tl.Addr().String()
	tl.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- app.Serve(ctx, app.Config{Service: svc, Daemon: sock, Handler: counter("A", nil), Logger: apptest.Logger(t, "A")})
	}()
	defer func() { cancel(); <-served }()
	apptest.Eventually(t, apptest.Timeout, "the application to register", func() (bool, string) {
		return len(reg.Services()) == 1, fmt.Sprint(reg.Services())
	})
	nc, err := net.Dial("tcp", svc)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := &client{c: nc.(*net.TCPConn), rd: bufio.NewReader(nc)}
	c.do(t, "x", "1 A x")
	apptest.Eventually(t, apptest.Timeout, "the connection to be reported", func() (bool, string) { return len(reg.Conns(svc)) == 1, "" })

	e, err := reg.Export(ctxT(t), svc, apptest.TupleOf(nc))
	if err != nil {
		t.Fatal(err)
	}
	repair := func(v int) {
		t.Helper()
		rc, err := e.Socket.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_TCP, unix.TCP_REPAIR, v) }); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
	}
	repair(unix.TCP_REPAIR_ON) // mtcpd freezes it
	stopRegistry()             // the link breaks
	<-registryDone
	time.Sleep(200 * time.Millisecond) // the application notices
	repair(unix.TCP_REPAIR_OFF)        // the migration aborts: mtcpd thaws it
	e.Finish(context.Background(), false)
	e.Socket.Close() // and lets its copy go
	c.do(t, "y", "2 A y")
}

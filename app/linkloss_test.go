//go:build linux

package app_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// exportSetup is a registry (mtcpd's side), an application registered
// with it, and one client connection that mtcpd has been given (Export),
// with no verdict yet.
type exportSetup struct {
	c    *client
	e    *app.Exported
	reg  *app.Registry
	svc  string
	sock string
	// stopRegistry stops the registry, which breaks the link, and waits
	// for it; once.
	stopRegistry func()
}

// newExportSetup starts it, with the application's Config.VerdictWait
// set to verdictWait.
func newExportSetup(t *testing.T, verdictWait time.Duration) *exportSetup {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: freezes a socket with TCP_REPAIR")
	}
	sock := filepath.Join(t.TempDir(), "app.sock")
	reg, stop := startRegistry(t, sock, "registry")

	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := tl.Addr().String()
	tl.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- app.Serve(ctx, app.Config{Service: svc, Daemon: sock, Handler: counter("A", nil), Logger: apptest.Logger(t, "A"), VerdictWait: verdictWait})
	}()
	t.Cleanup(func() { cancel(); <-served })
	apptest.Eventually(t, apptest.Timeout, "the application to register", func() (bool, string) {
		return len(reg.Services()) == 1, fmt.Sprint(reg.Services())
	})
	nc, err := net.Dial("tcp", svc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &client{c: nc.(*net.TCPConn), rd: bufio.NewReader(nc)}
	c.do(t, "x", "1 A x")
	apptest.Eventually(t, apptest.Timeout, "the connection to be reported", func() (bool, string) { return len(reg.Conns(svc)) == 1, "" })

	e, err := reg.Export(ctxT(t), svc, apptest.TupleOf(nc))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Socket.Close() })
	return &exportSetup{c: c, e: e, reg: reg, svc: svc, sock: sock, stopRegistry: stop}
}

// startRegistry serves a registry (mtcpd's side) on the unix socket sock
// until stop, which t's cleanup calls too; stop waits for it, once.
func startRegistry(t *testing.T, sock, name string) (reg *app.Registry, stop func()) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	reg = app.NewRegistry(apptest.Logger(t, name))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- reg.Serve(ctx, ln) }()
	stop = sync.OnceFunc(func() { cancel(); <-done })
	t.Cleanup(stop)
	return reg, stop
}

// repair sets the exported socket's TCP_REPAIR to v, as mtcpd does.
func (x *exportSetup) repair(t *testing.T, v int) {
	t.Helper()
	rc, err := x.e.Socket.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_TCP, unix.TCP_REPAIR, v) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
}

// TestLinkLossWhileFrozen: the application's link to mtcpd breaks while
// mtcpd has an exported connection frozen (repair mode), and mtcpd then
// aborts the migration: it thaws the socket and closes its copy. The
// application waited for the thaw instead of resuming a handler on a
// socket it could not read (which ended the connection), and the client
// is served on.
func TestLinkLossWhileFrozen(t *testing.T) {
	x := newExportSetup(t, 0)
	x.repair(t, unix.TCP_REPAIR_ON)    // mtcpd freezes it
	x.stopRegistry()                   // the link breaks
	time.Sleep(200 * time.Millisecond) // the application notices
	x.repair(t, unix.TCP_REPAIR_OFF)   // the migration aborts: mtcpd thaws it
	x.e.Finish(context.Background(), false)
	x.e.Socket.Close() // and lets its copy go
	x.c.do(t, "y", "2 A y")
}

// TestVerdictWait: mtcpd keeps its link up but never gives its verdict on
// an exported connection. Past Config.VerdictWait, the application
// decides as when the link is lost: the socket is not frozen, so the
// client is served on here.
func TestVerdictWait(t *testing.T) {
	x := newExportSetup(t, 300*time.Millisecond)
	x.c.c.SetDeadline(time.Now().Add(10 * time.Second))
	x.c.do(t, "y", "2 A y")
}

// TestLateVerdictAnswered: mtcpd gives its verdict on a frozen exported
// connection only after Config.VerdictWait, when the application decides
// by itself already. The late verdict is answered at once (the
// application used to take it and answer nothing, which held up the
// answers of its whole batch until mtcpd gave up), and the connection,
// thawed, is served on here.
func TestLateVerdictAnswered(t *testing.T) {
	x := newExportSetup(t, 300*time.Millisecond)
	x.repair(t, unix.TCP_REPAIR_ON)
	time.Sleep(600 * time.Millisecond) // past VerdictWait
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	err := x.e.Finish(ctx, false)
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the late verdict was answered after %v (%v)", took, err)
	}
	t.Logf("late verdict: %v", err)
	x.repair(t, unix.TCP_REPAIR_OFF)
	x.c.c.SetDeadline(time.Now().Add(10 * time.Second))
	x.c.do(t, "y", "2 A y")
}

// TestLetGoReportsClosed: mtcpd never gives its verdict on a frozen
// exported connection, which stays frozen: the application lets it go
// after its frozen wait, and tells mtcpd it is closed, so that mtcpd no
// longer lists it (nor keeps its rules for it: a connection listed is a
// connection served).
func TestLetGoReportsClosed(t *testing.T) {
	t.Cleanup(app.SetFrozenWait(300 * time.Millisecond)) // restored once the application has stopped
	x := newExportSetup(t, 200*time.Millisecond)
	x.repair(t, unix.TCP_REPAIR_ON)
	apptest.Eventually(t, 5*time.Second, "the let-go connection to be reported closed", func() (bool, string) {
		cs := x.reg.Conns(x.svc)
		return len(cs) == 0, fmt.Sprint(cs)
	})
}

// TestExportIDsPerLink: mtcpd restarts while an exported connection of
// its previous run stays frozen (its application waits for a thaw). The
// new mtcpd numbers its exports from 1 again: they are not refused for an
// id the old one used.
func TestExportIDsPerLink(t *testing.T) {
	x := newExportSetup(t, 0)
	x.repair(t, unix.TCP_REPAIR_ON)
	x.stopRegistry()
	os.Remove(x.sock)
	reg, _ := startRegistry(t, x.sock, "registry2")
	apptest.Eventually(t, 10*time.Second, "the application to register again", func() (bool, string) {
		return len(reg.Services()) == 1, fmt.Sprint(reg.Services())
	})
	nc, err := net.Dial("tcp", x.svc)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := &client{c: nc.(*net.TCPConn), rd: bufio.NewReader(nc)}
	c.do(t, "z", "1 A z")
	apptest.Eventually(t, apptest.Timeout, "the new connection to be reported", func() (bool, string) {
		return slices.Contains(reg.Conns(x.svc), apptest.TupleOf(nc)), fmt.Sprint(reg.Conns(x.svc))
	})
	e, err := reg.Export(ctxT(t), x.svc, apptest.TupleOf(nc))
	if err != nil {
		t.Fatalf("export by the new mtcpd: %v", err)
	}
	e.Finish(ctxT(t), false)
	e.Socket.Close()
	x.repair(t, unix.TCP_REPAIR_OFF) // let the old one go on
}

// TestGoneVerdictLate: mtcpd's "gone" verdict on an exported connection
// (it moved away) fails, its deadline over before the application's
// answer came: mtcpd stops listing the connection all the same, which it
// would otherwise list (and try to migrate) until the application
// reconnected, as the application does not report a connection it was
// told is gone. The verdict is given with its deadline over already; its
// answer may still make it in time (then it succeeds), so the test tries
// a few connections.
func TestGoneVerdictLate(t *testing.T) {
	late := 0
	for i := 0; i < 20 && late < 3; i++ {
		x := newExportSetup(t, 0)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err := x.e.Finish(ctx, true)
		if err != nil {
			late++
		}
		if cs := x.reg.Conns(x.svc); len(cs) != 0 {
			t.Fatalf("after the gone verdict (%v), mtcpd still lists %v", err, cs)
		}
	}
	if late == 0 {
		t.Fatal("every verdict was answered in time: nothing tested")
	}
}

// TestVerdictWaitLetsGo: past Config.VerdictWait the application
// disconnects from mtcpd before it serves the connection on, so that
// mtcpd lets go of the socket instead of freezing it later and moving a
// connection the application serves: a claim to freeze it fails.
func TestVerdictWaitLetsGo(t *testing.T) {
	x := newExportSetup(t, 300*time.Millisecond)
	x.c.c.SetDeadline(time.Now().Add(10 * time.Second))
	x.c.do(t, "y", "2 A y")
	release, err := x.e.Claim()
	if err == nil {
		release()
		t.Fatal("the registry may still freeze a connection its application serves on")
	}
	if !errors.Is(err, app.ErrAppGone) {
		t.Fatalf("claim: %v, want ErrAppGone", err)
	}
}

// TestClaimHoldsLink: while mtcpd has claimed an exported socket to
// freeze it, the link to its application stays up (its application
// serves nothing of the connection meanwhile), so that the application,
// which resumes a socket it finds not frozen once the link is gone, finds
// it frozen.
func TestClaimHoldsLink(t *testing.T) {
	x := newExportSetup(t, 0)
	claimed, err := x.e.Claim()
	if err != nil {
		t.Fatal(err)
	}
	release := sync.OnceFunc(claimed)
	t.Cleanup(release) // before the registry stops, if the test fails
	stopped := make(chan struct{})
	go func() { x.stopRegistry(); close(stopped) }()
	select {
	case <-stopped:
		t.Fatal("the registry stopped, and broke the link, during a claim")
	case <-time.After(time.Second): // longer than the application waits after a link loss
	}
	// Had the link gone, the application would serve this already.
	x.c.send(t, "y\n")
	x.c.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if l, err := x.c.rd.ReadString('\n'); err == nil {
		t.Fatalf("the application served the connection during the claim: %q", l)
	}
	x.repair(t, unix.TCP_REPAIR_ON) // frozen under the claim
	release()
	<-stopped
	time.Sleep(time.Second) // the application sees the link gone, and the socket frozen
	x.repair(t, unix.TCP_REPAIR_OFF)
	x.e.Socket.Close()
	if got := x.c.line(t); got != "2 A y" {
		t.Fatalf("after the thaw: %q, want %q", got, "2 A y")
	}
}

//go:build linux

package app_test

import (
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// TestImportTCPOptions: an imported connection keeps the TCP_NODELAY and
// keepalive settings it had, which net.FileConn, with which the
// application adopts it, replaces with Go's; an application of protocol
// version 3 gets none and keeps Go's.
func TestImportTCPOptions(t *testing.T) {
	custom := app.TCPOptions{NoDelay: false, KeepAlive: true, KeepIdle: 33 * time.Second, KeepInterval: 7 * time.Second, KeepCount: 4}
	for _, tc := range []struct {
		name    string
		version int // offered by the importing application; 0: the latest
		opts    *app.TCPOptions
		want    [5]int // nodelay, keepalive, idle, interval, count
	}{
		{"custom", 0, &custom, [5]int{0, 1, 33, 7, 4}},
		{"no keepalive", 0, &app.TCPOptions{NoDelay: true}, [5]int{1, 0, -1, -1, -1}},
		{"go defaults", 0, &app.TCPOptions{NoDelay: true, KeepAlive: true, KeepIdle: 15 * time.Second, KeepInterval: 15 * time.Second, KeepCount: 9}, [5]int{1, 1, 15, 15, 9}},
		{"none given", 0, nil, [5]int{1, 1, 15, 15, 9}},
		{"version 3", 3, &custom, [5]int{1, 1, 15, 15, 9}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := apptest.Start(t, "A", counter("A", nil))
			if tc.version != 0 {
				restore := app.SetOfferedVersion(tc.version)
				defer restore()
			}
			b := apptest.Start(t, "B", counter("B", nil))
			cs, ts := dialN(t, a, 1)
			exps, errs := a.Registry.ExportMany(ctxT(t), a.Service, ts)
			t.Cleanup(func() { closeSockets(exps) })
			noErrors(t, "export", errs)
			var sock syscall.Conn = exps[0].Socket
			if tc.opts != nil {
				sock = app.WithTCPOptions(sock, *tc.opts)
			}
			noErrors(t, "import", b.Registry.ImportMany(ctxT(t), b.Service, []syscall.Conn{sock}, [][]byte{exps[0].Snapshot}))
			// The daemon's copy of the socket is the one B adopted.
			rc, err := exps[0].Socket.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var got [5]int
			var gerr error
			rc.Control(func(fd uintptr) {
				get := func(level, opt int) int {
					v, err := unix.GetsockoptInt(int(fd), level, opt)
					if err != nil && gerr == nil {
						gerr = err
					}
					return v
				}
				got = [5]int{get(unix.SOL_TCP, unix.TCP_NODELAY), get(unix.SOL_SOCKET, unix.SO_KEEPALIVE), -1, -1, -1}
				if got[1] != 0 {
					got[2], got[3], got[4] = get(unix.SOL_TCP, unix.TCP_KEEPIDLE), get(unix.SOL_TCP, unix.TCP_KEEPINTVL), get(unix.SOL_TCP, unix.TCP_KEEPCNT)
				}
			})
			if gerr != nil {
				t.Fatal(gerr)
			}
			if got != tc.want {
				t.Fatalf("B's connection has nodelay, keepalive, idle, interval, count %v, want %v", got, tc.want)
			}
			noErrors(t, "commit", app.FinishMany(ctxT(t), exps, true))
			cs[0].do(t, "y", "2 B y")
		})
	}
}

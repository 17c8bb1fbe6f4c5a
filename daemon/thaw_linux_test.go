package daemon

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mtcp-dev/mtcp/repair"
)

// TestThawLeavesFlags: thawing a process's frozen socket (a process
// migration's abort) leaves the socket as the process had it: a blocking
// socket stays blocking, with Nagle on and no keepalive.
func TestThawLeavesFlags(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: TCP_REPAIR")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The process's own socket, made as a C server makes it: blocking.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	a := ln.Addr().(*net.TCPAddr)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: a.Port, Addr: [4]byte(a.IP.To4())}); err != nil {
		t.Fatal(err)
	}
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		t.Fatal(err)
	}
	socks := []procSocket{{owner: repair.Owner{PID: os.Getpid(), FD: fd}}}
	if err := thawTree(nil, socks); err != nil {
		t.Fatal(err)
	}
	if v, err := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR); err != nil || v != 0 {
		t.Fatalf("TCP_REPAIR %d, %v after the thaw", v, err)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	nodelay, _ := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_NODELAY)
	keepalive, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	if fl&unix.O_NONBLOCK != 0 || nodelay != 0 || keepalive != 0 {
		t.Errorf("after the thaw: O_NONBLOCK %v, TCP_NODELAY %d, SO_KEEPALIVE %d; want the socket as its process left it", fl&unix.O_NONBLOCK != 0, nodelay, keepalive)
	}
}

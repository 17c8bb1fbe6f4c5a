//go:build linux

package repair

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// diagRequireRoot skips tests that read other users' sockets, see ULPs
// (CAP_NET_ADMIN) or take descriptors (ptrace rights).
func diagRequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: sock_diag reports ULPs only to CAP_NET_ADMIN, pidfd_getfd needs ptrace rights")
	}
}

// diagPair returns an established loopback connection between a client and
// the server end accepted from a plain-TCP (non-MPTCP) listener.
func diagPair(t testing.TB, network, addr string) (client, server *net.TCPConn) {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, addr, err)
	}
	defer ln.Close()
	return diagDial(t, ln.(*net.TCPListener), net.Dialer{})
}

// diagDial connects to ln, over IPv4 loopback when ln listens on the
// unspecified address.
func diagDial(t testing.TB, ln *net.TCPListener, d net.Dialer) (client, server *net.TCPConn) {
	t.Helper()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	if addr.Addr().IsUnspecified() {
		addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), addr.Port())
	}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := ln.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return c.(*net.TCPConn), s
}

// diagFD returns the descriptor number and inode of a Go-owned socket,
// reading them through RawConn.Control so the socket stays non-blocking.
func diagFD(t testing.TB, c syscall.Conn) (fd int, inode uint64) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	var statErr error
	if err := rc.Control(func(s uintptr) {
		fd = int(s)
		statErr = unix.Fstat(fd, &st)
	}); err != nil {
		t.Fatal(err)
	}
	if statErr != nil {
		t.Fatal(statErr)
	}
	return fd, st.Ino
}

func tcpAddrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func findConn(conns []Conn, local, remote netip.AddrPort) *Conn {
	for i := range conns {
		if conns[i].Local == local && conns[i].Remote == remote {
			return &conns[i]
		}
	}
	return nil
}

// pollList lists until check accepts the result or five seconds have passed.
func pollList(t testing.TB, o ListOptions, check func([]Conn) error) []Conn {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		conns, err := List(ctx, o)
		cancel()
		if err != nil {
			t.Fatalf("List(%+v): %v", o, err)
		}
		err = check(conns)
		if err == nil {
			return conns
		}
		if time.Now().After(deadline) {
			t.Fatalf("List(%+v): still %v after 5s; got %+v", o, err, conns)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func hasOwner(c *Conn, pid, fd int) bool {
	return slices.ContainsFunc(c.Owners, func(o Owner) bool { return o.PID == pid && o.FD == fd })
}

func TestListEstablished(t *testing.T) {
	diagRequireRoot(t)
	for _, tc := range []struct{ name, network, addr string }{
		{"ipv4", "tcp4", "127.0.0.1:0"},
		{"ipv6", "tcp6", "[::1]:0"},
		// A dual-stack listener: the server end is an AF_INET6 socket
		// with ::ffff:127.0.0.1 addresses.
		{"v4-mapped", "tcp", "[::]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := diagPair(t, tc.network, tc.addr)
			const c2s, s2c = 1000, 300 // written, never read by the peer
			if _, err := client.Write(bytes.Repeat([]byte("c"), c2s)); err != nil {
				t.Fatal(err)
			}
			if _, err := server.Write(bytes.Repeat([]byte("s"), s2c)); err != nil {
				t.Fatal(err)
			}
			sLocal, sRemote := tcpAddrPort(server.LocalAddr()), tcpAddrPort(server.RemoteAddr())
			cLocal, cRemote := tcpAddrPort(client.LocalAddr()), tcpAddrPort(client.RemoteAddr())
			if sLocal.Addr().Is4() != (tc.network != "tcp6") {
				t.Fatalf("test setup: server address %v has the wrong family", sLocal)
			}
			sFD, sInode := diagFD(t, server)
			cFD, cInode := diagFD(t, client)

			conns := pollList(t, ListOptions{Owners: true}, func(conns []Conn) error {
				s, c := findConn(conns, sLocal, sRemote), findConn(conns, cLocal, cRemote)
				switch {
				case s == nil || c == nil:
					return fmt.Errorf("server %v or client %v end missing", sLocal, cLocal)
				case s.RecvQ != c2s || c.RecvQ != s2c:
					return fmt.Errorf("RecvQ server %d client %d, want %d %d", s.RecvQ, c.RecvQ, c2s, s2c)
				case s.SendQ != 0 || c.SendQ != 0:
					return fmt.Errorf("SendQ server %d client %d, want 0 (acked)", s.SendQ, c.SendQ)
				case c.Info.RTT <= 0:
					return fmt.Errorf("client RTT %v, want > 0", c.Info.RTT)
				}
				return nil
			})
			s, c := findConn(conns, sLocal, sRemote), findConn(conns, cLocal, cRemote)
			for _, x := range []struct {
				name  string
				c     *Conn
				fd    int
				inode uint64
				sent  uint64
				recvd uint64
			}{
				{"server", s, sFD, sInode, s2c, c2s},
				{"client", c, cFD, cInode, c2s, s2c},
			} {
				if x.c.State != StateEstablished {
					t.Errorf("%s: state %v, want ESTABLISHED", x.name, x.c.State)
				}
				if x.c.Local.Addr().BitLen() != x.c.Remote.Addr().BitLen() || x.c.Local.Addr().Is4In6() {
					t.Errorf("%s: addresses %v -> %v not unmapped", x.name, x.c.Local, x.c.Remote)
				}
				if x.c.Inode != x.inode {
					t.Errorf("%s: inode %d, want %d (fstat)", x.name, x.c.Inode, x.inode)
				}
				if x.c.UID != uint32(os.Geteuid()) {
					t.Errorf("%s: uid %d, want %d", x.name, x.c.UID, os.Geteuid())
				}
				if !hasOwner(x.c, os.Getpid(), x.fd) {
					t.Errorf("%s: owners %+v lack pid %d fd %d", x.name, x.c.Owners, os.Getpid(), x.fd)
				}
				if x.c.ULP != "" {
					t.Errorf("%s: ULP %q, want none", x.name, x.c.ULP)
				}
				if err := x.c.Migratable(); err != nil {
					t.Errorf("%s: Migratable: %v", x.name, err)
				}
				in := x.c.Info
				// The connecting side counts its acknowledged SYN too.
				if (in.BytesAcked != x.sent && in.BytesAcked != x.sent+1) || in.BytesReceived != x.recvd {
					t.Errorf("%s: bytes acked %d received %d, want %d(+1) %d", x.name, in.BytesAcked, in.BytesReceived, x.sent, x.recvd)
				}
				if in.SndMSS == 0 || in.RcvMSS == 0 || in.SndCwnd == 0 || in.MinRTT <= 0 {
					t.Errorf("%s: implausible tcp_info %+v", x.name, in)
				}
			}
		})
	}
}

func TestListHalfClosed(t *testing.T) {
	diagRequireRoot(t)
	client, server := diagPair(t, "tcp4", "127.0.0.1:0")
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	sLocal, cLocal := tcpAddrPort(server.LocalAddr()), tcpAddrPort(client.LocalAddr())
	conns := pollList(t, ListOptions{}, func(conns []Conn) error {
		s, c := findConn(conns, sLocal, cLocal), findConn(conns, cLocal, sLocal)
		if s == nil || c == nil || s.State != StateCloseWait || c.State != StateFinWait2 {
			return fmt.Errorf("server %+v client %+v, want CLOSE_WAIT and FIN_WAIT2", s, c)
		}
		return nil
	})
	for _, c := range []*Conn{findConn(conns, sLocal, cLocal), findConn(conns, cLocal, sLocal)} {
		if err := c.Migratable(); err != nil {
			t.Errorf("%v: Migratable: %v", c.State, err)
		}
	}
	// Excluding the half-closed states from the mask hides them.
	conns, err := List(context.Background(), ListOptions{States: []TCPState{StateEstablished}, Port: sLocal.Port()})
	if err != nil {
		t.Fatal(err)
	}
	if c := findConn(conns, sLocal, cLocal); c != nil {
		t.Errorf("ESTABLISHED-only listing returned %v", c.State)
	}
}

func TestListPortAndStates(t *testing.T) {
	diagRequireRoot(t)
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ln := l.(*net.TCPListener)
	client, server := diagDial(t, ln, net.Dialer{})
	_, other := diagPair(t, "tcp4", "127.0.0.1:0") // must not show up
	port := tcpAddrPort(ln.Addr()).Port()

	conns := pollList(t, ListOptions{Port: port}, func(conns []Conn) error {
		if findConn(conns, tcpAddrPort(server.LocalAddr()), tcpAddrPort(client.LocalAddr())) == nil {
			return errors.New("server end missing")
		}
		return nil
	})
	for _, c := range conns {
		if c.Local.Port() != port {
			t.Errorf("Port %d filter returned %v -> %v", port, c.Local, c.Remote)
		}
	}
	if findConn(conns, tcpAddrPort(other.LocalAddr()), tcpAddrPort(other.RemoteAddr())) != nil {
		t.Error("port filter let an unrelated connection through")
	}
	// The client end has the server port as its remote port only.
	conns, err = List(context.Background(), ListOptions{Port: tcpAddrPort(client.LocalAddr()).Port()})
	if err != nil {
		t.Fatal(err)
	}
	if len(conns) != 1 || conns[0].Remote.Port() != port {
		t.Errorf("client-port listing: %+v", conns)
	}

	// Listeners are not in the default mask but can be asked for.
	conns, err = List(context.Background(), ListOptions{States: []TCPState{StateListen}, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	if len(conns) != 1 || conns[0].State != StateListen || conns[0].Local != tcpAddrPort(ln.Addr()) {
		t.Fatalf("listener listing: %+v", conns)
	}
	if err := conns[0].Migratable(); !errors.Is(err, ErrListening) {
		t.Errorf("listener Migratable = %v, want ErrListening", err)
	}

	if _, err := List(context.Background(), ListOptions{States: []TCPState{12}}); err == nil {
		t.Error("List accepted state 12")
	}
	if conns, err := List(context.Background(), ListOptions{States: []TCPState{}}); err != nil || len(conns) != 0 {
		t.Errorf("empty States: %v, %v", conns, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := List(ctx, ListOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("List with cancelled context: %v", err)
	}
}

func TestListMPTCP(t *testing.T) {
	diagRequireRoot(t)
	if b, err := os.ReadFile("/proc/sys/net/mptcp/enabled"); err != nil || strings.TrimSpace(string(b)) != "1" {
		t.Skipf("MPTCP not enabled (net.mptcp.enabled: %q, %v)", b, err)
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(true)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var d net.Dialer
	d.SetMultipathTCP(true)
	client, server := diagDial(t, l.(*net.TCPListener), d)
	if ok, err := server.MultipathTCP(); !ok || err != nil {
		t.Skipf("MPTCP not negotiated (%v, %v)", ok, err)
	}
	port := tcpAddrPort(l.Addr()).Port()
	conns := pollList(t, ListOptions{Port: port}, func(conns []Conn) error {
		if c := findConn(conns, tcpAddrPort(server.LocalAddr()), tcpAddrPort(client.LocalAddr())); c == nil || c.ULP != "mptcp" {
			return fmt.Errorf("no subflow with ULP mptcp: %+v", c)
		}
		return nil
	})
	c := findConn(conns, tcpAddrPort(server.LocalAddr()), tcpAddrPort(client.LocalAddr()))
	if err := c.Migratable(); !errors.Is(err, ErrMPTCP) {
		t.Errorf("subflow Migratable = %v, want ErrMPTCP", err)
	}
	if _, err := TakeConn(os.Getpid(), fdOf(diagFD(t, server))); !errors.Is(err, ErrMPTCP) {
		t.Errorf("TakeConn(MPTCP socket) = %v, want ErrMPTCP", err)
	}
}

func fdOf(fd int, _ uint64) int { return fd }

// TestHelperDiagProcess is not a test: TestTakeConn runs the test binary
// again with this test selected, and the child holds a connected socket
// until its stdin closes.
func TestHelperDiagProcess(t *testing.T) {
	addr := os.Getenv("MTCP_DIAG_HELPER_DIAL")
	if addr == "" {
		t.Skip("helper process for TestTakeConn")
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fd, _ := diagFD(t, c.(*net.TCPConn))
	fmt.Printf("HELPER %d %s\n", fd, c.LocalAddr())
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

func TestTakeConn(t *testing.T) {
	diagRequireRoot(t)
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperDiagProcess$")
	cmd.Env = append(os.Environ(), "MTCP_DIAG_HELPER_DIAL="+l.Addr().String())
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	pid := cmd.Process.Pid

	if err := l.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	peer, err := l.Accept()
	if err != nil {
		t.Fatalf("helper did not connect: %v", err)
	}
	defer peer.Close()
	var childFD int
	var childLocal string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "HELPER %d %s", &childFD, &childLocal); err == nil {
			break
		}
	}
	if childLocal == "" {
		t.Fatalf("helper reported nothing: %v", sc.Err())
	}
	if childLocal != peer.RemoteAddr().String() {
		t.Fatalf("helper says %s, listener saw %s", childLocal, peer.RemoteAddr())
	}

	tc, err := TakeConn(pid, childFD)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if tc.LocalAddr().String() != childLocal || tc.RemoteAddr().String() != l.Addr().String() {
		t.Errorf("taken conn %v -> %v, want %s -> %v", tc.LocalAddr(), tc.RemoteAddr(), childLocal, l.Addr())
	}
	// The copy is the same socket: bytes written through it reach the peer.
	if _, err := tc.Write([]byte("through the copy")); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len("through the copy"))
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "through the copy" {
		t.Errorf("peer read %q, %v", buf, err)
	}

	// Both processes now own the socket.
	myFD, _ := diagFD(t, tc)
	local := tcpAddrPort(tc.LocalAddr())
	conns, err := List(context.Background(), ListOptions{Port: local.Port(), Owners: true})
	if err != nil {
		t.Fatal(err)
	}
	c := findConn(conns, local, tcpAddrPort(tc.RemoteAddr()))
	if c == nil || !hasOwner(c, pid, childFD) || !hasOwner(c, os.Getpid(), myFD) {
		t.Errorf("owners of the taken socket: %+v, want pid %d fd %d and pid %d fd %d", c, pid, childFD, os.Getpid(), myFD)
	} else if i := slices.IndexFunc(c.Owners, func(o Owner) bool { return o.PID == pid }); c.Owners[i].Comm == "" {
		t.Errorf("owner %+v has no comm", c.Owners[i])
	}

	// Errors name what is wrong.
	if _, err := TakeFD(pid, 9999); !errors.Is(err, unix.EBADF) || !strings.Contains(err.Error(), "no such file descriptor") {
		t.Errorf("TakeFD(bad fd) = %v, want EBADF", err)
	}
	if _, err := TakeConn(pid, 0); !errors.Is(err, ErrNotTCP) { // the helper's stdin pipe
		t.Errorf("TakeConn(pipe) = %v, want ErrNotTCP", err)
	}
	lnFD, _ := diagFD(t, l.(*net.TCPListener))
	if _, err := TakeConn(os.Getpid(), lnFD); !errors.Is(err, ErrListening) {
		t.Errorf("TakeConn(listener) = %v, want ErrListening", err)
	}
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	if _, err := TakeFD(gone.Process.Pid, 0); !errors.Is(err, unix.ESRCH) || !strings.Contains(err.Error(), "no such process") {
		t.Errorf("TakeFD(exited pid) = %v, want ESRCH", err)
	}
	if _, err := TakeFD(-1, 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("TakeFD(-1) = %v, want EINVAL", err)
	}
}

// testDiagMsg builds an inet_diag_msg with a tcp_info of infoLen bytes and
// a ULP attribute.
func testDiagMsg(family uint8, infoLen int, ulp string) []byte {
	b := make([]byte, sizeofInetDiagMsg)
	b[0], b[1], b[2], b[3] = family, byte(StateFinWait1), 1, 2
	binary.BigEndian.PutUint16(b[4:], 443)
	binary.BigEndian.PutUint16(b[6:], 50000)
	if family == unix.AF_INET {
		copy(b[8:], []byte{10, 0, 0, 1})
		copy(b[24:], []byte{10, 0, 0, 2})
	} else {
		copy(b[8:], netip.MustParseAddr("2001:db8::1").AsSlice())
		copy(b[24:], netip.MustParseAddr("::ffff:10.0.0.2").AsSlice())
	}
	tail := b[4+sizeofInetDiagSockID:]
	binary.NativeEndian.PutUint32(tail[4:], 11)   // rqueue
	binary.NativeEndian.PutUint32(tail[8:], 22)   // wqueue
	binary.NativeEndian.PutUint32(tail[12:], 33)  // uid
	binary.NativeEndian.PutUint32(tail[16:], 444) // inode

	info := make([]byte, unix.SizeofTCPInfo)
	info[offRetransmits] = 3
	binary.NativeEndian.PutUint32(info[offRTT:], 1500)
	binary.NativeEndian.PutUint32(info[offSndMSS:], 1448)
	binary.NativeEndian.PutUint64(info[offDeliveryRate:], 1e6)
	b = appendAttr(b, uint16(inetDiagInfo), info[:infoLen])
	if ulp != "" {
		b = appendAttr(b, uint16(inetDiagULPInfo)|0x8000, appendAttr(nil, inetULPInfoName, append([]byte(ulp), 0)))
	}
	return b
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	var h [4]byte
	binary.NativeEndian.PutUint16(h[0:], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(h[2:], typ)
	b = append(append(b, h[:]...), data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func TestParseDiagMsg(t *testing.T) {
	c, err := parseDiagMsg(testDiagMsg(unix.AF_INET6, unix.SizeofTCPInfo, "tls"))
	if err != nil {
		t.Fatal(err)
	}
	want := Conn{
		Local:  netip.MustParseAddrPort("[2001:db8::1]:443"),
		Remote: netip.MustParseAddrPort("10.0.0.2:50000"),
		State:  StateFinWait1, Inode: 444, UID: 33, RecvQ: 11, SendQ: 22,
		Info: TCPInfo{RTT: 1500 * time.Microsecond, Retransmits: 3, SndMSS: 1448, DeliveryRate: 1e6},
		ULP:  "tls",
	}
	if fmt.Sprint(c) != fmt.Sprint(want) {
		t.Errorf("parsed\n%+v\nwant\n%+v", c, want)
	}
	if err := c.Migratable(); !errors.Is(err, ErrULP) {
		t.Errorf("Migratable = %v, want ErrULP", err)
	}

	// An older kernel's shorter tcp_info keeps the fields it has.
	c, err = parseDiagMsg(testDiagMsg(unix.AF_INET, int(offDeliveryRate), ""))
	if err != nil {
		t.Fatal(err)
	}
	if c.Local != netip.MustParseAddrPort("10.0.0.1:443") || c.Info.RTT != 1500*time.Microsecond || c.Info.DeliveryRate != 0 {
		t.Errorf("short tcp_info: %+v", c)
	}

	if _, err := parseDiagMsg(testDiagMsg(unix.AF_UNIX, 0, "")); err == nil {
		t.Error("accepted AF_UNIX")
	}
}

// TestParseDiagMsgTruncated feeds every prefix of a reply, and replies
// whose attribute lengths lie, to the parser: it must return an error or a
// value, never panic or read out of bounds.
func TestParseDiagMsgTruncated(t *testing.T) {
	full := testDiagMsg(unix.AF_INET6, unix.SizeofTCPInfo, "mptcp")
	for n := range len(full) {
		_, err := parseDiagMsg(full[:n])
		if n < sizeofInetDiagMsg && err == nil {
			t.Errorf("%d-byte message accepted", n)
		}
	}
	for _, n := range []int{0, 1, 5, 17, int(offRTT) + 2, unix.SizeofTCPInfo - 1} {
		if _, err := parseDiagMsg(testDiagMsg(unix.AF_INET, n, "tls")); err != nil {
			t.Errorf("tcp_info of %d bytes: %v", n, err)
		}
	}
	bad := slices.Clone(full)
	binary.NativeEndian.PutUint16(bad[sizeofInetDiagMsg:], 0xffff) // nla_len past the end
	if _, err := parseDiagMsg(bad); err == nil {
		t.Error("attribute longer than the message accepted")
	}
	bad = slices.Clone(full)
	binary.NativeEndian.PutUint16(bad[sizeofInetDiagMsg:], 2) // nla_len shorter than its header
	if _, err := parseDiagMsg(bad); err == nil {
		t.Error("attribute shorter than its header accepted")
	}
}

func FuzzParseDiagMsg(f *testing.F) {
	f.Add(testDiagMsg(unix.AF_INET, unix.SizeofTCPInfo, ""))
	f.Add(testDiagMsg(unix.AF_INET6, 40, "mptcp"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parseDiagMsg(b)
		if err == nil && !c.Local.IsValid() {
			t.Errorf("accepted message without a local address: %+v", c)
		}
	})
}

func TestMarshalDiagRequest(t *testing.T) {
	b := marshalDiagRequest(unix.AF_INET6, 1<<StateEstablished, 0)
	want := make([]byte, sizeofInetDiagReqV2)
	want[0], want[1], want[2] = unix.AF_INET6, unix.IPPROTO_TCP, 1<<(inetDiagInfo-1)
	binary.NativeEndian.PutUint32(want[4:], 2)
	if !bytes.Equal(b, want) {
		t.Errorf("request %x, want %x", b, want)
	}
	b = marshalDiagRequest(unix.AF_INET, 2, 8080)
	bc := b[sizeofInetDiagReqV2:]
	if len(bc) != 12 || binary.NativeEndian.Uint16(bc) != 12 || binary.NativeEndian.Uint16(bc[2:]) != inetDiagReqBytecode ||
		bc[4] != byte(inetDiagBCSrcEq) || bc[5] != 8 || binary.NativeEndian.Uint16(bc[6:]) != 12 || binary.NativeEndian.Uint16(bc[10:]) != 8080 {
		t.Errorf("bytecode attribute %x", bc)
	}
}

func TestTCPStateString(t *testing.T) {
	for s, want := range map[TCPState]string{
		StateEstablished: "ESTABLISHED", StateFinWait1: "FIN_WAIT1", StateCloseWait: "CLOSE_WAIT",
		StateListen: "LISTEN", StateClosing: "CLOSING", 0: "TCPState(0)", 12: "TCPState(12)",
	} {
		if got := s.String(); got != want {
			t.Errorf("TCPState(%d).String() = %q, want %q", s, got, want)
		}
	}
}

func TestMigratable(t *testing.T) {
	for _, tc := range []struct {
		c    Conn
		want error
	}{
		{Conn{State: StateEstablished}, nil},
		{Conn{State: StateLastAck}, nil},
		{Conn{State: StateEstablished, ULP: "mptcp"}, ErrMPTCP},
		{Conn{State: StateEstablished, ULP: "tls"}, ErrULP},
		{Conn{State: StateListen}, ErrListening},
		{Conn{State: StateSynSent}, ErrState},
		{Conn{State: StateTimeWait}, ErrState},
	} {
		if err := tc.c.Migratable(); !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
			t.Errorf("%v ulp %q: Migratable = %v, want %v", tc.c.State, tc.c.ULP, err, tc.want)
		}
	}
}

// TestFillOwners runs the /proc scan on a fake tree: several owners of one
// socket, processes without readable fds (exited mid-scan), and links
// that are not sockets.
func TestFillOwners(t *testing.T) {
	root := t.TempDir()
	mk := func(pid, comm string, links map[string]string) {
		dir := filepath.Join(root, pid, "fd")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if comm != "" {
			os.WriteFile(filepath.Join(root, pid, "comm"), []byte(comm+"\n"), 0o644)
		}
		for fd, target := range links {
			if err := os.Symlink(target, filepath.Join(dir, fd)); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk("10", "redis", map[string]string{"3": "socket:[100]", "4": "socket:[100]", "5": "/dev/null", "6": "socket:[999]"})
	mk("20", "worker", map[string]string{"7": "socket:[100]", "8": "socket:[200]", "9": "socket:[bad"})
	os.MkdirAll(filepath.Join(root, "30"), 0o755) // exited: no fd directory
	os.MkdirAll(filepath.Join(root, "self"), 0o755)

	conns := []Conn{{Inode: 100}, {Inode: 200}, {Inode: 300}, {Inode: 0}}
	if err := fillOwners(context.Background(), root, conns, nil); err != nil {
		t.Fatal(err)
	}
	want := [][]Owner{
		{{10, 3, "redis"}, {10, 4, "redis"}, {20, 7, "worker"}},
		{{20, 8, "worker"}},
		nil, nil,
	}
	for i := range conns {
		if !slices.Equal(conns[i].Owners, want[i]) {
			t.Errorf("inode %d: owners %+v, want %+v", conns[i].Inode, conns[i].Owners, want[i])
		}
	}

	// Among pid 20 and one that is gone: pid 10's descriptors are not read.
	conns = []Conn{{Inode: 100}, {Inode: 200}, {Inode: 300}}
	if err := fillOwners(context.Background(), root, conns, []int{20, 30, 20}); err != nil {
		t.Fatal(err)
	}
	want = [][]Owner{{{20, 7, "worker"}}, {{20, 8, "worker"}}, nil}
	for i := range conns {
		if !slices.Equal(conns[i].Owners, want[i]) {
			t.Errorf("among 20 and 30: inode %d: owners %+v, want %+v", conns[i].Inode, conns[i].Owners, want[i])
		}
	}
}

// BenchmarkList1000 lists a namespace holding 1000 established loopback
// connections (2000 sockets, both ends in this process).
func BenchmarkList1000(b *testing.B) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	for range 1000 {
		diagDial(b, l.(*net.TCPListener), net.Dialer{})
	}
	port := tcpAddrPort(l.Addr()).Port()
	for _, bc := range []struct {
		name string
		o    ListOptions
		min  int
	}{
		{"all", ListOptions{}, 2000},
		{"port", ListOptions{Port: port}, 1000},
		{"owners", ListOptions{Owners: true}, 2000},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				conns, err := List(context.Background(), bc.o)
				if err != nil {
					b.Fatal(err)
				}
				if len(conns) < bc.min {
					b.Fatalf("listed %d connections, want at least %d", len(conns), bc.min)
				}
			}
		})
	}
}

// TestParseTCPInfo: the figures come from their offsets in struct
// tcp_info, and a shorter struct (an older kernel's) leaves the fields
// beyond its end zero.
func TestParseTCPInfo(t *testing.T) {
	in := unix.TCPInfo{Retransmits: 2, Total_retrans: 7, Unacked: 3, Snd_cwnd: 10, Bytes_received: 1 << 40, Total_rto: 5}
	b := unsafe.Slice((*byte)(unsafe.Pointer(&in)), unsafe.Sizeof(in))
	got := parseTCPInfo(b)
	want := TCPInfo{Retransmits: 2, TotalRetrans: 7, Unacked: 3, SndCwnd: 10, BytesReceived: 1 << 40, TotalRTO: 5}
	if got != want {
		t.Errorf("parseTCPInfo = %+v, want %+v", got, want)
	}
	// Linux 6.6's tcp_info ends before tcpi_total_rto.
	old := parseTCPInfo(b[:offTotalRTO])
	want.TotalRTO = 0
	if old != want {
		t.Errorf("parseTCPInfo of a struct without tcpi_total_rto = %+v, want %+v", old, want)
	}
}

//go:build linux

package repair

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"os/exec"
	"strings"

	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/nat/netns"
	"golang.org/x/sys/unix"
)

func skipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: TCP_REPAIR requires CAP_NET_ADMIN")
	}
}

// privateNetns makes a network namespace with only loopback in it, so the
// tests can install nftables rules without touching the machine's own. The
// name follows the testbed's pattern (mtt<pid>x<hex>-<host>) so that
// testbed.Sweep removes it if this process dies before its cleanup runs.
func privateNetns(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("mtt%dx%04x-repair", os.Getpid(), rand.Uint32()&0xffff)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del: %v: %s", err, out)
		}
	})
	nsExec(t, name, "", "ip", "link", "set", "lo", "up")
	return name
}

func nsExec(t testing.TB, ns, stdin string, args ...string) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

// hold drops the client's segments to the server's port while a test
// migrates the server end, as mtcp's flow hold does, so that nothing
// reaches the port between discard and restore (the kernel would answer
// with a RST). It returns the function that lifts the hold.
func hold(t testing.TB, ns string, port int) (release func()) {
	t.Helper()
	table := fmt.Sprintf("hold%d", port)
	nsExec(t, ns, fmt.Sprintf("table inet %s {\n chain out {\n  type filter hook output priority -300\n  meta mark and %#x == 0 tcp dport %d drop\n }\n}\n", table, DefaultMarks.Inject, port), "nft", "-f", "-")
	return func() { nsExec(t, ns, "", "nft", "delete", "table", "inet", table) }
}

// pairOpts shapes a loopback connection.
type pairOpts struct {
	ns           string // network namespace name; "" = the test's own
	network      string // "tcp4" or "tcp6"
	serverBuf    int    // SO_RCVBUFFORCE/SO_SNDBUFFORCE on the server, 0 = default
	clientRcvBuf int    // SO_RCVBUF on the client before connect, 0 = default
}

func setBuf(c syscall.RawConn, opt, v int) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, v) })
	return errors.Join(err, serr)
}

// pair returns the client and server ends of a fresh loopback connection.
func pair(t testing.TB, o pairOpts) (client, server *net.TCPConn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if o.network == "tcp6" {
		addr = "[::1]:0"
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	if o.serverBuf > 0 {
		// Set on the listener so the window scale of the handshake fits.
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			return errors.Join(setBuf(c, unix.SO_RCVBUFFORCE, o.serverBuf), setBuf(c, unix.SO_SNDBUFFORCE, o.serverBuf))
		}
	}
	d := net.Dialer{}
	if o.clientRcvBuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error { return setBuf(c, unix.SO_RCVBUF, o.clientRcvBuf) }
	}
	var ln net.Listener
	var c net.Conn
	err := inNetns(o.ns, func() (err error) {
		if ln, err = lc.Listen(context.Background(), o.network, addr); err != nil {
			return err
		}
		c, err = d.Dial(o.network, ln.Addr().String())
		return err
	})
	if ln != nil {
		defer ln.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func inNetns(ns string, fn func() error) error {
	if ns == "" {
		return fn()
	}
	return netns.Do(netns.Path(ns), fn)
}

// sockInfo reads a socket's state and receive queue length.
func sockInfo(t testing.TB, c syscall.Conn) (TCPState, int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var h tcpInfoHead
	var inq int
	err = control(rc, func(fd int) (err error) {
		if h, err = infoHead(fd); err != nil {
			return err
		}
		inq, err = unix.IoctlGetInt(fd, unix.SIOCINQ)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return TCPState(h.state), inq
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// migrateInPlace captures the server end, checks the encoding round trip,
// discards the socket and restores it at the same addresses.
func migrateInPlace(t testing.TB, ns string, server *net.TCPConn) (*State, *net.TCPConn) {
	t.Helper()
	release := func() {}
	if ns != "" {
		release = hold(t, ns, server.LocalAddr().(*net.TCPAddr).Port)
	}
	f, err := Freeze(server)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Capture()
	if err != nil {
		t.Fatal(err)
	}
	blob, err := st.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Discard(); err != nil {
		t.Fatal(err)
	}
	st2, err := Decode(blob)
	if err != nil {
		t.Fatal(err)
	}
	var r *Restored
	if err := inNetns(ns, func() (err error) { r, err = Restore(st2, RestoreOptions{}); return err }); err != nil {
		t.Fatal(err)
	}
	release()
	return st, commitConn(t, ns, r)
}

// commitConn commits r in namespace ns and hands it over as a connection,
// closed when the test ends.
func commitConn(t testing.TB, ns string, r *Restored) *net.TCPConn {
	t.Helper()
	var c *net.TCPConn
	err := inNetns(ns, func() (err error) {
		if err := r.Commit(); err != nil {
			return err
		}
		c, err = r.Conn()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// streamCase is one loopback migration: what each side does before the
// server end is frozen, and what they exchange after it is restored.
type streamCase struct {
	name       string
	pair       pairOpts
	clientPre  int // client writes, server leaves unread (receive queue)
	serverRead int // of those, the server reads this many before the freeze
	serverPre  int // server writes before the freeze (send queue)
	clientFIN  bool
	serverFIN  bool
	want       TCPState
	minRecvQ   int // the captured queues must hold at least this much
	minSendQ   int
	minUnsent  int
	post       int // bytes each side still sends after the restore
	// serverLowat, if set, is the server's TCP_NOTSENT_LOWAT, set after
	// its writes: less than what it has unsent.
	serverLowat int
}

func TestMigrateLoopback(t *testing.T) {
	skipUnlessRoot(t)
	ns := privateNetns(t)
	const mib = 1 << 20
	var cases []streamCase
	for _, network := range []string{"tcp4", "tcp6"} {
		p := pairOpts{ns: ns, network: network}
		cases = append(cases,
			streamCase{name: "idle", pair: p, want: StateEstablished, post: 1000},
			streamCase{name: "recv-queue", pair: p, clientPre: 3000, serverRead: 1000, want: StateEstablished, minRecvQ: 2000, post: 5000},
			streamCase{name: "send-unsent", pair: pairOpts{ns: ns, network: network, serverBuf: 4 * mib, clientRcvBuf: 4096},
				serverPre: 1 * mib, want: StateEstablished, minSendQ: 512 << 10, minUnsent: 512 << 10, post: 5000},
			// The unsent tail, written at Commit, is more than the
			// low-water mark allows unsent, and the client's window is
			// closed: a commit that set the mark first waited for it.
			streamCase{name: "send-unsent-lowat", pair: pairOpts{ns: ns, network: network, serverBuf: 4 * mib, clientRcvBuf: 4096},
				serverPre: 1 * mib, serverLowat: 16 << 10, want: StateEstablished, minSendQ: 512 << 10, minUnsent: 512 << 10, post: 5000},
			streamCase{name: "large-4MiB-each-way", pair: pairOpts{ns: ns, network: network, serverBuf: 24 * mib, clientRcvBuf: 4096},
				clientPre: 5 * mib, serverRead: 1, serverPre: 6 * mib, want: StateEstablished,
				minRecvQ: 4 * mib, minSendQ: 4 * mib, post: 1 * mib},
			streamCase{name: "close-wait", pair: p, clientPre: 777, clientFIN: true, want: StateCloseWait, minRecvQ: 777, post: 3000},
			streamCase{name: "close-wait-empty", pair: p, clientFIN: true, want: StateCloseWait, post: 10},
			streamCase{name: "fin-wait2", pair: p, clientPre: 100, serverPre: 200, serverFIN: true, want: StateFinWait2, post: 3000},
		)
	}
	for _, tc := range cases {
		t.Run(tc.pair.network+"/"+tc.name, func(t *testing.T) { runStreamCase(t, tc) })
	}
}

func runStreamCase(t *testing.T, tc streamCase) {
	client, server := pair(t, tc.pair)
	deadline := time.Now().Add(30 * time.Second)
	client.SetDeadline(deadline)
	server.SetDeadline(deadline)
	up, down := stream.Pattern(time.Now().UnixNano()), stream.Pattern(time.Now().UnixNano()+1)

	if _, err := io.Copy(client, up.Reader(0, int64(tc.clientPre))); err != nil {
		t.Fatal(err)
	}
	upv := &stream.Verifier{Pattern: up}
	if _, err := io.CopyN(upv, server, int64(tc.serverRead)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(server, down.Reader(0, int64(tc.serverPre))); err != nil {
		t.Fatal(err)
	}
	if tc.serverLowat > 0 {
		rc, err := server.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT, tc.serverLowat)
		}); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
	}
	if tc.clientFIN {
		client.CloseWrite()
	}
	if tc.serverFIN {
		server.CloseWrite()
	}
	waitFor(t, "the server socket to settle in "+tc.want.String(), func() bool {
		st, inq := sockInfo(t, server)
		return st == tc.want && inq == tc.clientPre-tc.serverRead
	})

	mss := sndMSS(t, server)
	st, server := migrateInPlace(t, tc.pair.ns, server)
	// The same size as the original's, less a TCP option's bytes at most
	// (a segment size of 536 minus options, the kernel's default, before).
	if got := sndMSS(t, server); got > mss || got < mss-40 {
		t.Errorf("restored socket sends segments of %d bytes, the original %d", got, mss)
	}
	if st.TCPState != tc.want || len(st.RecvQueue) < tc.minRecvQ || len(st.SendQueue) < tc.minSendQ || int(st.Unsent) < tc.minUnsent {
		t.Fatalf("captured %v; want state %v, ≥%d received, ≥%d to send, ≥%d unsent", st, tc.want, tc.minRecvQ, tc.minSendQ, tc.minUnsent)
	}
	if got, _ := sockInfo(t, server); got != tc.want && !(tc.want == StateFinWait2 && got == StateFinWait1) {
		t.Errorf("restored socket is %v, want %v", got, tc.want)
	}
	server.SetDeadline(deadline)
	err := stream.Finish(client, server, stream.Half{Pattern: up, Sent: int64(tc.clientPre), FIN: tc.clientFIN},
		stream.Half{Pattern: down, Sent: int64(tc.serverPre), FIN: tc.serverFIN}, int64(tc.post), upv)
	if err != nil {
		t.Fatal(err)
	}
}

// freezeThaw freezes c, captures it and thaws it.
func freezeThaw(t *testing.T, c *net.TCPConn) *Frozen {
	t.Helper()
	f, err := Freeze(c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Capture(); err != nil {
		t.Fatal(err)
	}
	if err := f.Thaw(); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestThawContinues(t *testing.T) {
	skipUnlessRoot(t)
	client, server := pair(t, pairOpts{network: "tcp4"})
	up, down := stream.Pattern(1), stream.Pattern(2)
	io.Copy(client, up.Reader(0, 100))
	f := freezeThaw(t, server)
	if err := f.Thaw(); !errors.Is(err, ErrDone) {
		t.Fatalf("second Thaw = %v, want ErrDone", err)
	}
	client.SetDeadline(time.Now().Add(10 * time.Second))
	server.SetDeadline(time.Now().Add(10 * time.Second))
	if err := stream.Finish(client, server, stream.Half{Pattern: up, Sent: 100}, stream.Half{Pattern: down}, 10000, &stream.Verifier{Pattern: up}); err != nil {
		t.Fatal(err)
	}
}

// TestCaptureSelectsNoQueue: Capture leaves no repair queue selected.
// With the send queue selected, the kernel counts unsent data as sent
// without sending it when an acknowledgement arrives (tcp_write_xmit in
// repair mode), which a Thaw or a second Capture would then miss.
func TestCaptureSelectsNoQueue(t *testing.T) {
	skipUnlessRoot(t)
	_, server := pair(t, pairOpts{network: "tcp4"})
	if _, err := server.Write(make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	f, err := Freeze(server)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Thaw()
	if _, err := f.Capture(); err != nil {
		t.Fatal(err)
	}
	rc, err := server.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var q int
	var qerr error
	rc.Control(func(fd uintptr) { q, qerr = unix.GetsockoptInt(int(fd), unix.SOL_TCP, unix.TCP_REPAIR_QUEUE) })
	if qerr != nil || q != int(queueNone) {
		t.Fatalf("TCP_REPAIR_QUEUE %d, %v after Capture; want %d (none)", q, qerr, queueNone)
	}
}

// TestSinceData: Capture tells how long ago the socket last received
// data, which a migration uses to tell a client that is sending from one
// that is not; and that a restored socket has received none of its own
// until its peer sends again.
func TestSinceData(t *testing.T) {
	skipUnlessRoot(t)
	for _, f := range []struct {
		name string
		a, b uintptr
	}{
		{"lastDataRecv", unsafe.Offsetof(tcpInfoHead{}.lastDataRecv), unsafe.Offsetof(unix.TCPInfo{}.Last_data_recv)},
		{"dataSegsIn", unsafe.Offsetof(tcpInfoHead{}.dataSegsIn), unsafe.Offsetof(unix.TCPInfo{}.Data_segs_in)},
		{"bytesReceived", unsafe.Offsetof(tcpInfoHead{}.bytesReceived), unsafe.Offsetof(unix.TCPInfo{}.Bytes_received)},
	} {
		if f.a != f.b {
			t.Fatalf("tcpInfoHead.%s at offset %d, struct tcp_info has it at %d", f.name, f.a, f.b)
		}
	}
	client, server := pair(t, pairOpts{network: "tcp4"})
	capture := func(c *net.TCPConn) (time.Duration, bool) {
		t.Helper()
		return freezeThaw(t, c).SinceData()
	}
	send := func(server *net.TCPConn) {
		t.Helper()
		if _, err := client.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the byte to arrive", func() bool { _, inq := sockInfo(t, server); return inq > 0 })
		if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
	}
	send(server)
	if d, ok := capture(server); !ok || d >= 500*time.Millisecond {
		t.Fatalf("SinceData = %v, %v just after data came in", d, ok)
	}
	time.Sleep(600 * time.Millisecond)
	if d, ok := capture(server); !ok || d < 500*time.Millisecond {
		t.Fatalf("SinceData = %v, %v, but no data came in for 600ms", d, ok)
	}
	_, restored := migrateInPlace(t, "", server)
	if d, ok := capture(restored); ok {
		t.Fatalf("SinceData = %v, %v on a restored socket that has received nothing", d, ok)
	}
	send(restored)
	if d, ok := capture(restored); !ok || d >= 500*time.Millisecond {
		t.Fatalf("SinceData = %v, %v on a restored socket just after data came in", d, ok)
	}
}

// TestRestoredAnswersInRepairMode pins down the kernel behaviour that
// RestoreOptions.Quiet is for: a restored socket still in repair mode
// (before Commit) acknowledges a segment that reaches it, from whatever
// address it has, before the target's reply rewrite may be in
// (daemon.Transfer).
func TestRestoredAnswersInRepairMode(t *testing.T) {
	skipUnlessRoot(t)
	client, server := pair(t, pairOpts{network: "tcp4"})
	st := takeOver(t, server)
	r, err := Restore(st, RestoreOptions{Local: st.Local})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Abort()
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		info := tcpInfo(t, client)
		if info.Unacked == 0 {
			return // acknowledged by the restored socket
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client's segment is still unacknowledged (%d), so a socket in repair mode does not answer: RestoreOptions.Quiet is not needed", info.Unacked)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// takeOver freezes and captures c, then discards it (silently).
func takeOver(t *testing.T, c *net.TCPConn) *State {
	t.Helper()
	f, err := Freeze(c)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Capture()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Discard(); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestQuietRestoreMark: a socket restored Quiet carries the quiet bit
// over its captured mark until Commit and its captured mark alone after,
// and works. The quiet bit is not the default one: it is an option.
func TestQuietRestoreMark(t *testing.T) {
	skipUnlessRoot(t)
	client, server := pair(t, pairOpts{network: "tcp4"})
	const appMark = 42
	rc, err := server.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := setBuf(rc, unix.SO_MARK, appMark); err != nil {
		t.Fatal(err)
	}
	st := takeOver(t, server)
	r, err := Restore(st, RestoreOptions{Local: st.Local, Quiet: true, Marks: Marks{Quiet: 1 << 7}})
	if err != nil {
		t.Fatal(err)
	}
	mark := func() int {
		t.Helper()
		v, err := unix.GetsockoptInt(r.fd, unix.SOL_SOCKET, unix.SO_MARK)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	if m := mark(); m != appMark|1<<7 {
		t.Fatalf("mark before Commit %#x, want %#x (the captured mark and the quiet bit)", m, appMark|1<<7)
	}
	if err := r.Commit(); err != nil {
		t.Fatal(err)
	}
	if m := mark(); m != appMark {
		t.Fatalf("mark after Commit %d, want the captured %d", m, appMark)
	}
	conn, err := r.Conn()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(conn, b); err != nil || string(b) != "ping" {
		t.Fatalf("restored end read %q, %v", b, err)
	}
}

// TestFrozenQuiet: a quiet frozen socket's acknowledgement of a segment
// that reaches it is dropped (the peer still counts the segment as
// unacknowledged), and the capture says so (AckPending) and reports the
// application's mark. Thawed, the socket has its mark back and carries on;
// restored, it acknowledges the segment on Commit, before the peer has to
// send it again.
func TestFrozenQuiet(t *testing.T) {
	skipUnlessRoot(t)
	ns := privateNetns(t)
	nsExec(t, ns, fmt.Sprintf("table inet quiet {\n counter dropped {}\n chain out {\n  type filter hook output priority -300\n  meta mark and %#x != 0 counter name dropped drop\n }\n}\n", DefaultMarks.Quiet), "nft", "-f", "-")
	dropped := func() int {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "counter", "inet", "quiet", "dropped").CombinedOutput()
		if err != nil {
			t.Fatalf("nft: %v: %s", err, out)
		}
		var n int
		if i := strings.Index(string(out), "packets "); i >= 0 {
			fmt.Sscan(string(out[i+len("packets "):]), &n)
		}
		return n
	}
	const appMark = 0x80000001 // the top bit set: an int32 reads it negative
	// delayed: the segment arrives before the freeze, its acknowledgement
	// held back (TCP_QUICKACK off) until after the mark is on.
	for _, tc := range []struct{ thaw, delayed bool }{{true, false}, {false, false}, {false, true}} {
		thaw := tc.thaw
		client, server := pair(t, pairOpts{ns: ns, network: "tcp4"})
		rc, err := server.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		if err := setBuf(rc, unix.SO_MARK, appMark); err != nil {
			t.Fatal(err)
		}
		info := func() *unix.TCPInfo { t.Helper(); return tcpInfo(t, client) }
		if tc.delayed {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_TCP, unix.TCP_QUICKACK, 0) }); err != nil || serr != nil {
				t.Fatal(err, serr)
			}
			if _, err := client.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the byte to arrive", func() bool { _, inq := sockInfo(t, server); return inq > 0 })
		}
		f, err := Freeze(server)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Quiet(Marks{}); err != nil {
			t.Fatal(err)
		}
		st, err := f.Capture()
		if err != nil {
			t.Fatal(err)
		}
		if !tc.delayed {
			if st.AckPending {
				t.Fatal("AckPending on a capture before anything came in")
			}
			before := dropped()
			if _, err := client.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the frozen socket's acknowledgement to be dropped", func() bool { return dropped() > before })
			if st, err = f.Capture(); err != nil {
				t.Fatal(err)
			}
		} else if info().Unacked == 0 {
			t.Logf("%+v: the delayed acknowledgement went out before the mark: nothing to test", tc)
			continue
		}
		if n := info().Unacked; n == 0 {
			t.Fatal("the client's segment was acknowledged while the socket was quiet")
		}
		if st.Sockopts.Mark != appMark || !st.AckPending || string(st.RecvQueue) != "x" {
			t.Fatalf("%+v: captured mark %#x, AckPending %v, receive queue %q; want %#x, true, \"x\"", tc, st.Sockopts.Mark, st.AckPending, st.RecvQueue, uint32(appMark))
		}
		var conn *net.TCPConn
		if thaw {
			if err := f.Thaw(); err != nil {
				t.Fatal(err)
			}
			var m int
			if err := control(rc, func(fd int) (err error) { m, err = getInt(fd, unix.SOL_SOCKET, unix.SO_MARK); return err }); err != nil || uint32(m) != appMark {
				t.Fatalf("mark after Thaw %#x, %v; want %#x", uint32(m), err, uint32(appMark))
			}
			conn = server
		} else {
			if err := f.Discard(); err != nil {
				t.Fatal(err)
			}
			var r *Restored
			if err := inNetns(ns, func() (err error) { r, err = Restore(st, RestoreOptions{}); return err }); err != nil {
				t.Fatal(err)
			}
			conn = commitConn(t, ns, r)
			// The commit acknowledged at once: the restored socket has
			// sent something (not waited for the client to send again).
			if out := tcpInfo(t, conn).Segs_out; out == 0 {
				t.Fatalf("%+v: the restored socket sent nothing on commit", tc)
			}
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 1)
		if _, err := io.ReadFull(conn, b); err != nil || string(b) != "x" {
			t.Fatalf("thaw %v: read %q, %v", thaw, b, err)
		}
		// Thawed, the socket answers the client's retransmission; restored,
		// it acknowledges on Commit, so the client resends nothing.
		waitFor(t, "the client's segment to be acknowledged", func() bool { return info().Unacked == 0 })
		// (The delayed case waited for no dropped acknowledgement: the
		// client's loss probe may have gone out meanwhile.)
		if r := info().Total_retrans; !thaw && !tc.delayed && r != 0 {
			t.Fatalf("the client retransmitted %d segments: the commit did not acknowledge", r)
		}
	}
}

func TestSockoptsSurvive(t *testing.T) {
	skipUnlessRoot(t)
	for _, network := range []string{"tcp4", "tcp6"} {
		t.Run(network, func(t *testing.T) {
			ns := privateNetns(t)
			_, server := pair(t, pairOpts{ns: ns, network: network})
			rc, _ := server.SyscallConn()
			tos := unix.IP_TOS
			level := unix.SOL_IP
			if network == "tcp6" {
				level, tos = unix.SOL_IPV6, unix.IPV6_TCLASS
			}
			err := control(rc, func(fd int) error {
				for _, o := range [][3]int{
					{unix.SOL_TCP, unix.TCP_NODELAY, 0},
					{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
					{unix.SOL_TCP, unix.TCP_KEEPIDLE, 33},
					{unix.SOL_TCP, unix.TCP_KEEPINTVL, 7},
					{unix.SOL_TCP, unix.TCP_KEEPCNT, 4},
					{unix.SOL_TCP, unix.TCP_USER_TIMEOUT, 12345},
					{unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT, 16384},
					{level, tos, 0x28},
					{unix.SOL_SOCKET, unix.SO_MARK, 0x77},
					{unix.SOL_SOCKET, unix.SO_PRIORITY, 5},
					{unix.SOL_TCP, unix.TCP_CORK, 1},
				} {
					if err := unix.SetsockoptInt(fd, o[0], o[1], o[2]); err != nil {
						return err
					}
				}
				return unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION, "reno")
			})
			if err != nil {
				t.Fatal(err)
			}
			st, restored := migrateInPlace(t, ns, server)
			want := Sockopts{KeepAlive: true, KeepIdle: 33, KeepIntvl: 7, KeepCnt: 4, UserTimeout: 12345,
				NotSentLowat: 16384, TOS: 0x28, Mark: 0x77, Priority: 5, Cork: true, Congestion: "reno"}
			got := st.Sockopts
			got.RcvBuf, got.SndBuf = 0, 0
			if got != want {
				t.Fatalf("captured %+v\nwant     %+v", got, want)
			}
			f, err := Freeze(restored)
			if err != nil {
				t.Fatal(err)
			}
			st2, err := f.Capture()
			if err != nil {
				t.Fatal(err)
			}
			f.Thaw()
			got2 := st2.Sockopts
			got2.RcvBuf, got2.SndBuf = 0, 0
			if got2 != want {
				t.Fatalf("restored %+v\nwant     %+v", got2, want)
			}
		})
	}
}

func TestRefusesUnmigratable(t *testing.T) {
	skipUnlessRoot(t)
	t.Run("listening", func(t *testing.T) {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if _, err := Freeze(ln.(*net.TCPListener)); !errors.Is(err, ErrListening) {
			t.Fatalf("Freeze(listener) = %v, want ErrListening", err)
		}
	})
	t.Run("udp", func(t *testing.T) {
		c, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := Freeze(c.(*net.UDPConn)); !errors.Is(err, ErrNotTCP) {
			t.Fatalf("Freeze(udp) = %v, want ErrNotTCP", err)
		}
	})
	t.Run("mptcp", func(t *testing.T) {
		if b, err := os.ReadFile("/proc/sys/net/mptcp/enabled"); err != nil || b[0] != '1' {
			t.Skip("MPTCP is not enabled in this kernel (net.mptcp.enabled)")
		}
		// A Go ≥ 1.24 listener is MPTCP by default; the dialer must opt in.
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		d := net.Dialer{}
		d.SetMultipathTCP(true)
		c, err := d.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		for _, conn := range []net.Conn{c, s} {
			_, err := Freeze(conn.(*net.TCPConn))
			if !errors.Is(err, ErrMPTCP) {
				t.Fatalf("Freeze(MPTCP) = %v, want ErrMPTCP", err)
			}
		}
	})
	t.Run("ktls", func(t *testing.T) {
		_, server := pair(t, pairOpts{network: "tcp4"})
		rc, _ := server.SyscallConn()
		if err := control(rc, func(fd int) error { return unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "tls") }); err != nil {
			t.Skipf("kernel TLS is not available here (TCP_ULP tls: %v)", err)
		}
		if _, err := Freeze(server); !errors.Is(err, ErrULP) {
			t.Fatalf("Freeze(kTLS) = %v, want ErrULP", err)
		}
	})
}

func TestRestoreBadInput(t *testing.T) {
	skipUnlessRoot(t)
	st := sampleState()
	st.Local = netip4("127.0.0.1:1")
	st.Remote = netip4("127.0.0.1:2")
	bad := *st
	bad.Unsent = 1 << 20
	if _, err := Restore(&bad, RestoreOptions{}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("Restore(invalid) = %v, want ErrMalformed", err)
	}
	if _, err := Restore(st, RestoreOptions{Local: netip4("[::1]:5")}); err == nil {
		t.Fatal("Restore accepted a family mismatch")
	}
	for _, o := range []RestoreOptions{{Local: netip4("[::ffff:127.0.0.1]:5")}, {Remote: netip4("127.0.0.1:0")}} {
		if _, err := Restore(st, o); err == nil || !strings.Contains(err.Error(), "want a plain IPv4 or IPv6 address and a port") {
			t.Fatalf("Restore(%+v) = %v, want it refused", o, err)
		}
	}
	// An address that is not local cannot be bound: a clear error, and no
	// socket left behind.
	st.Local = netip4("192.0.2.1:80")
	if _, err := Restore(st, RestoreOptions{}); err == nil {
		t.Fatal("Restore bound a non-local address")
	}
	// A congestion control this host has not loaded is refused, not
	// loaded (as root, setting it would load the module tcp_NAME).
	st.Local = netip4("127.0.0.1:1")
	st.Sockopts.Congestion = "mtcpnosuch"
	if _, err := Restore(st, RestoreOptions{}); err == nil || !strings.Contains(err.Error(), "not available on this host") {
		t.Fatalf("Restore with congestion control %q: %v, want not available", st.Sockopts.Congestion, err)
	}
}

func netip4(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// sndMSS is the segment size c sends (tcpi_snd_mss).
func sndMSS(t testing.TB, c *net.TCPConn) uint32 { return tcpInfo(t, c).Snd_mss }

// tcpInfo reads c's TCP_INFO.
func tcpInfo(t testing.TB, c *net.TCPConn) *unix.TCPInfo {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var gerr error
	if err := rc.Control(func(fd uintptr) { info, gerr = unix.GetsockoptTCPInfo(int(fd), unix.SOL_TCP, unix.TCP_INFO) }); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	return info
}

// TestRestoreRefusesMarks: a state whose socket mark has one of mtcp's
// own bits (the defaults, or those RestoreOptions.Marks gives) is refused
// as malformed before any socket is made, and marks that are not two
// different single bits are refused too.
func TestRestoreRefusesMarks(t *testing.T) {
	for name, tc := range map[string]struct {
		mark      uint32
		marks     Marks
		malformed bool
	}{
		"default inject":    {DefaultMarks.Inject | 1, Marks{}, true},
		"default quiet":     {DefaultMarks.Quiet, Marks{}, true},
		"configured inject": {1<<3 | 1<<20, Marks{Inject: 1 << 3}, true},
		"configured quiet":  {1 << 9, Marks{Quiet: 1 << 9}, true},
		"two bits":          {0, Marks{Inject: 3}, false},
		"same bit":          {0, Marks{Inject: 1 << 3, Quiet: 1 << 3}, false},
	} {
		st := sampleState()
		st.Sockopts.Mark = tc.mark
		blank, err := NewBlank(st.Local.Addr().Is6())
		if err != nil {
			t.Fatal(err)
		}
		r, err := Restore(st, RestoreOptions{Marks: tc.marks, Blank: blank})
		if err == nil {
			r.Abort()
			t.Errorf("%s: Restore accepted it", name)
			continue
		}
		if errors.Is(err, ErrMalformed) != tc.malformed {
			t.Errorf("%s: %v; want ErrMalformed %v", name, err, tc.malformed)
		}
		// Refused, it still took the blank over: closed, not leaked.
		if blank.fd >= 0 {
			t.Errorf("%s: the blank socket was left open", name)
			blank.Close()
		}
		t.Logf("%s: %v", name, err)
	}
}

//go:build linux

package nat

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/mtcp-dev/mtcp/tests/testbed"
	"golang.org/x/sys/unix"
)

// These tests run real TCP traffic across the testbed (client, gateway, s1,
// s2 namespaces) through the rewrites. Checksum offload is turned off on
// every interface that carries it, so that every segment carries a full
// checksum that its receiver verifies: a rewrite without the right
// checksum fix-up makes the connection fail (checked once by breaking
// payloadWrite on purpose: without CsumFlags the connection times out).

// bed brings up a testbed with checksum offload off.
func bed(t *testing.T) *testbed.Bed {
	t.Helper()
	b := testbed.ForTest(t)
	for h, ifs := range map[*testbed.Host][]string{
		b.Client:  {testbed.IfLAN},
		b.Gateway: {testbed.IfGatewayClient, testbed.IfGatewayLAN},
		b.S1:      {testbed.IfLAN},
		b.S2:      {testbed.IfLAN},
	} {
		for _, ifc := range ifs {
			in(t, h.NetNS, func() error { return checksumOffloadOff(ifc) })
		}
	}
	return b
}

// Legacy ethtool commands (linux/ethtool.h); the tests only need to turn
// two features off, without ethtool(8), which is not installed here.
const (
	ethtoolSRXCSUM = unix.ETHTOOL_SRXCSUM // set RX checksum offload
	ethtoolSTXCSUM = unix.ETHTOOL_STXCSUM // set TX checksum offload
)

// checksumOffloadOff turns RX and TX checksum offload off on ifname in the
// calling thread's namespace. With them on, veth passes CHECKSUM_PARTIAL
// packets that nobody verifies, and a missing fix-up would go unnoticed.
func checksumOffloadOff(ifname string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for _, cmd := range []uint32{ethtoolSTXCSUM, ethtoolSRXCSUM} {
		val := struct{ cmd, data uint32 }{cmd: cmd}
		var ifr struct {
			name [unix.IFNAMSIZ]byte
			data unsafe.Pointer
			_    [16]byte
		}
		copy(ifr.name[:], ifname)
		ifr.data = unsafe.Pointer(&val)
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
		runtime.KeepAlive(&val)
		if errno != 0 {
			return fmt.Errorf("SIOCETHTOOL %#x on %s: %w", cmd, ifname, errno)
		}
	}
	return nil
}

func addrOf(h *testbed.Host, v6 bool) netip.Addr {
	if v6 {
		return h.LAN6
	}
	return h.LAN4
}

// listen listens on ap in host h (plain TCP: no MPTCP).
func listen(t *testing.T, h *testbed.Host, ap netip.AddrPort) net.Listener {
	t.Helper()
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	var ln net.Listener
	in(t, h.NetNS, func() (err error) { ln, err = lc.Listen(context.Background(), "tcp", ap.String()); return err })
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dial connects from host h, from local (port 0: any) to to.
func dial(t *testing.T, h *testbed.Host, local, to netip.AddrPort) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(local)}
	var c net.Conn
	in(t, h.NetNS, func() (err error) { c, err = d.Dial("tcp", to.String()); return err })
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func accept(t *testing.T, ln net.Listener) *net.TCPConn {
	t.Helper()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// echoCheck sends n random bytes from c to the server, which echoes them,
// and checks that both directions carried them intact.
func echoCheck(t *testing.T, c, s *net.TCPConn, n int) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	deadline := time.Now().Add(30 * time.Second)
	c.SetDeadline(deadline)
	s.SetDeadline(deadline)
	srvErr := make(chan error, 1)
	go func() {
		got := make([]byte, n)
		if _, err := io.ReadFull(s, got); err != nil {
			srvErr <- fmt.Errorf("server read: %w", err)
			return
		}
		if !bytes.Equal(got, data) {
			srvErr <- errors.New("server received other bytes than the client sent")
			return
		}
		_, err := s.Write(got)
		srvErr <- err
	}()
	wErr := make(chan error, 1)
	go func() { _, err := c.Write(data); wErr <- err }()
	back := make([]byte, n)
	if _, err := io.ReadFull(c, back); err != nil {
		t.Fatalf("client read: %v (server: %v)", err, <-srvErr)
	}
	if err := errors.Join(<-wErr, <-srvErr); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("client received other bytes than it sent")
	}
}

// netstat reads counter name of section ("Tcp:" in /proc/net/snmp,
// "TcpExt:" in /proc/net/netstat) in host h's namespace.
func netstat(t *testing.T, h *testbed.Host, file, section, name string) int {
	t.Helper()
	var data []byte
	in(t, h.NetNS, func() (err error) { data, err = os.ReadFile("/proc/thread-self/net/" + file); return err })
	var head []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != section {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		for i, n := range head {
			if n == name && i < len(f) {
				v, _ := strconv.Atoi(f[i])
				return v
			}
		}
	}
	t.Fatalf("%s: no %s %s in /proc/net/%s", h.Name, section, name, file)
	return 0
}

// csumErrors reads the TCP InCsumErrors counter of host h.
func csumErrors(t *testing.T, h *testbed.Host) int {
	return netstat(t, h, "snmp", "Tcp:", "InCsumErrors")
}

// dupSegments counts the segments host h received that carried data it
// already had (it answers each with a D-SACK).
func dupSegments(t *testing.T, h *testbed.Host) int {
	return netstat(t, h, "netstat", "TcpExt:", "TCPDSACKOldSent") + netstat(t, h, "netstat", "TcpExt:", "TCPDSACKOfoSent")
}

func openOn(t *testing.T, h *testbed.Host, o Options) *Table {
	t.Helper()
	return openIn(t, h.NetNS, o)
}

func apply(t *testing.T, tb *Table, fill func(b *Batch)) {
	t.Helper()
	var b Batch
	fill(&b)
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
}

// TestForwardReplyFrom: the client dials s1's address; s1 forwards the
// flow to s2 (Forward), s2 answers with s1's address (ReplyFrom), and the
// connection carries data both ways, for IPv4 and IPv6.
func TestForwardReplyFrom(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	s1, s2 := openOn(t, b.S1, Options{}), openOn(t, b.S2, Options{})
	for i, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[v6], func(t *testing.T) {
			port := uint16(7001 + i)
			f := Flow{
				Client:  netip.AddrPortFrom(addrOf(b.Client, v6), uint16(40001+i)),
				Service: netip.AddrPortFrom(addrOf(b.S1, v6), port),
			}
			local := netip.AddrPortFrom(addrOf(b.S2, v6), port)
			apply(t, s1, func(b *Batch) { b.Forward(f, local.Addr()) })
			apply(t, s2, func(b *Batch) { b.ReplyFrom(f, local) })
			ln := listen(t, b.S2, local)
			c := dial(t, b.Client, f.Client, f.Service)
			s := accept(t, ln)
			if got := s.RemoteAddr().(*net.TCPAddr).AddrPort(); got != f.Client {
				t.Fatalf("s2 sees the client as %v; want %v", got, f.Client)
			}
			if got := c.RemoteAddr().(*net.TCPAddr).AddrPort(); got != f.Service {
				t.Fatalf("client is connected to %v; want %v", got, f.Service)
			}
			echoCheck(t, c, s, 1<<20)
			for _, h := range []*testbed.Host{b.Client, b.S2} {
				if n := csumErrors(t, h); n != 0 {
					t.Errorf("%s: %d TCP checksum errors", h.Name, n)
				}
			}
		})
	}
}

// TestIdleRefresh checks the elements' idle timeout: traffic through a
// rewrite refreshes its element (the dynset update in the rule), and an
// element that sees no traffic for Options.Idle disappears.
func TestIdleRefresh(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	const idle = 2 * time.Second
	s1, s2 := openOn(t, b.S1, Options{Idle: idle}), openOn(t, b.S2, Options{Idle: idle})
	f := Flow{Client: netip.AddrPortFrom(b.Client.LAN4, 42001), Service: netip.AddrPortFrom(b.S1.LAN4, 7501)}
	local := netip.AddrPortFrom(b.S2.LAN4, 7501)
	apply(t, s1, func(b *Batch) { b.Forward(f, local.Addr()) })
	apply(t, s2, func(b *Batch) { b.ReplyFrom(f, local) })
	ln := listen(t, b.S2, local)
	c := dial(t, b.Client, f.Client, f.Service)
	s := accept(t, ln)
	expires := func(tb *Table) time.Duration {
		es, err := tb.Flows()
		if err != nil {
			t.Fatal(err)
		}
		if len(es) != 1 {
			return 0
		}
		return es[0].Expires
	}
	eventually(t, 5*time.Second, "the elements to age", func() bool {
		return expires(s1) < idle/2 && expires(s2) < idle/2
	})
	echoCheck(t, c, s, 1000)
	if e1, e2 := expires(s1), expires(s2); e1 < idle*3/4 || e2 < idle*3/4 {
		t.Fatalf("after traffic the elements expire in %v (s1) and %v (s2); want close to %v", e1, e2, idle)
	}
	eventually(t, 2*idle, "idle elements to time out", func() bool {
		es1, _ := s1.Flows()
		es2, _ := s2.Flows()
		return len(es1) == 0 && len(es2) == 0
	})
}

// TestGatewaySteering: the gateway alone steers the flow (Forward plus
// GatewayReply): the client dials s1's address, s2 serves it, and s1 and
// s2 have no rules at all.
func TestGatewaySteering(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	gw := openOn(t, b.Gateway, Options{})
	for i, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[v6], func(t *testing.T) {
			port := uint16(7101 + i)
			f := Flow{
				Client:  netip.AddrPortFrom(addrOf(b.Client, v6), uint16(41001+i)),
				Service: netip.AddrPortFrom(addrOf(b.S1, v6), port),
			}
			target := addrOf(b.S2, v6)
			apply(t, gw, func(b *Batch) {
				b.Forward(f, target)
				b.GatewayReply(f, target)
			})
			ln := listen(t, b.S2, netip.AddrPortFrom(target, port))
			c := dial(t, b.Client, f.Client, f.Service)
			s := accept(t, ln)
			echoCheck(t, c, s, 1<<20)
			for _, h := range []*testbed.Host{b.Client, b.S2} {
				if n := csumErrors(t, h); n != 0 {
					t.Errorf("%s: %d TCP checksum errors", h.Name, n)
				}
			}
		})
	}
	for _, h := range []*testbed.Host{b.S1, b.S2} {
		if rs := ruleset(t, h.NetNS); strings.Contains(rs, "table") {
			t.Errorf("%s has rules:\n%s", h.Name, rs)
		}
	}
}

// tcpInfo reads TCP_INFO of c.
func tcpInfo(t *testing.T, c *net.TCPConn) *unix.TCPInfo {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		t.Fatal(err)
	}
	if ierr != nil {
		t.Fatal(ierr)
	}
	return info
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// nothingToRead checks that s has no data waiting, without waiting.
func nothingToRead(t *testing.T, s *net.TCPConn) {
	t.Helper()
	// Peek without waiting. (A read with a deadline already past fails
	// before it looks at the socket, so it cannot see data that is there.)
	rc, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var b [64]byte
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if n > 0 || !errors.Is(rerr, unix.EAGAIN) {
		t.Fatalf("server has %q, %v to read while the flow is held; want nothing", b[:max(n, 0)], rerr)
	}
}

func readExactly(t *testing.T, s *net.TCPConn, want string) {
	t.Helper()
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(s, got); err != nil {
		t.Fatalf("server read: %v (got %q)", err, got)
	}
	if string(got) != want {
		t.Fatalf("server read %q; want %q", got, want)
	}
}

func openQueue(t *testing.T, h *testbed.Host, o Options) *Queue {
	t.Helper()
	var q *Queue
	in(t, h.NetNS, func() (err error) { q, err = OpenQueue(o); return err })
	t.Cleanup(func() {
		if err := q.Close(); err != nil {
			t.Errorf("Queue.Close: %v", err)
		}
	})
	return q
}

// TestHoldQueue holds an established flow on its server's host: the
// client's bytes are queued, not delivered; after Unhold and Release they
// arrive exactly once and in order, and the client never retransmitted.
func TestHoldQueue(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	// The client's tail loss probe would resend the last held segment
	// after about two round trips (a few milliseconds here): a
	// retransmission that says nothing of the hold, and one that a
	// loaded machine saw in CI. With it off, the client retransmits only
	// on its timeout (200 ms at least), so a retransmission means a held
	// segment was lost.
	run(t, "ip", "netns", "exec", b.Client.NetNS, "sysctl", "-q", "-w", "net.ipv4.tcp_early_retrans=0")
	tb := openOn(t, b.S1, Options{})
	q := openQueue(t, b.S1, Options{})
	for i, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[v6], func(t *testing.T) {
			ln := listen(t, b.S1, netip.AddrPortFrom(addrOf(b.S1, v6), uint16(7201+i)))
			c := dial(t, b.Client, netip.AddrPortFrom(addrOf(b.Client, v6), 0), netip.AddrPortFrom(addrOf(b.S1, v6), uint16(7201+i)))
			s := accept(t, ln)
			f := Flow{Client: c.LocalAddr().(*net.TCPAddr).AddrPort(), Service: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
			readExactly(t, s, "")

			dups := dupSegments(t, b.S1)
			apply(t, tb, func(b *Batch) { b.Hold(f) })
			msgs := []string{"first;", "second;", "third;"}
			for _, m := range msgs {
				if _, err := c.Write([]byte(m)); err != nil {
					t.Fatal(err)
				}
			}
			eventually(t, 5*time.Second, "held packets", func() bool { return q.Held() >= 1 })
			nothingToRead(t, s)
			held := q.Held()
			// Hold a while, as a migration does: longer than the
			// client's loss probe would wait (see above).
			time.Sleep(30 * time.Millisecond)

			start := time.Now()
			apply(t, tb, func(b *Batch) { b.Unhold(f) })
			n, err := q.Release(f)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("held %d packets; Release re-injected %d in %v (unhold included)", held, n, time.Since(start))
			if n < held || q.Held() != 0 {
				t.Fatalf("Release re-injected %d of %d held packets; %d still held", n, held, q.Held())
			}
			readExactly(t, s, strings.Join(msgs, ""))
			if _, err := c.Write([]byte("end")); err != nil {
				t.Fatal(err)
			}
			readExactly(t, s, "end")
			nothingToRead(t, s)
			if r := tcpInfo(t, c).Total_retrans; r != 0 {
				t.Errorf("client retransmitted %d segments; want 0 (holding must queue, not drop)", r)
			}
			if d := dupSegments(t, b.S1) - dups; d != 0 {
				t.Errorf("s1 received %d duplicate segments; want each byte once", d)
			}
		})
	}
}

// TestHoldThenForward replaces a flow's hold by a Forward to s2 in one
// Apply, then releases: the re-injected packets (NF_REPEAT) go through
// prerouting again and meet the Forward, so they reach s2 and not the
// socket on s1. A test-only counter on s2 sees them.
func TestHoldThenForward(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	tb := openOn(t, b.S1, Options{})
	q := openQueue(t, b.S1, Options{})
	ln := listen(t, b.S1, netip.AddrPortFrom(b.S1.LAN4, 7301))
	c := dial(t, b.Client, netip.AddrPortFrom(b.Client.LAN4, 0), netip.AddrPortFrom(b.S1.LAN4, 7301))
	s := accept(t, ln)
	f := Flow{Client: c.LocalAddr().(*net.TCPAddr).AddrPort(), Service: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
	if err := b.S2.Nft(context.Background(), fmt.Sprintf(`table inet mtcptest {
	counter seen {}
	chain pre {
		type filter hook prerouting priority -400; policy accept;
		ip saddr %s tcp sport %d ip daddr %s tcp dport %d counter name seen drop
	}
}
`, f.Client.Addr(), f.Client.Port(), b.S2.LAN4, f.Service.Port())); err != nil {
		t.Fatal(err)
	}

	apply(t, tb, func(b *Batch) { b.Hold(f) })
	if _, err := c.Write([]byte("to-s2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "held packets", func() bool { return q.Held() >= 1 })
	if seen := counter(t, b.S2, "seen"); seen != 0 {
		t.Fatalf("s2 saw %d packets before the switch", seen)
	}
	apply(t, tb, func(x *Batch) {
		x.Unhold(f)
		x.Forward(f, b.S2.LAN4)
	})
	n, err := q.Release(f)
	if err != nil || n < 1 {
		t.Fatalf("Release = %d, %v; want at least 1", n, err)
	}
	eventually(t, 5*time.Second, "the re-injected packet on s2", func() bool { return counter(t, b.S2, "seen") >= 1 })
	nothingToRead(t, s)
}

var counterRE = regexp.MustCompile(`packets (\d+)`)

// counter reads a named counter of table inet mtcptest on host h.
func counter(t *testing.T, h *testbed.Host, name string) int {
	t.Helper()
	out := run(t, "ip", "netns", "exec", h.NetNS, "nft", "list", "counter", "inet", "mtcptest", name)
	m := counterRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("counter %s: no packet count in %q", name, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestReleaseRace releases right after removing the hold, before the
// reader has handled the held packet (the test stalls the reader): the
// packet, read after Release, is sent on at once, and the bytes arrive.
// Then 50 rounds without stalling, where either path may happen.
func TestReleaseRace(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	tb := openOn(t, b.S1, Options{})
	q := openQueue(t, b.S1, Options{})
	ln := listen(t, b.S1, netip.AddrPortFrom(b.S1.LAN4, 7401))
	c := dial(t, b.Client, netip.AddrPortFrom(b.Client.LAN4, 0), netip.AddrPortFrom(b.S1.LAN4, 7401))
	s := accept(t, ln)
	f := Flow{Client: c.LocalAddr().(*net.TCPAddr).AddrPort(), Service: c.RemoteAddr().(*net.TCPAddr).AddrPort()}

	entered, proceed := make(chan struct{}, 1), make(chan struct{})
	q.mu.Lock()
	q.testHookPacket = func() { entered <- struct{}{}; <-proceed }
	q.mu.Unlock()
	apply(t, tb, func(b *Batch) { b.Hold(f) })
	if _, err := c.Write([]byte("stalled;")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered: // the reader has the packet and waits
	case <-time.After(5 * time.Second):
		t.Fatal("the held packet never reached the reader")
	}
	apply(t, tb, func(b *Batch) { b.Unhold(f) })
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() { n, err := q.Release(f); done <- result{n, err} }()
	// Release cannot return before the reader has read past the packet.
	eventually(t, 5*time.Second, "Release to wait on its barrier", func() bool {
		q.mu.Lock()
		defer q.mu.Unlock()
		return len(q.waiters) == 1
	})
	q.mu.Lock()
	q.testHookPacket = nil
	q.mu.Unlock()
	close(proceed)
	r := <-done
	if r.err != nil || r.n != 0 {
		t.Fatalf("Release = %d, %v; want 0 (the reader had not handled the packet yet)", r.n, r.err)
	}
	readExactly(t, s, "stalled;")
	q.mu.Lock()
	atOnce := q.atOnce
	q.mu.Unlock()
	if atOnce != 1 {
		t.Fatalf("%d packets sent on at once; want 1", atOnce)
	}

	released := 0
	for i := range 50 {
		apply(t, tb, func(b *Batch) { b.Hold(f) })
		msg := fmt.Sprintf("round %d;", i)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		apply(t, tb, func(b *Batch) { b.Unhold(f) })
		n, err := q.Release(f)
		if err != nil {
			t.Fatal(err)
		}
		released += n
		readExactly(t, s, msg)
	}
	q.mu.Lock()
	t.Logf("50 rounds: %d packets released by Release, %d sent on as read, the rest never held", released, q.atOnce-atOnce)
	q.mu.Unlock()
	if q.Held() != 0 {
		t.Errorf("%d packets still held", q.Held())
	}
	if r := tcpInfo(t, c).Total_retrans; r != 0 {
		t.Errorf("client retransmitted %d segments; want 0", r)
	}
}

// TestSwitchUnderTraffic switches a flow back and forth between two
// destinations 100 times (hold, then lift the hold and forward in one
// Apply, then release) while its client floods s1 with segments of the
// flow. The kernel refreshes the forward map's timeouts from the packet
// path; a packet let through while the switch's transaction is still
// committing made it insert a duplicate element (seen in the end-to-end
// loop: the next switch failed with EEXIST). Every Apply must succeed and
// the map must end with one element for the flow.
func TestSwitchUnderTraffic(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	tb := openOn(t, b.S1, Options{})
	q := openQueue(t, b.S1, Options{})
	f := Flow{Client: netip.AddrPortFrom(b.Client.LAN4, 42101), Service: netip.AddrPortFrom(b.S1.LAN4, 7601)}

	flood(t, b, f)

	dst := []netip.Addr{b.S2.LAN4, b.S3.LAN4}
	for i := range 100 {
		var h Batch
		h.Hold(f)
		if err := tb.Apply(&h); err != nil {
			t.Fatalf("round %d: hold: %v", i, err)
		}
		var s Batch
		s.Remove(f)
		s.Forward(f, dst[i%2])
		if err := tb.Apply(&s); err != nil {
			t.Fatalf("round %d: switch to %v: %v", i, dst[i%2], err)
		}
		if _, err := q.Release(f); err != nil {
			t.Fatalf("round %d: release: %v", i, err)
		}
	}
	es, err := tb.Flows()
	if err != nil {
		t.Fatal(err)
	}
	var fwd []Entry
	for _, e := range es {
		if e.Flow == f && e.Kind == KindForward {
			fwd = append(fwd, e)
		}
	}
	if len(fwd) != 1 || fwd[0].Addr != dst[1] {
		t.Fatalf("forward elements of the flow after the switches: %v; want one, to %v", fwd, dst[1])
	}
}

// flood sends segments of f from its client to s1 as fast as it can until
// the test ends. Their checksum is wrong: s1's rules see them, and whoever
// they are forwarded to drops them.
func flood(t *testing.T, b *testbed.Bed, f Flow) {
	var fd int
	in(t, b.Client.NetNS, func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		return err
	})
	pkt := make([]byte, 40)
	pkt[0], pkt[8], pkt[9] = 0x45, 64, unix.IPPROTO_TCP
	copy(pkt[12:16], f.Client.Addr().AsSlice())
	copy(pkt[16:20], f.Service.Addr().AsSlice())
	pkt[20], pkt[21] = byte(f.Client.Port()>>8), byte(f.Client.Port())
	pkt[22], pkt[23] = byte(f.Service.Port()>>8), byte(f.Service.Port())
	pkt[32], pkt[33] = 5<<4, 0x10 // data offset, ACK
	to := &unix.SockaddrInet4{Addr: f.Service.Addr().As4()}
	stop, sent := make(chan struct{}), make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				sent <- n
				return
			default:
			}
			if unix.Sendto(fd, pkt, 0, to) == nil {
				n++
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		n := <-sent
		t.Logf("%d segments sent", n)
		if n == 0 {
			t.Error("the flood sent nothing: the test saw no traffic")
		}
		unix.Close(fd)
	})
}

// TestRemoveUnderTraffic adds and removes a flow's forward 200 times
// while its client floods s1 with segments of the flow, which is not
// held. A packet passing while the removal commits made the kernel's
// timeout refresh re-create the element (seen in round 21 without the
// sweep in Apply); after every removal the flow must have no element.
func TestRemoveUnderTraffic(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	tb := openOn(t, b.S1, Options{})
	f := Flow{Client: netip.AddrPortFrom(b.Client.LAN4, 42102), Service: netip.AddrPortFrom(b.S1.LAN4, 7601)}
	flood(t, b, f)
	present := func() bool {
		t.Helper()
		es, err := tb.Flows()
		if err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(es, func(e Entry) bool { return e.Flow == f })
	}
	late := 0
	for i := range 200 {
		var a Batch
		a.Forward(f, b.S2.LAN4)
		if err := tb.Apply(&a); err != nil {
			t.Fatalf("round %d: forward: %v", i, err)
		}
		var r Batch
		r.Remove(f)
		if err := tb.Apply(&r); err != nil {
			t.Fatalf("round %d: remove: %v", i, err)
		}
		if !present() {
			continue
		}
		// Re-created by a packet evaluated across the commit, after
		// Apply's own sweep looked: the late sweep must take it out.
		late++
		tb.mu.Lock()
		done := tb.lateDone
		tb.mu.Unlock()
		if done != nil {
			<-done
		}
		if present() {
			t.Fatalf("round %d: still there after the removal and the late sweep", i)
		}
	}
	t.Logf("%d of 200 removals left an element for the late sweep", late)
}

// TestRefresh: Table.Refresh restarts the idle timeout of a silent flow's
// rewrite elements in place, leaves its hold and other flows' elements
// alone, and keeps the connection working past the timeout it would have
// had; without it the elements time out.
func TestRefresh(t *testing.T) {
	skipUnlessRoot(t)
	b := bed(t)
	const idle = 2 * time.Second
	s1, s2 := openOn(t, b.S1, Options{Idle: idle}), openOn(t, b.S2, Options{Idle: idle})
	f := Flow{Client: netip.AddrPortFrom(b.Client.LAN4, 42011), Service: netip.AddrPortFrom(b.S1.LAN4, 7511)}
	other := Flow{Client: netip.AddrPortFrom(b.Client.LAN4, 42012), Service: netip.AddrPortFrom(b.S1.LAN4, 7511)}
	local := netip.AddrPortFrom(b.S2.LAN4, 7511)
	apply(t, s1, func(b *Batch) { b.Forward(f, local.Addr()); b.Forward(other, local.Addr()) })
	apply(t, s2, func(b *Batch) { b.ReplyFrom(f, local) })
	ln := listen(t, b.S2, local)
	c := dial(t, b.Client, f.Client, f.Service)
	s := accept(t, ln)
	echoCheck(t, c, s, 100)
	// Silent for twice the idle timeout, refreshed every quarter of it.
	for range 8 {
		time.Sleep(idle / 4)
		for _, tb := range []*Table{s1, s2} {
			if n, err := tb.Refresh([]Flow{f}); err != nil || n != 1 {
				t.Fatalf("Refresh: %d elements, %v; want 1", n, err)
			}
		}
	}
	es, err := s1.Flows()
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || es[0].Flow != f || es[0].Expires < idle/2 {
		t.Fatalf("s1 after the refreshes: %v; want only f's forwarding, expiring in over %v (the other flow's, never refreshed, gone)", es, idle/2)
	}
	echoCheck(t, c, s, 100) // still steered
	if n, err := s1.Refresh(nil); err != nil || n != 0 {
		t.Fatalf("Refresh of nothing: %d, %v", n, err)
	}
	if _, err := s1.Refresh([]Flow{{Client: f.Client, Service: netip.AddrPortFrom(b.S1.LAN6, 7511)}}); err == nil {
		t.Fatal("Refresh of a flow mixing families: no error")
	}
}

// TestRefreshMany: Refresh works through more flows than one lock hold
// takes (lockChunk), finds every kind of element they have (forward,
// gateway reply, reply rewrite, both families) and only those, and leaves
// their data as it was.
func TestRefreshMany(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "refmany")
	tb := openIn(t, ns, Options{Idle: time.Hour})
	var flows []Flow
	var b Batch
	for i := range 2*lockChunk + 10 {
		f := Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("10.77.1.2"), uint16(20000+i)), Service: netip.MustParseAddrPort("10.77.2.11:7000")}
		if i%2 == 1 {
			f = Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("fd77:1::2"), uint16(20000+i)), Service: netip.MustParseAddrPort("[fd77:2::11]:7000")}
		}
		target := netip.MustParseAddr("10.77.2.12")
		if f.Is6() {
			target = netip.MustParseAddr("fd77:2::12")
		}
		switch i % 3 {
		case 0:
			b.Forward(f, target)
		case 1:
			b.Forward(f, target)
			b.GatewayReply(f, target)
		case 2:
			b.ReplyFrom(f, netip.AddrPortFrom(target, 7000))
		}
		flows = append(flows, f)
	}
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	before, err := tb.Flows()
	if err != nil {
		t.Fatal(err)
	}
	unknown := Flow{Client: netip.MustParseAddrPort("10.77.1.3:1"), Service: netip.MustParseAddrPort("10.77.2.11:7000")}
	n, err := tb.Refresh(append(flows, unknown))
	if err != nil || n != len(before) {
		t.Fatalf("Refresh = %d, %v; want the %d elements of the flows", n, err, len(before))
	}
	after, err := tb.Flows()
	if err != nil {
		t.Fatal(err)
	}
	strip := func(es []Entry) map[string]bool {
		m := map[string]bool{}
		for _, e := range es {
			e.Expires = 0
			m[e.String()] = true
		}
		return m
	}
	if !maps.Equal(strip(before), strip(after)) {
		t.Fatalf("the elements changed:\nbefore %v\nafter %v", before, after)
	}
}

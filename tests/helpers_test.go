package tests

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/nat/netns"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// in runs fn inside host h's network namespace, failing the test on error.
func in(t testing.TB, h *testbed.Host, fn func() error) {
	t.Helper()
	if err := netns.Do(h.NetNSPath(), fn); err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
}

// nft applies an nftables script in h's namespace.
func nft(t testing.TB, h *testbed.Host, script string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.Nft(ctx, script); err != nil {
		t.Fatalf("%s: nft: %v", h.Name, err)
	}
}

// addr returns h's service address of the family of v6.
var addr = pool.Addr

// l3 is the nftables protocol keyword for an address family.
func l3(a netip.Addr) string {
	if a.Is6() {
		return "ip6"
	}
	return "ip"
}

func setBuf(c syscall.RawConn, opt, v int) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, v) })
	return errors.Join(err, serr)
}

// connect opens a connection from the client host to server host s at
// port, returning both ends. serverBuf > 0 forces the server's buffer
// sizes (set on the listener, so the handshake's window scale fits);
// clientRcvBuf > 0 shrinks the client's receive buffer.
func connect(t testing.TB, client, s *testbed.Host, v6 bool, port uint16, serverBuf, clientRcvBuf int) (c, srv *net.TCPConn) {
	t.Helper()
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false) // TCP_REPAIR cannot migrate MPTCP sockets
	if serverBuf > 0 {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			return errors.Join(setBuf(c, syscall.SO_RCVBUFFORCE, serverBuf), setBuf(c, syscall.SO_SNDBUFFORCE, serverBuf))
		}
	}
	ap := netip.AddrPortFrom(addr(s, v6), port)
	var ln net.Listener
	in(t, s, func() (err error) { ln, err = lc.Listen(context.Background(), "tcp", ap.String()); return err })
	defer ln.Close()
	d := net.Dialer{Timeout: 10 * time.Second}
	if clientRcvBuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error { return setBuf(c, syscall.SO_RCVBUF, clientRcvBuf) }
	}
	var cc net.Conn
	in(t, client, func() (err error) { cc, err = d.Dial("tcp", ap.String()); return err })
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close(); sc.Close() })
	return cc.(*net.TCPConn), sc.(*net.TCPConn)
}

// sockState reports the state and queue lengths of the TCP socket bound to
// local port on host h, as sock_diag sees it.
func sockState(t testing.TB, h *testbed.Host, port uint16) (st repair.TCPState, recvQ, sendQ uint32, found bool) {
	t.Helper()
	var conns []repair.Conn
	in(t, h, func() (err error) {
		conns, err = repair.List(context.Background(), repair.ListOptions{Port: port, States: []repair.TCPState{
			repair.StateEstablished, repair.StateFinWait1, repair.StateFinWait2, repair.StateCloseWait,
			repair.StateLastAck, repair.StateClosing}})
		return err
	})
	for _, c := range conns {
		if c.Local.Port() == port {
			return c.State, c.RecvQ, c.SendQ, true
		}
	}
	return 0, 0, 0, false
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	pool.Eventually(t, timeout, what, cond)
}

// watchRSTs counts the TCP resets the client host sends and receives.
// It returns a function reading both counters.
func watchRSTs(t testing.TB, client *testbed.Host) func() (in, out int) {
	return watchRSTsMatching(t, client, "mtcpwatch", "", "", rstRules{})
}

// watchPortRSTs counts only the resets of connections to the server port
// port, so that a test case is not charged with what the teardown of an
// earlier case sends late.
func watchPortRSTs(t testing.TB, client *testbed.Host, port uint16) func() (in, out int) {
	return watchRSTsMatching(t, client, fmt.Sprintf("mtcpwatch%d", port),
		fmt.Sprintf("tcp sport %d ", port), fmt.Sprintf("tcp dport %d ", port), rstRules{})
}

// watchPortRSTsApart is watchPortRSTs that counts apart the resets that
// come after the connection has ended on the side that sends them. Such
// a reset answers a segment of the connection that arrives once the
// sender's socket has closed: reordered on the way (two segments sent
// from different CPUs can cross on a veth pair), or a duplicate ACK sent
// for a retransmission that crossed the close. It carries the segment's
// acknowledgement number and no ACK flag.
//
//   - stale: the resets the client sends for the connection to svc
//     (either family's address) with no ACK flag. A passive closer keeps
//     no TIME_WAIT: the client, having closed second, answers that way
//     the server's late segments. A live socket never sends that kind
//     (its resets carry ACK).
//   - late: the resets the client receives with no ACK flag once the
//     server's FIN has come in since the last call to forgetFIN (the
//     server may have closed its side: the client already has all its
//     data). A host without the connection sends that kind too, mid-
//     migration; forgetFIN, called once the restored socket is live,
//     keeps a FIN that came before the migration from excusing those.
//
// What else could hide there shows elsewhere: an unrewritten reply has
// another source address, a socket killed by unexpected data after the
// FIN shows in the kernel's TCPAbortOnData (see [clientTCPExtGrowth]), a
// source that still sends after it let go of the connection in
// [countLocalOut], and missing data in the stream's check. One chain
// counts each direction, so reading the counters at different moments
// cannot move a reset from one to another.
type rstWatch struct {
	t      testing.TB
	client *testbed.Host
	table  string
	// rsts reads the resets counted in and out (neither stale nor late).
	rsts func() (in, out int)
}

func watchPortRSTsApart(t testing.TB, client *testbed.Host, port uint16, svc ...netip.Addr) *rstWatch {
	t.Helper()
	w := &rstWatch{t: t, client: client, table: fmt.Sprintf("mtcpwatchapart%d", port)}
	var outFirst strings.Builder
	for _, a := range svc {
		fmt.Fprintf(&outFirst, "%s daddr %s tcp dport %d tcp flags & (rst | ack) == rst counter name stale return\n\t\t", l3(a), a, port)
	}
	w.rsts = watchRSTsMatching(t, client, w.table, fmt.Sprintf("tcp sport %d ", port), fmt.Sprintf("tcp dport %d ", port), rstRules{
		decls: "counter late {}\n\tset fin {\n\t\ttype inet_service\n\t\tflags dynamic\n\t}\n\t",
		inFirst: fmt.Sprintf("tcp sport %[1]d tcp flags & fin == fin add @fin { tcp sport }\n\t\t"+
			"tcp sport %[1]d tcp sport @fin tcp flags & (rst | ack) == rst counter name late return\n\t\t", port),
		outFirst: outFirst.String(),
	})
	return w
}

// stale and late read the counters of those kinds (see watchPortRSTsApart).
func (w *rstWatch) stale() int { return nftCounter(w.t, w.client, w.table, "stale") }
func (w *rstWatch) late() int  { return nftCounter(w.t, w.client, w.table, "late") }

// forgetFIN forgets the server FINs seen so far.
func (w *rstWatch) forgetFIN() {
	w.t.Helper()
	nft(w.t, w.client, "flush set inet "+w.table+" fin\n")
}

// countLocalOut counts the segments h itself sends from port (not those
// it forwards), from now on: a host that let go of its connections on
// port must send none.
func countLocalOut(t testing.TB, h *testbed.Host, port uint16) func() int {
	t.Helper()
	table := fmt.Sprintf("mtcplocalout%d", port)
	nft(t, h, fmt.Sprintf("table inet %s {\n\tcounter sent {}\n\tchain out {\n\t\ttype filter hook output priority 0\n\t\ttcp sport %d counter name sent\n\t}\n}\n", table, port))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		h.Nft(ctx, "delete table inet "+table)
	})
	return func() int { return nftCounter(t, h, table, "sent") }
}

// clientTCPExtGrowth reads the client host's TcpExt counters that pick
// selects and returns a function giving, by name, those that grew since.
// The host's namespace is the test's own.
func clientTCPExtGrowth(t testing.TB, client *testbed.Host, pick func(string) bool) func() map[string]int {
	t.Helper()
	read := func() map[string]int {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := client.Run(ctx, "cat", "/proc/net/netstat")
		if err != nil {
			t.Fatalf("reading the client's /proc/net/netstat: %v", err)
		}
		var names, values []string
		for line := range strings.Lines(string(out)) {
			f := strings.Fields(line)
			if len(f) == 0 || f[0] != "TcpExt:" {
				continue
			}
			if names == nil {
				names = f[1:]
			} else {
				values = f[1:]
			}
		}
		m := map[string]int{}
		for i, n := range names {
			if pick(n) && i < len(values) {
				m[n], _ = strconv.Atoi(values[i])
			}
		}
		if len(m) == 0 {
			t.Fatalf("none of the wanted TcpExt counters in the client's /proc/net/netstat:\n%s", out)
		}
		return m
	}
	before := read()
	return func() map[string]int {
		d := map[string]int{}
		for n, v := range read() {
			if v != before[n] {
				d[n] = v - before[n]
			}
		}
		return d
	}
}

// watchFlowRSTs counts the resets of client connection c only (by its
// port; a table per family and port): from its server and from the client.
func watchFlowRSTs(t testing.TB, client *testbed.Host, c *net.TCPConn) func() (in, out int) {
	la := c.LocalAddr().(*net.TCPAddr)
	port, fam := la.Port, 4
	if la.IP.To4() == nil {
		fam = 6
	}
	return watchRSTsMatching(t, client, fmt.Sprintf("mtcpwatchflow%d_%d", fam, port),
		fmt.Sprintf("tcp dport %d ", port), fmt.Sprintf("tcp sport %d ", port), rstRules{})
}

// rstRules are what a watch adds to watchRSTsMatching's table: decls
// (counters, sets), rules evaluated before the rst_in count (inFirst) and
// before the rst_out count (outFirst); a rule ending in return keeps what
// it matched out of that count.
type rstRules struct{ decls, inFirst, outFirst string }

// watchRSTsMatching installs table (counters rst_in, rst_out and stale)
// on the client host: resets in matching inMatch, resets out matching
// outMatch, with the rules of more.
func watchRSTsMatching(t testing.TB, client *testbed.Host, table, inMatch, outMatch string, more rstRules) func() (in, out int) {
	t.Helper()
	nft(t, client, fmt.Sprintf(`table inet %s {
	counter rst_in {}
	counter rst_out {}
	counter stale {}
	%s
	chain in {
		type filter hook input priority 0
		%s%stcp flags & rst == rst counter name rst_in
	}
	chain out {
		type filter hook output priority 0
		%s%stcp flags & rst == rst counter name rst_out
	}
}
`, table, more.decls, more.inFirst, inMatch, more.outFirst, outMatch))
	return func() (int, int) {
		return nftCounter(t, client, table, "rst_in"), nftCounter(t, client, table, "rst_out")
	}
}

// nftCounter reads the packet count of the named counter of table inet
// table on h.
func nftCounter(t testing.TB, h *testbed.Host, table, name string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Run(ctx, "nft", "list", "counter", "inet", table, name)
	if err != nil {
		t.Fatalf("reading counter %s: %v", name, err)
	}
	m := regexp.MustCompile(`packets (\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("counter %s: no packet count in %q", name, out)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// flowRules names one flow's nftables rules on every host involved.
type flowRules struct {
	table                string // per-flow table name
	client, server       netip.AddrPort
	src, dst             *testbed.Host
	srcAddr, dstAddr     netip.Addr
	clientHost           *testbed.Host
	clientBlocked        bool
	clientBlockTableName string
}

func newFlowRules(client *testbed.Host, c, srv *net.TCPConn, src, dst *testbed.Host) *flowRules {
	ca := c.LocalAddr().(*net.TCPAddr).AddrPort()
	sa := srv.LocalAddr().(*net.TCPAddr).AddrPort()
	ca = netip.AddrPortFrom(ca.Addr().Unmap(), ca.Port())
	sa = netip.AddrPortFrom(sa.Addr().Unmap(), sa.Port())
	v6 := sa.Addr().Is6()
	return &flowRules{
		table:  fmt.Sprintf("mtcpflow%d", sa.Port()),
		client: ca, server: sa, src: src, dst: dst,
		srcAddr: addr(src, v6), dstAddr: addr(dst, v6), clientHost: client,
		clientBlockTableName: fmt.Sprintf("mtcpblock%d", sa.Port()),
	}
}

// match is the nftables match for the client's segments of the flow.
func (f *flowRules) match(daddr netip.Addr) string {
	p := l3(daddr)
	return fmt.Sprintf("%s saddr %s %s daddr %s tcp sport %d tcp dport %d", p, f.client.Addr(), p, daddr, f.client.Port(), f.server.Port())
}

// blockClient makes the client host drop every segment of the flow that
// reaches it, so the server's data and FIN stay unacknowledged.
func (f *flowRules) blockClient(t testing.TB) {
	p := l3(f.server.Addr())
	nft(t, f.clientHost, fmt.Sprintf("table inet %s {\n chain pre {\n  type filter hook prerouting priority -300\n  %s saddr %s tcp sport %d tcp dport %d drop\n }\n}\n",
		f.clientBlockTableName, p, f.server.Addr(), f.server.Port(), f.client.Port()))
	f.clientBlocked = true
}

func (f *flowRules) unblockClient(t testing.TB) {
	if f.clientBlocked {
		nft(t, f.clientHost, "delete table inet "+f.clientBlockTableName+"\n")
		f.clientBlocked = false
	}
}

// hold drops the client's segments of the flow at the source before they
// reach the frozen socket (a segment reaching no socket would be answered
// with a RST). The segments repair injects carry repair.DefaultMarks.Inject.
func (f *flowRules) hold(t testing.TB) {
	nft(t, f.src, fmt.Sprintf("table inet %s {\n chain pre {\n  type filter hook prerouting priority -300\n  %s drop\n }\n}\n",
		f.table, f.match(f.srcAddr)))
}

// steer installs the target's reply-source rewrite, then atomically
// replaces the source's hold with the forward rewrite to the target.
func (f *flowRules) steer(t testing.TB) {
	p := l3(f.dstAddr)
	nft(t, f.dst, fmt.Sprintf("table inet %s {\n chain post {\n  type filter hook postrouting priority 100\n  %s saddr %s %s daddr %s tcp sport %d tcp dport %d %s saddr set %s\n }\n}\n",
		f.table, p, f.dstAddr, p, f.client.Addr(), f.server.Port(), f.client.Port(), p, f.srcAddr))
	nft(t, f.src, fmt.Sprintf("delete table inet %s\ntable inet %s {\n chain pre {\n  type filter hook prerouting priority -300\n  %s %s daddr set %s\n }\n}\n",
		f.table, f.table, f.match(f.srcAddr), p, f.dstAddr))
}

// connsOnPort counts h's connections whose local port is port (frozen
// ones, in repair mode, included).
func connsOnPort(t testing.TB, h *testbed.Host, port uint16) int {
	t.Helper()
	var conns []repair.Conn
	in(t, h, func() (err error) {
		conns, err = repair.List(context.Background(), repair.ListOptions{Port: port})
		return err
	})
	return len(conns)
}

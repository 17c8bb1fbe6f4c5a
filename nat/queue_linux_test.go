//go:build linux

package nat

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// loopConn connects 127.0.0.1:cport to a listener on 127.0.0.1:sport in
// namespace ns; mark, if not 0, is set as SO_MARK on the client socket.
func loopConn(t *testing.T, ns string, cport, sport uint16, mark int) (c, s *net.TCPConn) {
	t.Helper()
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	var ln net.Listener
	in(t, ns, func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), sport).String())
		return err
	})
	defer ln.Close()
	d := net.Dialer{
		Timeout:   5 * time.Second,
		LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), cport)),
		Control: func(_, _ string, rc syscall.RawConn) error {
			if mark == 0 {
				return nil
			}
			var serr error
			err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
			return errors.Join(err, serr)
		},
	}
	var cc net.Conn
	in(t, ns, func() (err error) { cc, err = d.Dial("tcp", ln.Addr().String()); return err })
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close(); sc.Close() })
	return cc.(*net.TCPConn), sc.(*net.TCPConn)
}

func flowOf(c *net.TCPConn) Flow {
	return Flow{Client: c.LocalAddr().(*net.TCPAddr).AddrPort(), Service: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
}

// TestHoldSkipsInjectMark: a held flow's packets whose mark has the
// inject bit (as repair's injected segments have) pass; the others, other
// bits of their mark set or not, are queued. Close then re-injects what
// was held, so nothing is lost, with the inject bit added to the mark it
// had. The marks are not the defaults: they are options.
func TestHoldSkipsInjectMark(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "mark")
	o := Options{InjectMark: 1 << 4, QuietMark: 1 << 5}
	tb := openIn(t, ns, o)
	var q *Queue
	in(t, ns, func() (err error) { q, err = OpenQueue(o); return err })
	defer q.Close()
	// Counts the packets to port 7002 as they reach the socket, by mark.
	for _, c := range []string{"add table inet marks", "add chain inet marks in { type filter hook input priority 0 ; }",
		"add rule inet marks in tcp dport 7002 meta mark 0x13 counter", "add rule inet marks in tcp dport 7002 meta mark 0x3 counter"} {
		run(t, "ip", "netns", "exec", ns, "nft", c)
	}

	marked, ms := loopConn(t, ns, 40001, 7001, 0x3|1<<4)
	plain, ps := loopConn(t, ns, 40002, 7002, 0x3)
	var b Batch
	b.Hold(flowOf(marked))
	b.Hold(flowOf(plain))
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*net.TCPConn{marked, plain} {
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	readExactly(t, ms, "x")
	eventually(t, 5*time.Second, "the packet without the inject bit to be held", func() bool { return q.Held() == 1 })
	nothingToRead(t, ps)

	b.Reset()
	b.Unhold(flowOf(plain))
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	readExactly(t, ps, "x")
	if _, err := q.Release(flowOf(plain)); !errors.Is(err, ErrClosed) {
		t.Errorf("Release after Close: %v; want ErrClosed", err)
	}
	counts := regexp.MustCompile(`meta mark (0x[0-9a-f]+) counter packets (\d+)`).FindAllStringSubmatch(
		run(t, "ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "marks", "in"), -1)
	got := map[string]string{}
	for _, m := range counts {
		got[m[1]] = m[2]
	}
	if got["0x00000013"] != "1" || got["0x00000003"] == "0" || got["0x00000003"] == "" {
		t.Errorf("packets to the socket by mark: %v; want the released one with 0x13 (its own mark and the inject bit), the others with 0x3", got)
	}
}

// TestQueueBusy: a queue number can be bound once per namespace.
func TestQueueBusy(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "busy")
	var q1 *Queue
	in(t, ns, func() (err error) { q1, err = OpenQueue(Options{Queue: 9}); return err })
	defer q1.Close()
	err := netnsDo(ns, func() error {
		q2, err := OpenQueue(Options{Queue: 9})
		if err == nil {
			q2.Close()
		}
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "already read by another socket") {
		t.Fatalf("second OpenQueue: %v; want an error naming the cause", err)
	}
	t.Logf("error: %v", err)
}

// TestQuietMarkDropped: what a socket marked QuietMark sends is dropped
// (a restored socket in repair mode must not be heard before its reply
// rewrite is in); once the mark is gone, TCP's retransmission delivers it.
func TestQuietMarkDropped(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "quiet")
	openIn(t, ns, Options{})
	c, s := loopConn(t, ns, 40003, 7003, 0)
	setMark := func(v int) {
		t.Helper()
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, v) }); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
	}
	setMark(int(DefaultQuietMark | 0x3)) // other bits of the mark do not matter
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // loopback delivers in microseconds
	nothingToRead(t, s)
	setMark(0)
	readExactly(t, s, "x")
}

// TestPassWhileHeld: ApplyThen runs its step while the hold it lifts is
// still installed, and Pass sends the held packets on through it (with
// the inject mark bit), then the packets that arrive meanwhile as soon as they are
// read, until Release; after that a new hold holds again.
func TestPassWhileHeld(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "pass")
	tb := openIn(t, ns, Options{})
	var q *Queue
	in(t, ns, func() (err error) { q, err = OpenQueue(Options{}); return err })
	defer q.Close()
	c, s := loopConn(t, ns, 40020, 7020, 0)
	f := flowOf(c)
	write := func(p string) {
		t.Helper()
		if _, err := c.Write([]byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	var b Batch
	b.Hold(f)
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	write("a")
	eventually(t, 5*time.Second, "a to be held", func() bool { return q.Held() == 1 })

	b.Reset()
	b.Unhold(f)
	err := tb.ApplyThen(&b, func() error {
		// The hold is still there: b is held too.
		write("b")
		eventually(t, 5*time.Second, "b to be held", func() bool { return q.Held() == 2 })
		nothingToRead(t, s)
		if n, err := q.Pass(f); err != nil || n != 2 {
			t.Errorf("Pass = %d, %v; want 2 packets", n, err)
		}
		readExactly(t, s, "ab")
		write("c") // queued by the hold, passed on as soon as read
		readExactly(t, s, "c")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.Release(f); err != nil {
		t.Fatal(err)
	}
	write("d") // no hold
	readExactly(t, s, "d")

	// Release ended the pass: a new hold holds.
	b.Reset()
	b.Hold(f)
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	write("e")
	eventually(t, 5*time.Second, "e to be held", func() bool { return q.Held() == 1 })
	nothingToRead(t, s)
	b.Reset()
	b.Unhold(f)
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Release(f); err != nil {
		t.Fatal(err)
	}
	readExactly(t, s, "e")
}

// TestHoldsKept: a lifting of holds that fails once is tried again and
// succeeds; one that keeps failing returns ErrHoldsKept with the hold
// still in, and a Pass left on keeps the flow's packets going through it;
// EndPass then makes the hold hold again.
func TestHoldsKept(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "kept")
	tb := openIn(t, ns, Options{})
	var q *Queue
	in(t, ns, func() (err error) { q, err = OpenQueue(Options{}); return err })
	defer q.Close()
	c, s := loopConn(t, ns, 40030, 7030, 0)
	f := flowOf(c)
	write := func(p string) {
		t.Helper()
		if _, err := c.Write([]byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	held := func() bool {
		t.Helper()
		es, err := tb.Flows()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range es {
			if e.Kind == KindHold && e.Flow == f {
				return true
			}
		}
		return false
	}
	failing := 0 // tries left to fail; -1: all of them
	tb.mu.Lock()
	tb.liftFault = func() error {
		if failing == 0 {
			return nil
		}
		failing--
		return errors.New("injected")
	}
	tb.mu.Unlock()
	hold := func() {
		t.Helper()
		var b Batch
		b.Hold(f)
		if err := tb.Apply(&b); err != nil {
			t.Fatal(err)
		}
	}
	unhold := func() error {
		var b Batch
		b.Unhold(f)
		return tb.ApplyThen(&b, func() error { _, err := q.Pass(f); return err })
	}

	// One failure: the second try lifts the hold.
	hold()
	write("a")
	eventually(t, 5*time.Second, "a to be held", func() bool { return q.Held() == 1 })
	failing = 1
	if err := unhold(); err != nil {
		t.Fatalf("unhold with one failed try: %v", err)
	}
	if held() {
		t.Fatal("the hold is still in after a successful retry")
	}
	if _, err := q.Release(f); err != nil {
		t.Fatal(err)
	}
	readExactly(t, s, "a")

	// Every try fails: the hold stays, and the pass lets packets through.
	hold()
	write("b")
	eventually(t, 5*time.Second, "b to be held", func() bool { return q.Held() == 1 })
	failing = -1
	err := unhold()
	if !errors.Is(err, ErrHoldsKept) || errors.Is(err, ErrApplied) {
		t.Fatalf("unhold with every try failing: %v, want ErrHoldsKept and not ErrApplied (nothing went in)", err)
	}
	if !held() {
		t.Fatal("the hold is gone although its lifting failed")
	}
	readExactly(t, s, "b")
	write("c") // queued by the hold, passed on at once
	readExactly(t, s, "c")

	// EndPass: the hold holds again.
	if err := q.EndPass(f); err != nil {
		t.Fatal(err)
	}
	write("d")
	eventually(t, 5*time.Second, "d to be held", func() bool { return q.Held() == 1 })
	nothingToRead(t, s)
	failing = 0
	if err := unhold(); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Release(f); err != nil {
		t.Fatal(err)
	}
	readExactly(t, s, "d")
	if held() {
		t.Fatal("the hold is still in")
	}
}

// TestErrApplied: an Apply whose batch went in says so (ErrApplied) when
// a step after it fails, the caller's or the lifting of the holds, so
// that a switch whose new destination is in is not taken for one that
// failed.
func TestErrApplied(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "applied")
	tb := openIn(t, ns, Options{})
	f := Flow{Client: netip.MustParseAddrPort("10.9.0.2:40040"), Service: netip.MustParseAddrPort("10.9.0.1:7040")}
	hold := func() { apply(t, tb, func(b *Batch) { b.Hold(f) }) }
	forwardsTo := func(to netip.Addr) {
		t.Helper()
		es, err := tb.Flows()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range es {
			if e.Kind == KindForward && e.Flow == f && e.Addr == to {
				return
			}
		}
		t.Fatalf("no forward of %v to %v in %v", f, to, es)
	}
	switchTo := func(to string) *Batch {
		var b Batch
		b.Remove(f)
		b.Forward(f, netip.MustParseAddr(to))
		return &b
	}

	boom := errors.New("boom")
	hold()
	err := tb.ApplyThen(switchTo("10.9.0.3"), func() error { return boom })
	if !errors.Is(err, ErrApplied) || !errors.Is(err, boom) || errors.Is(err, ErrHoldsKept) {
		t.Fatalf("a switch whose step failed: %v, want ErrApplied and the step's error", err)
	}
	forwardsTo(netip.MustParseAddr("10.9.0.3"))

	hold()
	tb.mu.Lock()
	tb.liftFault = func() error { return errors.New("injected") }
	tb.mu.Unlock()
	err = tb.Apply(switchTo("10.9.0.4"))
	if !errors.Is(err, ErrApplied) || !errors.Is(err, ErrHoldsKept) {
		t.Fatalf("a switch whose holds stayed: %v, want ErrApplied and ErrHoldsKept", err)
	}
	forwardsTo(netip.MustParseAddr("10.9.0.4"))
}

// TestQueueReaderStops: when the reader cannot read the queue any more,
// Done is closed and Err says why; after Close, Err is nil.
func TestQueueReaderStops(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "qstop")
	var q, q2 *Queue
	in(t, ns, func() (err error) {
		if q, err = OpenQueue(Options{Queue: 7}); err != nil {
			return err
		}
		q2, err = OpenQueue(Options{Queue: 8})
		return err
	})
	select {
	case <-q.Done():
		t.Fatal("Done closed while the reader runs")
	default:
	}
	if err := q.Err(); err != nil {
		t.Fatalf("Err while the reader runs: %v", err)
	}
	q.sock.close() // the socket fails under the reader
	select {
	case <-q.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed after the reader's socket failed")
	}
	if err := q.Err(); err == nil {
		t.Fatal("Err is nil after the reader failed")
	}
	if _, err := q.Release(); err == nil {
		t.Fatal("Release succeeded without a reader")
	}
	q.Close()

	if err := q2.Close(); err != nil {
		t.Fatal(err)
	}
	<-q2.Done()
	if err := q2.Err(); err != nil {
		t.Fatalf("Err after Close: %v", err)
	}
}

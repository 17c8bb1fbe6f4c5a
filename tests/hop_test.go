package tests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// hopEchoEnv makes the test binary, started with it, an echo process for
// BenchmarkProcessHop and BenchmarkPauseFloor instead of running tests: it
// dials the unix socket the variable names and sends back every byte it
// reads; or, given "tcp-listen=ADDR:PORT", it listens there and does so on
// every connection it accepts until its standard input ends.
const hopEchoEnv = "MTCP_TEST_HOP_ECHO"

// hopEchoListen is the prefix of hopEchoEnv's listening form.
const hopEchoListen = "tcp-listen="

// hopEcho is the echo process's main, called from TestMain.
func hopEcho(arg string) int {
	if addr, ok := strings.CutPrefix(arg, hopEchoListen); ok {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go func() {
			io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return 1
			}
			go echo(c)
		}
	}
	c, err := net.Dial("unix", arg)
	if err != nil {
		return 1
	}
	echo(c)
	return 0
}

// echo sends back every byte it reads from c, one at a time, until c
// ends.
func echo(c net.Conn) {
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			return
		}
		if _, err := c.Write(b); err != nil {
			return
		}
	}
}

// BenchmarkProcessHop is the machine's baseline for the pause benchmarks:
// the round trip of one byte between two Go processes over a unix
// socket, what each hand-off between mtcp's processes (application,
// mtcpd, peer mtcpd) costs before any work is done. "idle" leaves the
// processes idle for a while before each round trip, as a migration's
// hand-offs find them; "busy" sends the next byte at once. One op is one
// round trip; metrics are its percentiles in µs.
func BenchmarkProcessHop(b *testing.B) {
	for _, mode := range []struct {
		name string
		gap  time.Duration
	}{{"idle", 200 * time.Microsecond}, {"busy", 0}} {
		b.Run(mode.name, func(b *testing.B) {
			c, wait := startUnixEcho(b)
			rtts := make([]time.Duration, 0, b.N)
			buf := make([]byte, 1)
			for b.Loop() {
				if mode.gap > 0 {
					b.StopTimer()
					time.Sleep(mode.gap)
					b.StartTimer()
				}
				t := time.Now()
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Read(buf); err != nil {
					b.Fatal(err)
				}
				rtts = append(rtts, time.Since(t))
			}
			c.Close() // the echo process exits when it reads EOF
			if err := wait(); err != nil {
				b.Fatalf("echo process: %v", err)
			}
			for _, p := range []struct {
				q    float64
				name string
			}{{0.5, "rtt-p50-µs"}, {0.9, "rtt-p90-µs"}, {0.99, "rtt-p99-µs"}} {
				b.ReportMetric(pctMS(rtts, p.q)*1000, p.name)
			}
		})
	}
}

// startUnixEcho starts an echo process (hopEcho) that dials a unix
// socket, and returns its connection and what waits for it to end (once
// the connection is closed).
func startUnixEcho(tb testing.TB) (net.Conn, func() error) {
	path := filepath.Join(tb.TempDir(), "echo.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), hopEchoEnv+"="+path)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		tb.Fatal(err)
	}
	return c, cmd.Wait
}

// echoes are echo processes (hopEcho) for BenchmarkPauseFloor's
// hand-offs: one reached over a unix socket, and one listening on each
// server's control-network address, reached from each other server's
// namespace.
type echoes struct {
	local net.Conn
	conns map[[2]*testbed.Host]net.Conn // by [from, to]
}

// echoPort is the port of the echo processes on the control network.
const echoPort = 7390

// startEchoes starts the echo processes for hosts and connects to them;
// the test's cleanup stops them.
func startEchoes(tb testing.TB, hosts []*testbed.Host) *echoes {
	e := &echoes{conns: map[[2]*testbed.Host]net.Conn{}}
	var wait func() error
	e.local, wait = startUnixEcho(tb)
	tb.Cleanup(func() {
		e.local.Close() // the echo process ends at EOF
		wait()
	})
	for _, h := range hosts {
		addr := netip.AddrPortFrom(h.Ctl4, echoPort).String()
		cmd := h.CommandEnv(context.Background(), []string{hopEchoEnv + "=" + hopEchoListen + addr}, os.Args[0], "-test.run=^$")
		cmd.Stderr = os.Stderr
		stdin, err := cmd.StdinPipe()
		if err != nil {
			tb.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() {
			stdin.Close()
			if err := cmd.Wait(); err != nil {
				tb.Errorf("echo process on %s: %v", h.Name, err)
			}
		})
	}
	for _, from := range hosts {
		for _, to := range hosts {
			if from == to {
				continue
			}
			addr := netip.AddrPortFrom(to.Ctl4, echoPort).String()
			var c net.Conn
			pool.Eventually(tb, 10*time.Second, "the echo process on "+to.Name, func() (bool, string) {
				var err error
				in(tb, from, func() error {
					c, err = net.DialTimeout("tcp4", addr, time.Second)
					return nil
				})
				return err == nil, fmt.Sprint(err)
			})
			tb.Cleanup(func() { c.Close() })
			e.conns[[2]*testbed.Host{from, to}] = c
		}
	}
	return e
}

// roundTrip sends a byte on c, an echo process's connection, and waits
// for it back.
func (e *echoes) roundTrip(c net.Conn) error {
	b := []byte{1}
	if _, err := c.Write(b); err != nil {
		return err
	}
	_, err := io.ReadFull(c, b)
	return err
}

// hopPlan is the hand-offs BenchmarkPauseFloor adds to a migration from
// host from to host to, with s1 the steering point: only the transfer's
// round trip, or (all) every one the sub-benchmark "handoffs" lists. A
// nil plan adds none.
type hopPlan struct {
	e            *echoes
	from, to, s1 *testbed.Host
	all          bool
}

// beforeHold makes the round trips that come before the hold: the
// application's hand-off (standing in for the commit's message too),
// and beside it the hold's request to a steering point on another host.
func (h *hopPlan) beforeHold(tb testing.TB) {
	if h == nil || !h.all {
		return
	}
	held := make(chan error, 1)
	if h.from != h.s1 {
		go func() { held <- h.e.roundTrip(h.e.conns[[2]*testbed.Host{h.from, h.s1}]) }()
	} else {
		held <- nil
	}
	err := h.e.roundTrip(h.e.local)
	if err := errors.Join(err, <-held); err != nil {
		tb.Fatal(err)
	}
}

// transfer makes the transfer's round trip with the target's host.
func (h *hopPlan) transfer(tb testing.TB) {
	if h == nil {
		return
	}
	if err := h.e.roundTrip(h.e.conns[[2]*testbed.Host{h.from, h.to}]); err != nil {
		tb.Fatal(err)
	}
}

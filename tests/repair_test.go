package tests

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// flow is one test connection between the client and s1 and what each end
// has done to it so far.
type flow struct {
	t              *testing.T
	bed            *testbed.Bed
	client, server *net.TCPConn
	port           uint16
	rules          *flowRules
	up, down       stream.Half
	serverV        *stream.Verifier
}

func (f *flow) clientWrite(n int) {
	f.t.Helper()
	if _, err := io.Copy(f.client, f.up.Pattern.Reader(f.up.Sent, int64(n))); err != nil {
		f.t.Fatalf("client write: %v", err)
	}
	f.up.Sent += int64(n)
}

func (f *flow) serverWrite(n int) {
	f.t.Helper()
	if _, err := io.Copy(f.server, f.down.Pattern.Reader(f.down.Sent, int64(n))); err != nil {
		f.t.Fatalf("server write: %v", err)
	}
	f.down.Sent += int64(n)
}

func (f *flow) serverRead(n int) {
	f.t.Helper()
	if _, err := io.CopyN(f.serverV, f.server, int64(n)); err != nil {
		f.t.Fatalf("server read: %v", err)
	}
}

func (f *flow) clientFIN() {
	f.t.Helper()
	if err := f.client.CloseWrite(); err != nil {
		f.t.Fatal(err)
	}
	f.up.FIN = true
}

func (f *flow) serverFIN() {
	f.t.Helper()
	if err := f.server.CloseWrite(); err != nil {
		f.t.Fatal(err)
	}
	f.down.FIN = true
}

// await waits until s1's socket is in state want with recvQ bytes unread
// and (when sendQ ≥ 0) sendQ bytes unacknowledged. Like the kernel's
// sock_diag, both counts include a FIN (one sequence number).
func (f *flow) await(want repair.TCPState, recvQ, sendQ int) {
	f.t.Helper()
	eventually(f.t, 10*time.Second, "s1's socket to settle in "+want.String(), func() (bool, string) {
		st, rq, sq, ok := sockState(f.t, f.bed.S1, f.port)
		return ok && st == want && int(rq) == recvQ && (sendQ < 0 || int(sq) == sendQ),
			st.String() + " rq=" + strconv.Itoa(int(rq)) + " sq=" + strconv.Itoa(int(sq))
	})
}

// prepareClosing brings the flow to CLOSING on s1: both FINs sent, neither
// acknowledged (the client's host drops the server's segments).
func prepareClosing(f *flow) {
	f.rules.blockClient(f.t)
	f.serverWrite(2000)
	f.serverFIN()
	f.clientWrite(1500)
	f.clientFIN()
	f.await(repair.StateClosing, 1501, 2001)
}

// repairCase is one connection state migrated from s1 to s2.
type repairCase struct {
	name       string
	serverBuf  int // forced server buffers, 0 = default
	clientRBuf int // client receive buffer, 0 = default
	prepare    func(f *flow)
	want       repair.TCPState
	check      func(t *testing.T, st *repair.State) // what the capture must show
	restored   func(t *testing.T, c *net.TCPConn)   // what the restored socket must show
	post       int64                                // bytes each open side sends after the move
	// finFirst waits, before the commit, for the client's retransmitted
	// FIN to reach the restored socket (still in repair mode), so that the
	// commit must not replay it.
	finFirst bool
	// noResend: the restored socket must send the client nothing it
	// already has (the client then sends no DSACK for old data).
	noResend bool
	// dataFirst: the client sends this many bytes after the switch and
	// before the commit, which must reach the restored socket (still in
	// repair mode) at once: without a retransmission timeout.
	dataFirst int
}

// appOpts are socket options an application sets and would miss if the
// migration dropped them.
var appOpts = repair.Sockopts{NoDelay: false, Cork: false, KeepAlive: true, KeepIdle: 33, KeepIntvl: 7, KeepCnt: 4,
	UserTimeout: 12345, Congestion: "reno", NotSentLowat: 16384, TOS: 0x28, Mark: 0x77, Priority: 5}

func setAppOpts(t *testing.T, c *net.TCPConn, v6 bool) {
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	tosLevel, tos := syscall.IPPROTO_IP, syscall.IP_TOS
	if v6 {
		tosLevel, tos = syscall.IPPROTO_IPV6, 0x43 // IPV6_TCLASS
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, o := range [][3]int{
			{syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 0},
			{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
			{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, 33},
			{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, 7},
			{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, 4},
			{syscall.IPPROTO_TCP, 18, 12345}, // TCP_USER_TIMEOUT
			{syscall.IPPROTO_TCP, 25, 16384}, // TCP_NOTSENT_LOWAT
			{tosLevel, tos, 0x28},
			{syscall.SOL_SOCKET, syscall.SO_MARK, 0x77},
			{syscall.SOL_SOCKET, syscall.SO_PRIORITY, 5},
		} {
			if serr == nil {
				serr = syscall.SetsockoptInt(int(fd), o[0], o[1], o[2])
			}
		}
		if serr == nil {
			serr = syscall.SetsockoptString(int(fd), syscall.IPPROTO_TCP, 13, "reno") // TCP_CONGESTION
		}
	})
	if err = errors.Join(err, serr); err != nil {
		t.Fatal(err)
	}
}

func optsOf(st *repair.State) repair.Sockopts {
	o := st.Sockopts
	o.RcvBuf, o.SndBuf = 0, 0
	return o
}

const mib = 1 << 20

func repairCases() []repairCase {
	return []repairCase{
		{name: "established-idle", want: repair.StateEstablished, post: 10000,
			prepare: func(f *flow) { f.await(repair.StateEstablished, 0, 0) }},
		{name: "recv-queue", want: repair.StateEstablished, post: 10000,
			prepare: func(f *flow) {
				f.clientWrite(5000)
				f.serverRead(1200)
				f.await(repair.StateEstablished, 3800, 0)
			},
			check: func(t *testing.T, st *repair.State) {
				if len(st.RecvQueue) != 3800 {
					t.Errorf("receive queue %d bytes, want 3800", len(st.RecvQueue))
				}
			}},
		{name: "send-unacked-and-unsent", want: repair.StateEstablished, post: 10000, serverBuf: 4 * mib,
			prepare: func(f *flow) {
				// The client drops everything from s1: what s1 sends stays
				// unacknowledged, and beyond the initial congestion window it
				// stays unsent.
				f.rules.blockClient(f.t)
				f.serverWrite(300000)
				f.await(repair.StateEstablished, 0, 300000)
			},
			check: func(t *testing.T, st *repair.State) {
				if len(st.SendQueue) != 300000 || st.Unsent == 0 || int(st.Unsent) >= len(st.SendQueue) {
					t.Errorf("send queue %d bytes with %d unsent; want 300000 with some sent and some unsent", len(st.SendQueue), st.Unsent)
				}
			}},
		{name: "large-queues-4MiB-each-way", want: repair.StateEstablished, post: mib, serverBuf: 32 * mib, clientRBuf: 4096,
			prepare: func(f *flow) {
				f.clientWrite(5 * mib)
				f.serverWrite(5 * mib)
				f.await(repair.StateEstablished, 5*mib, -1)
			},
			check: func(t *testing.T, st *repair.State) {
				if len(st.RecvQueue) < 4*mib || len(st.SendQueue) < 4*mib {
					t.Errorf("queues %d received, %d to send; want ≥ 4 MiB each", len(st.RecvQueue), len(st.SendQueue))
				}
			}},
		{name: "socket-options", want: repair.StateEstablished, post: 10000,
			prepare: func(f *flow) {
				setAppOpts(f.t, f.server, f.server.LocalAddr().(*net.TCPAddr).IP.To4() == nil)
				f.clientWrite(100)
				f.await(repair.StateEstablished, 100, 0)
			},
			check: func(t *testing.T, st *repair.State) {
				if got := optsOf(st); got != appOpts {
					t.Errorf("captured options %+v\nwant %+v", got, appOpts)
				}
			},
			restored: func(t *testing.T, c *net.TCPConn) {
				fr, err := repair.Freeze(c)
				if err != nil {
					t.Fatal(err)
				}
				st, err := fr.Capture()
				if err := errors.Join(err, fr.Thaw()); err != nil {
					t.Fatal(err)
				}
				if got := optsOf(st); got != appOpts {
					t.Errorf("restored options %+v\nwant %+v", got, appOpts)
				}
			}},
		{name: "fin-wait1", want: repair.StateFinWait1, post: 10000,
			prepare: func(f *flow) {
				f.clientWrite(1000)
				f.rules.blockClient(f.t)
				f.serverWrite(5000)
				f.serverFIN()
				f.await(repair.StateFinWait1, 1000, 5001) // the FIN counts in the queue
			}},
		{name: "fin-wait2", want: repair.StateFinWait2, post: 10000, noResend: true,
			prepare: func(f *flow) {
				f.serverWrite(5000)
				f.serverFIN()
				f.clientWrite(700)
				f.await(repair.StateFinWait2, 700, 0)
			}},
		{name: "fin-wait2-data-before-commit", want: repair.StateFinWait2, post: 10000, noResend: true, dataFirst: 900,
			prepare: func(f *flow) {
				f.serverWrite(5000)
				f.serverFIN()
				f.clientWrite(700)
				f.await(repair.StateFinWait2, 700, 0)
			}},
		{name: "fin-wait1-data-before-commit", want: repair.StateFinWait1, post: 10000, dataFirst: 900,
			prepare: func(f *flow) {
				// The client has the data and the FIN; s1 never hears
				// of it (the client's segments are dropped on s1).
				f.rules.hold(f.t)
				f.serverWrite(5000)
				f.serverFIN()
				f.await(repair.StateFinWait1, 0, 5001)
				eventually(f.t, 10*time.Second, "the client to have the server's data and FIN", func() (bool, string) {
					st, rq, _, ok := sockState(f.t, f.bed.Client, uint16(f.client.LocalAddr().(*net.TCPAddr).Port))
					return ok && st == repair.StateCloseWait && rq == 5001, fmt.Sprintf("%v rq=%d", st, rq)
				})
			}},
		{name: "close-wait", want: repair.StateCloseWait, post: 10000,
			prepare: func(f *flow) {
				f.clientWrite(3000)
				f.clientFIN()
				f.serverWrite(2000)
				f.await(repair.StateCloseWait, 3001, 0)
			}},
		{name: "last-ack", want: repair.StateLastAck,
			prepare: func(f *flow) {
				f.clientWrite(3000)
				f.clientFIN()
				f.await(repair.StateCloseWait, 3001, 0)
				f.rules.blockClient(f.t)
				f.serverWrite(4000)
				f.serverFIN()
				f.await(repair.StateLastAck, 3001, 4001)
			}},
		{name: "closing-peer-fin-first", want: repair.StateClosing, finFirst: true,
			prepare: prepareClosing},
		{name: "closing", want: repair.StateClosing,
			prepare: prepareClosing},
	}
}

// TestRepairAcrossHosts freezes a connection on s1 in each state, moves its
// state to s2 and restores it there behind address rewriting; the client
// keeps talking to s1's address and must see every byte exactly once, in
// order, both ways, with no RST and no error.
func TestRepairAcrossHosts(t *testing.T) {
	testbed.RequireNetns(t) // enters the hosts' namespaces from the test process
	bed := testbed.ForTest(t)
	port := uint16(7000)
	for _, v6 := range []bool{false, true} {
		family := "ipv4"
		if v6 {
			family = "ipv6"
		}
		for _, tc := range repairCases() {
			port++
			t.Run(family+"/"+tc.name, func(t *testing.T) {
				w := watchPortRSTsApart(t, bed.Client, port, addr(bed.S1, false), addr(bed.S1, true))
				// The client's connections the kernel aborted
				// (TCPAbortOnData, ...OnClose, ...), and the DSACKs it
				// sent for data it already had.
				const resent = "TCPDSACKOldSent"
				grown := clientTCPExtGrowth(t, bed.Client, func(n string) bool { return strings.HasPrefix(n, "TCPAbort") || n == resent })
				runRepairCase(t, bed, v6, port, tc, w.forgetFIN)
				aborts := grown()
				if n := aborts[resent]; tc.noResend && n != 0 {
					t.Errorf("the client got %d segments it already had from the restored socket (it answered with DSACKs)", n)
				}
				delete(aborts, resent)
				stale, late := w.stale(), w.late()
				if in, out := w.rsts(); in != 0 || out != 0 {
					t.Fatalf("the client saw %d RSTs and sent %d (and, for the connection once it had ended, saw %d and sent %d)", in, out, late, stale)
				}
				if len(aborts) > 0 {
					t.Fatalf("the client's kernel aborted connections: %v", aborts)
				}
				if stale > 0 || late > 0 {
					t.Logf("after the connection had ended on their sender's side, the client sent %d RSTs and received %d (not counted: answers to reordered or duplicate segments; the passive closer keeps no TIME_WAIT)", stale, late)
				}
			})
		}
	}
}

// runRepairCase runs tc on port; live runs once the restored socket is
// live.
func runRepairCase(t *testing.T, bed *testbed.Bed, v6 bool, port uint16, tc repairCase, live func()) {
	client, server := connect(t, bed.Client, bed.S1, v6, port, tc.serverBuf, tc.clientRBuf)
	deadline := time.Now().Add(60 * time.Second)
	client.SetDeadline(deadline)
	server.SetDeadline(deadline)
	seed := stream.Pattern(time.Now().UnixNano())
	f := &flow{t: t, bed: bed, client: client, server: server, port: port,
		rules: newFlowRules(bed.Client, client, server, bed.S1, bed.S2),
		up:    stream.Half{Pattern: seed}, down: stream.Half{Pattern: seed + 1}}
	f.serverV = &stream.Verifier{Pattern: f.up.Pattern}
	tc.prepare(f)

	// The migration transaction, by hand: hold, freeze + capture, transfer
	// (encode/decode), restore on s2 with s2's address, steer, commit.
	f.rules.hold(t)
	frozen, err := repair.Freeze(server)
	if err != nil {
		t.Fatal(err)
	}
	st, err := frozen.Capture()
	if err != nil {
		t.Fatal(err)
	}
	if st.TCPState != tc.want {
		t.Fatalf("captured %v, want %v", st, tc.want)
	}
	if tc.check != nil {
		tc.check(t, st)
	}
	blob, err := st.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if err := frozen.Discard(); err != nil {
		t.Fatal(err)
	}
	s1Sent := countLocalOut(t, bed.S1, port) // s1 let go of the connection
	got, err := repair.Decode(blob)
	if err != nil {
		t.Fatal(err)
	}
	var restored *repair.Restored
	in(t, bed.S2, func() (err error) {
		restored, err = repair.Restore(got, repair.RestoreOptions{Local: netip.AddrPortFrom(addr(bed.S2, v6), port)})
		return err
	})
	f.rules.steer(t)
	f.rules.unblockClient(t)
	if tc.finFirst {
		eventually(t, 10*time.Second, "the client's retransmitted FIN to reach s2's restored socket", func() (bool, string) {
			st, _, _, ok := sockState(t, bed.S2, port)
			return ok && st == repair.StateCloseWait, st.String()
		})
	}
	if tc.dataFirst > 0 {
		info0 := clientInfo(t, bed, client)
		f.clientWrite(tc.dataFirst)
		want := len(got.RecvQueue) + tc.dataFirst
		eventually(t, 10*time.Second, "the client's data to reach s2's restored socket before the commit", func() (bool, string) {
			st, rq, _, ok := sockState(t, bed.S2, port)
			return ok && int(rq) == want, fmt.Sprintf("%v rq=%d, want %d", st, rq, want)
		})
		if info := clientInfo(t, bed, client); info.TotalRTO != info0.TotalRTO {
			t.Errorf("the client's data before the commit cost it %d retransmission timeouts", info.TotalRTO-info0.TotalRTO)
		}
	}
	if err := restored.Commit(); err != nil {
		t.Fatal(err)
	}
	live()
	moved, err := restored.Conn()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { moved.Close() })
	if tc.restored != nil {
		tc.restored(t, moved)
	}
	moved.SetDeadline(deadline)
	if err := stream.Finish(client, moved, f.up, f.down, tc.post, f.serverV); err != nil {
		t.Fatal(err)
	}
	if ra := client.RemoteAddr().(*net.TCPAddr).AddrPort(); ra.Addr().Unmap() != addr(bed.S1, v6) {
		t.Fatalf("client talks to %v, want s1's address", ra)
	}
	if n := s1Sent(); n != 0 {
		t.Fatalf("s1 sent %d segments from port %d after discarding the connection's frozen socket", n, port)
	}
}

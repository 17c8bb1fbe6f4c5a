package tests

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// TestStreamLoopGateway: with gateway steering, a client streams from
// mtcp-bulk on s1 (through the gateway) while its connection moves
// s1 -> s2 -> s3 -> s1 three times over; IPv4 and IPv6. See streamLoop
// for what the client checks.
func TestStreamLoopGateway(t *testing.T) {
	streamLoop(t, "gateway", 9, 256<<10)
}

// TestStreamLoopForward is TestStreamLoopGateway with forward steering (s1
// forwards the flow to wherever it lives) and 100 migrations around the
// loop s1 -> s2 -> s3 -> s1 per address family.
func TestStreamLoopForward(t *testing.T) {
	streamLoop(t, "forward", 100, 64<<10)
}

// streamLoop starts a pool with the given steering and mtcp-bulk, and for
// IPv4 and IPv6 streams an endless pattern from s1's address to the client
// while moving the connection hops times around s1 -> s2 -> s3 -> s1. The
// client verifies every byte (exactly once, in order) as it reads; before
// each hop it waits for step more verified bytes (the stream flows from
// wherever the connection lives) and sends upload bytes of its own (in
// flight around the move), which mtcp-bulk checks byte by byte: at the
// first wrong one it ends the session, and the stream stops. At the end it
// closes its side, reads and verifies the rest up to the server's FIN (the
// server has consumed everything the client sent), and checks that it had
// no retransmission timeout, saw no RST of the flow before the start of the
// orderly close, and saw no packet of the flow from or to any address but
// s1's.
func streamLoop(t *testing.T, steering string, hops int, step int64) {
	const upload = 64 << 10
	bed := testbed.ForTest(t)
	foreign := watchForeign(t, bed.Client, bed.S1, 7000)
	// A wrong byte of the upload ends the session at the server, which
	// the client would take for the stream's end if it came last: the
	// server's record of it fails the test.
	p := pool.Start(t, bed, pool.Options{Steering: steering, App: "mtcp-bulk", Quiet: true,
		FailOn: []string{"session ended: bad upload"}})
	loop := []*testbed.Host{bed.S1, bed.S2, bed.S3}
	var late []func() (int, int)
	// No subtests: the pool reports its failures to t.
	for _, v6 := range []bool{false, true} {
		family := map[bool]string{false: "IPv4", true: "IPv6"}[v6]
		s := startStream(t, p, v6)
		rsts := watchFlowRSTs(t, bed.Client, s.c)
		waitServed(t, p, bed.S1, s.c)
		up := stream.Pattern(s.seed ^ 0xfeed)
		var sent int64
		for i := range hops {
			from, to := loop[i%3], loop[(i+1)%3]
			s.waitFor(t, s.verified()+step)
			// The upload goes out in pieces while the connection moves,
			// so that some of it is on its way during the move.
			uploaded := make(chan error, 1)
			go func(off int64) {
				var err error
				for k := int64(0); k < upload && err == nil; k += upload / 8 {
					_, err = io.Copy(s.c, up.Reader(off+k, upload/8))
					time.Sleep(time.Millisecond)
				}
				uploaded <- err
			}(sent)
			p.Migrate(from, to, s.c)
			select {
			case err := <-uploaded:
				if err != nil {
					t.Fatalf("%s hop %d: client upload: %v", family, i, err)
				}
			case <-time.After(20 * time.Second):
				// The connection is stuck: the pool's logs follow.
				info := clientInfo(t, bed, s.c)
				t.Fatalf("%s hop %d (%s -> %s): the client's upload is stuck after 20s; client: %d bytes acknowledged of %d, %d unacknowledged segments, %d RTOs, %d retransmissions",
					family, i, from.Name, to.Name, info.BytesAcked, 1+16+sent+upload, info.Unacked, info.TotalRTO, info.TotalRetrans)
			}
			sent += upload
			waitServed(t, p, to, s.c)
		}
		// Once the server host has acknowledged the whole upload, its
		// check has read it by the time more of the stream arrives: a
		// wrong byte would have stopped the stream.
		eventually(t, 20*time.Second, "the upload to be acknowledged", func() (bool, string) {
			acked := clientInfo(t, bed, s.c).BytesAcked
			return acked >= 1+16+uint64(sent), fmt.Sprintf("%d bytes acknowledged", acked) // SYN, request, upload
		})
		s.waitFor(t, s.verified()+4*step)
		// The testbed loses no packet: a retransmission timeout of the
		// client's is a migration's doing. (Fast retransmits are not
		// counted against it: held segments re-delivered after the
		// switch can reach the target behind newer ones, which the
		// target then reports missing.)
		info := clientInfo(t, bed, s.c)
		if info.TotalRTO != 0 {
			t.Errorf("%s: the client had %d retransmission timeouts (%d segments retransmitted in all)", family, info.TotalRTO, info.TotalRetrans)
		}
		// Counted up to the orderly close, which is no migration's: once
		// the server's socket has closed (the passive closer keeps no
		// TIME_WAIT), a segment of the client's that arrives late,
		// reordered on the way, draws a RST the client ignores, as on
		// any network. A RST that mattered during the close would end
		// the client's read with an error instead of EOF (finish).
		in, out := rsts()
		if in != 0 || out != 0 {
			t.Errorf("%s: the client saw %d RSTs and sent %d", family, in, out)
		}
		s.finish(t)
		late = append(late, func() (int, int) { i, o := rsts(); return i - in, o - out })
		t.Logf("%s: %d migrations (%s steering), %d bytes verified, %d bytes uploaded, %d segments retransmitted by the client", family, hops, steering, s.verified(), sent, info.TotalRetrans)
	}
	for _, rsts := range late {
		if in, out := rsts(); in+out != 0 {
			t.Logf("during or after the close: %d RSTs to the client and %d from it (late segments)", in, out)
		}
	}
	if in, out := foreign(); in != 0 || out != 0 {
		t.Errorf("the client received %d packets of the service from an address other than s1's and sent %d to one", in, out)
	}
}

// clientStream is a client of mtcp-bulk reading an endless stream and
// verifying it in a goroutine.
type clientStream struct {
	c    *net.TCPConn
	seed stream.Pattern

	mu   sync.Mutex
	n    int64 // bytes verified
	err  error // the first read or verification error (io.EOF at the end)
	done chan struct{}
}

// startStream dials mtcp-bulk on s1 from the client host and asks for an
// endless stream.
func startStream(t *testing.T, p *pool.Pool, v6 bool) *clientStream {
	t.Helper()
	c := p.Dial(p.Bed.S1, v6)
	s := &clientStream{c: c, seed: stream.Pattern(time.Now().UnixNano()), done: make(chan struct{})}
	req := binary.BigEndian.AppendUint64(nil, uint64(s.seed))
	req = binary.BigEndian.AppendUint64(req, 1<<63) // endless, the upload checked
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	go s.read()
	return s
}

func (s *clientStream) read() {
	defer close(s.done)
	v := &stream.Verifier{Pattern: s.seed}
	buf := make([]byte, 64<<10)
	for {
		n, err := s.c.Read(buf)
		if n > 0 {
			if _, verr := v.Write(buf[:n]); verr != nil {
				err = verr
			}
		}
		s.mu.Lock()
		s.n = v.N
		if err != nil {
			s.err = err
		}
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (s *clientStream) verified() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// waitFor waits until n bytes are verified, failing the test on an error.
func (s *clientStream) waitFor(t *testing.T, n int64) {
	t.Helper()
	eventually(t, 20*time.Second, fmt.Sprintf("the client to verify %d bytes", n), func() (bool, string) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.err != nil {
			t.Fatalf("client, after %d bytes verified: %v", s.n, s.err)
		}
		return s.n >= n, fmt.Sprintf("%d verified", s.n)
	})
}

// finish shuts down the client's side, which ends the session at the
// server, and waits for the server's FIN, every byte before it verified.
func (s *clientStream) finish(t *testing.T) {
	t.Helper()
	if err := s.c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("the server did not end the session within 20s of the client's FIN (%d bytes verified)", s.verified())
	}
	if s.err != io.EOF {
		t.Fatalf("client, after %d bytes verified: %v", s.n, s.err)
	}
}

// waitServed waits until h's mtcpd lists client connection c among the
// connections it serves: a migration asked for before the application
// registered the connection is refused.
func waitServed(t *testing.T, p *pool.Pool, h *testbed.Host, c *net.TCPConn) {
	t.Helper()
	waitServedFlow(t, p, h, unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort()).String())
}

// waitServedFlow waits until h's mtcpd lists the connection of client
// address flow (IP:PORT) as served by its application.
func waitServedFlow(t *testing.T, p *pool.Pool, h *testbed.Host, flow string) {
	t.Helper()
	eventually(t, 10*time.Second, h.Name+" to serve "+flow, func() (bool, string) {
		cs, err := p.Admin(h).Conns(context.Background())
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, cn := range cs {
			if cn.Client == flow && cn.App != "" {
				return true, ""
			}
			seen = append(seen, cn.Client)
		}
		return false, fmt.Sprintf("serving %v", seen)
	})
}

// watchForeign counts, in the client host's namespace, the TCP packets of
// service port port that come from, or go to, an address other than s's
// service addresses: with the client's view unchanged there are none. It
// returns a function reading both counters.
func watchForeign(t *testing.T, client, s *testbed.Host, port uint16) func() (in, out int) {
	t.Helper()
	nft(t, client, fmt.Sprintf(`table inet mtcpforeign {
	counter from_other {}
	counter to_other {}
	chain pre {
		type filter hook prerouting priority -400
		tcp sport %[1]d ip saddr != %[2]s counter name from_other
		tcp sport %[1]d ip6 saddr != %[3]s counter name from_other
	}
	chain out {
		type filter hook output priority -400
		tcp dport %[1]d ip daddr != %[2]s counter name to_other
		tcp dport %[1]d ip6 daddr != %[3]s counter name to_other
	}
}
`, port, s.LAN4, s.LAN6))
	return func() (int, int) {
		return nftCounter(t, client, "mtcpforeign", "from_other"), nftCounter(t, client, "mtcpforeign", "to_other")
	}
}

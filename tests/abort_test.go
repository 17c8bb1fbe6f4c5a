package tests

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/daemon"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// The abort paths of the migration transaction and the control channel's
// refusals, end to end. In every test a kv session lives on s1 and must
// come out of the failed attempt as if nothing had happened: still served
// by s1, with its keys and its command count, no RST seen or sent by the
// client, and nothing left behind for the flow — no element in table
// inet mtcp on s1 or s2 (hold, forward, reply rewrite), no socket for it on
// s2, no entry in s2's connection list.

// abortPeerPort is the port mtcpd's peer server listens on in the pool
// harness (tests/pool: peerPort).
const abortPeerPort = 7700

// abortSession is a kv session with s1 whose every command is counted, so
// that COUNT can be checked exactly (it counts itself).
type abortSession struct {
	kv
	client, service  netip.AddrPort // the flow as its client sees it
	colour           string         // value of key colour, set at the start
	sent             int            // commands sent so far, answered or not
	pendingReplyWant []string       // replies owed for commands sent with send
}

func newAbortSession(t *testing.T, p *pool.Pool, bed *testbed.Bed, v6 bool) *abortSession {
	t.Helper()
	c := p.Dial(bed.S1, v6)
	s := &abortSession{kv: kv{t: t, c: c, rd: bufio.NewReader(c)},
		client:  unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort()),
		service: unmapAP(c.RemoteAddr().(*net.TCPAddr).AddrPort()),
		colour:  fmt.Sprintf("blue-%d", time.Now().UnixNano()%1000)}
	s.expect("SET colour "+s.colour, "OK")
	s.expect("HOST", "s1")
	s.expect("COUNT", "3")
	// The application tells its mtcpd about a connection on its own
	// time: wait until s1's daemon serves it, or the migration may not
	// find it (seen once under CI's load).
	eventually(t, 10*time.Second, "s1's mtcpd to serve "+s.String(), func() (bool, string) {
		cs, err := p.Admin(bed.S1).Conns(context.Background())
		for _, c := range cs {
			if ap, perr := netip.ParseAddrPort(c.Client); perr == nil && unmapAP(ap) == s.client {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d connections, %v", len(cs), err)
	})
	return s
}

func (s *abortSession) String() string {
	return fmt.Sprintf("session %v->%v", s.client, s.service)
}

// expect runs cmd and checks its reply.
func (s *abortSession) expect(cmd, want string) {
	s.t.Helper()
	s.sent++
	if got := s.do(cmd); got != want {
		s.t.Fatalf("%s: %s = %q, want %q", s, cmd, got, want)
	}
}

// send writes cmd without waiting for its reply (which must be want).
func (s *abortSession) send(cmd, want string) {
	s.t.Helper()
	s.sent++
	s.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(s.c, cmd+"\n"); err != nil {
		s.t.Fatalf("%s: %s: %v", s, cmd, err)
	}
	s.pendingReplyWant = append(s.pendingReplyWant, want)
}

// awaitReplies reads the replies owed for commands sent with send and
// returns when the last one arrived. From now on failures are t's (a
// subtest's, say).
func (s *abortSession) awaitReplies(t *testing.T) time.Time {
	t.Helper()
	s.t = t
	for _, want := range s.pendingReplyWant {
		s.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		line, err := s.rd.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: reply to a command sent during the attempt: %v", s, err)
		}
		if got := strings.TrimSpace(line); got != want {
			t.Fatalf("%s: reply to a command sent during the attempt = %q, want %q", s, got, want)
		}
	}
	s.pendingReplyWant = nil
	return time.Now()
}

// check asserts that the session is alive on s1 with its state intact:
// the replies owed come first, then HOST, the key set at the start, and
// the command count.
func (s *abortSession) check(t *testing.T) {
	t.Helper()
	s.awaitReplies(t)
	s.expect("HOST", "s1")
	s.expect("GET colour", s.colour)
	s.sent++
	if got := s.do("COUNT"); got != strconv.Itoa(s.sent) {
		t.Fatalf("%s: COUNT = %q, want %d: the session lost or repeated commands", s, got, s.sent)
	}
	if ra := unmapAP(s.c.RemoteAddr().(*net.TCPAddr).AddrPort()); ra != s.service {
		t.Fatalf("%s: the client now talks to %v", s, ra)
	}
}

// abortCtx is a context for one command or request of a test.
func abortCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// nftElem is one element of a set or map of table inet mtcp, as
// `nft -j list ruleset` shows it.
type nftElem struct {
	Set  string
	JSON string // the element, for messages
	keys [][]any
}

// mtcpElems returns every set and map element of table inet mtcp on h.
func mtcpElems(t *testing.T, h *testbed.Host) []nftElem {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Run(ctx, "nft", "-j", "list", "ruleset")
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("%s: nft -j list ruleset: %v\n%s", h.Name, err, out)
	}
	var elems []nftElem
	for _, obj := range doc.Nftables {
		for _, kind := range []string{"set", "map"} {
			raw, ok := obj[kind]
			if !ok {
				continue
			}
			var s struct {
				Family, Table, Name string
				Elem                []json.RawMessage
			}
			if err := json.Unmarshal(raw, &s); err != nil {
				t.Fatalf("%s: nft %s: %v", h.Name, kind, err)
			}
			if s.Family != "inet" || s.Table != "mtcp" {
				continue
			}
			for _, e := range s.Elem {
				var v any
				if err := json.Unmarshal(e, &v); err != nil {
					t.Fatalf("%s: nft element of %s: %v", h.Name, s.Name, err)
				}
				elems = append(elems, nftElem{Set: s.Name, JSON: string(e), keys: concats(v)})
			}
		}
	}
	return elems
}

// concats collects the "concat" lists (keys and values) inside v.
func concats(v any) [][]any {
	var out [][]any
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if l, ok := x.([]any); ok && k == "concat" {
				out = append(out, l)
				continue
			}
			out = append(out, concats(x)...)
		}
	case []any:
		for _, x := range v {
			out = append(out, concats(x)...)
		}
	}
	return out
}

// about reports whether e belongs to the flow of client: every element
// kind's key holds the client's address followed by its port.
func (e nftElem) about(client netip.AddrPort) bool {
	for _, k := range e.keys {
		for i := 0; i+1 < len(k); i++ {
			a, _ := k[i].(string)
			p, _ := k[i+1].(float64)
			if a == client.Addr().String() && p == float64(client.Port()) {
				return true
			}
		}
	}
	return false
}

// flowElems returns h's elements of table inet mtcp for the flow of
// client, in sets whose name starts with prefix ("" for all).
func flowElems(t *testing.T, h *testbed.Host, client netip.AddrPort, prefix string) []nftElem {
	t.Helper()
	var out []nftElem
	for _, e := range mtcpElems(t, h) {
		if e.about(client) && strings.HasPrefix(e.Set, prefix) {
			out = append(out, e)
		}
	}
	return out
}

// socketsOf returns the lines of `ss -tan` on h whose peer is client.
func socketsOf(t *testing.T, h *testbed.Host, client netip.AddrPort) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Run(ctx, "ss", "-tanH")
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		if ap, err := netip.ParseAddrPort(f[4]); err == nil && unmapAP(ap) == client {
			lines = append(lines, strings.Join(f, " "))
		}
	}
	return lines
}

// assertHome waits until a flow that moved around the pool and came
// back to s1 left nothing behind: no element on any server or the
// gateway, and one established socket for its client, on s1.
func assertHome(t *testing.T, bed *testbed.Bed, client netip.AddrPort) {
	t.Helper()
	eventually(t, 15*time.Second, "nothing left of "+client.String()+"'s trips", func() (bool, string) {
		var left []string
		for _, h := range append(bed.Servers(), bed.Gateway) {
			for _, e := range flowElems(t, h, client, "") {
				left = append(left, h.Name+" "+e.Set+" "+e.JSON)
			}
			if l := socketsOf(t, h, client); h != bed.S1 && len(l) > 0 || h == bed.S1 && (len(l) != 1 || !strings.Contains(l[0], "ESTAB")) {
				left = append(left, fmt.Sprintf("%s sockets %q", h.Name, l))
			}
		}
		return len(left) == 0, strings.Join(left, "; ")
	})
}

// assertNoTrace checks that nothing is installed for the sessions' flows
// on any server or the gateway and that s1 still serves them from its own
// socket, and no other server has one. With s2Dead, s2's daemon is gone
// and its admin socket is not asked.
func assertNoTrace(t *testing.T, p *pool.Pool, bed *testbed.Bed, s2Dead bool, sessions ...*abortSession) {
	t.Helper()
	for _, h := range append(bed.Servers(), bed.Gateway) {
		for _, s := range sessions {
			for _, e := range flowElems(t, h, s.client, "") {
				t.Errorf("%s: table inet mtcp still holds an element of %s's flow in %s: %s", h.Name, s, e.Set, e.JSON)
			}
		}
	}
	for _, s := range sessions {
		for _, h := range []*testbed.Host{bed.S2, bed.S3} {
			if l := socketsOf(t, h, s.client); len(l) > 0 {
				t.Errorf("%s has a socket for %s's client: %q", h.Name, s, l)
			}
		}
		if l := socketsOf(t, bed.S1, s.client); len(l) != 1 || !strings.Contains(l[0], "ESTAB") {
			t.Errorf("s1 should have exactly one established socket for %s's client, has %q", s, l)
		}
	}
	s1conns, err := p.Admin(bed.S1).Conns(abortCtx(t, 10*time.Second))
	if err != nil {
		t.Fatalf("s1 conns: %v", err)
	}
	for _, s := range sessions {
		i := slices.IndexFunc(s1conns, func(c admin.Conn) bool { return c.Client == s.client.String() })
		switch {
		case i < 0:
			t.Errorf("s1's conns do not list %s: %+v", s, s1conns)
		case s1conns[i].Local != s.service.String() || s1conns[i].State != "ESTABLISHED":
			t.Errorf("s1 lists %s as %+v, want local %v, ESTABLISHED", s, s1conns[i], s.service)
		}
	}
	if s2Dead {
		return
	}
	s2conns, err := p.Admin(bed.S2).Conns(abortCtx(t, 10*time.Second))
	if err != nil {
		t.Fatalf("s2 conns: %v", err)
	}
	for _, c := range s2conns {
		for _, s := range sessions {
			if c.Client == s.client.String() {
				t.Errorf("s2's conns list %s: %+v", s, c)
			}
		}
	}
}

// TestAbortTargetFaults: a migration s1 -> s2 fails on s2's side —
// Prepare refused, s2's daemon dying when the Transfer arrives, the
// Transfer never answered — and the transaction aborts before the switch:
// an IPv4 and an IPv6 session, moved in one request, carry on at s1 with
// their state, and neither s1 nor s2 keeps anything for them.
func TestAbortTargetFaults(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault string // MTCP_FAULT of mtcpd on s2
		// wantFailed are in every failed flow's reason.
		wantFailed []string
		// s2Dies: s2's daemon exits.
		s2Dies bool
		// duringHold: send a command on each session while its flow is
		// held at s1; the answer must come once the hold is lifted.
		duringHold bool
		// minTook, maxTook bound how long the migrate request took.
		minTook, maxTook time.Duration
	}{{
		name:       "target refuses",
		fault:      "prepare-refuse",
		wantFailed: []string{"s2 refused", "fault injected (MTCP_FAULT=prepare-refuse)"},
		maxTook:    5 * time.Second,
	}, {
		name:       "target dies mid-transfer",
		fault:      "transfer-crash",
		wantFailed: []string{"peer s2: Transfer", "peer connection closed"},
		s2Dies:     true,
		maxTook:    5 * time.Second,
	}, {
		name:       "transfer times out",
		fault:      "transfer-hang",
		wantFailed: []string{"peer s2: Transfer", "deadline"},
		duringHold: true,
		minTook:    9 * time.Second, // migrate.DefaultDeadlines.Transfer, 10 s
		maxTook:    15 * time.Second,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			bed := testbed.ForTest(t)
			rsts := watchRSTs(t, bed.Client)
			p := pool.Start(t, bed, pool.Options{Env: map[string][]string{"mtcpd-s2": {"MTCP_FAULT=" + tc.fault}}})
			sessions := []*abortSession{newAbortSession(t, p, bed, false), newAbortSession(t, p, bed, true)}
			req := &admin.MigrateRequest{To: "s2"}
			for _, s := range sessions {
				req.Flows = append(req.Flows, s.client.String())
			}

			type result struct {
				rep  *admin.Report
				err  error
				took time.Duration
			}
			done := make(chan result, 1)
			mctx := abortCtx(t, 30*time.Second)
			go func() {
				start := time.Now()
				rep, err := p.Admin(bed.S1).Migrate(mctx, req)
				done <- result{rep, err, time.Since(start)}
			}()
			if tc.duringHold {
				// The hold is up for the whole Transfer phase: see it
				// (which also shows that the oracle sees holds), then
				// send a command into it.
				for _, s := range sessions {
					eventually(t, 5*time.Second, "s1 to hold "+s.String(), func() (bool, string) {
						e := flowElems(t, bed.S1, s.client, "hold")
						return len(e) == 1, fmt.Sprint(e)
					})
					s.send("SET during-hold "+s.client.String(), "OK")
				}
			}
			r := <-done
			returned := time.Now()
			t.Logf("migrate took %v: err=%v report=%+v", r.took, r.err, r.rep)
			if tc.duringHold {
				// The abort re-delivers what the hold queued: the
				// answer comes at once, not after the client's next
				// retransmission (seconds away after 10 s of backoff).
				for _, s := range sessions {
					if late := s.awaitReplies(t).Sub(returned); late > time.Second {
						t.Errorf("%s: the command sent during the hold was answered %v after the abort: it was dropped, not queued", s, late)
					}
				}
			}

			// What the operator sees: no flow moved, each failed with why.
			if r.err == nil && r.rep == nil {
				t.Fatal("migrate returned neither a report nor an error")
			}
			if r.rep != nil {
				if len(r.rep.Moved) != 0 {
					t.Errorf("report says %v moved", r.rep.Moved)
				}
				if !r.rep.Aborted {
					t.Errorf("report does not say the transaction aborted: %+v", r.rep)
				}
				for _, s := range sessions {
					why, ok := r.rep.Failed[s.client.String()]
					if !ok {
						t.Errorf("report has no failure for %s: %+v", s, r.rep)
						continue
					}
					for _, w := range tc.wantFailed {
						if !strings.Contains(why, w) {
							t.Errorf("failure of %s is %q, want it to mention %q", s, why, w)
						}
					}
				}
			} else {
				for _, w := range tc.wantFailed {
					if !strings.Contains(r.err.Error(), w) {
						t.Errorf("migrate error %q does not mention %q", r.err, w)
					}
				}
			}
			if r.took < tc.minTook || r.took > tc.maxTook {
				t.Errorf("migrate took %v, want between %v and %v", r.took, tc.minTook, tc.maxTook)
			}

			if tc.s2Dies {
				// Check that the fault did what it says: s2's daemon is
				// gone (nothing restarts it), s1's keeps serving.
				eventually(t, 5*time.Second, "s2's daemon to be gone after transfer-crash", func() (bool, string) {
					_, err := p.Admin(bed.S2).Status(abortCtx(t, 5*time.Second))
					return errors.Is(err, admin.ErrNoDaemon), fmt.Sprint(err)
				})
			}
			for _, s := range sessions {
				s.check(t)
			}
			assertNoTrace(t, p, bed, tc.s2Dies, sessions...)
			if st, err := p.Admin(bed.S1).Status(abortCtx(t, 5*time.Second)); err != nil || st.Conns != len(sessions) {
				t.Errorf("s1 status after the abort: %+v, %v; want %d conns", st, err, len(sessions))
			}
			// And the sessions keep going.
			for _, s := range sessions {
				s.expect("SET after abort", "OK")
				s.check(t)
			}
			if in, out := rsts(); in != 0 || out != 0 {
				t.Errorf("the client saw %d RSTs and sent %d", in, out)
			}
		})
	}
}

// migrateSessions asks from's mtcpd to migrate the sessions to the member
// to, and logs its answer.
func migrateSessions(t *testing.T, p *pool.Pool, from *testbed.Host, to string, sessions []*abortSession) (*admin.Report, error) {
	t.Helper()
	req := &admin.MigrateRequest{To: to}
	for _, s := range sessions {
		req.Flows = append(req.Flows, s.client.String())
	}
	rep, err := p.Admin(from).Migrate(abortCtx(t, 60*time.Second), req)
	t.Logf("migrate: err=%v report=%+v", err, rep)
	return rep, err
}

// TestAbortGatewaySwitchLost: with gateway steering, the gateway makes
// the switch s1 -> s2 but its answer is lost (MTCP_FAULT=switched-refuse,
// twice; the switch back home to s1 is answered). The source cannot tell
// whether the flows went to s2: it switches them back to itself before it
// resumes them, rather than lift a hold that is no longer there and leave
// the gateway sending them to s2, whose aborted sockets would reset them. An IPv4 and an IPv6 session
// carry on at s1 with their state, with no reset, and no host keeps
// anything for them.
func TestAbortGatewaySwitchLost(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Steering: "gateway",
		Env: map[string][]string{"mtcpd-" + bed.Gateway.Name: {"MTCP_FAULT=switched-refuse"}}})
	sessions := []*abortSession{newAbortSession(t, p, bed, false), newAbortSession(t, p, bed, true)}
	rep, err := migrateSessions(t, p, bed.S1, "s2", sessions)
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	if len(rep.Moved) != 0 || !rep.Aborted || !strings.Contains(rep.Error, "switched-refuse") || strings.Contains(rep.Error, "switching them back") {
		t.Errorf("report %+v: want nothing moved, aborted, the switch back done", rep)
	}
	for _, s := range sessions {
		if why := rep.Failed[s.client.String()]; !strings.Contains(why, "switched-refuse") {
			t.Errorf("failure of %s is %q, want it to name the fault", s, why)
		}
	}
	for _, s := range sessions {
		s.check(t)
		s.expect("SET after the lost switch", "OK")
		s.check(t)
	}
	assertNoTrace(t, p, bed, false, sessions...)
	for _, s := range sessions {
		if e := flowElems(t, bed.Gateway, s.client, ""); len(e) > 0 {
			t.Errorf("the gateway still steers %s: %v", s, e)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestSwitchRefusedKeepsHeld: s1, the source and the steering point, fails
// the first switch of a migration to s2 (MTCP_FAULT=switch-rules-refuse)
// once a command that each client sent into the hold is queued; the
// second try goes through. The commands must stay held for it and reach
// s2 with the switch: let go at the failure, they went to s1's frozen
// copy, which kept them from s2, and the clients had to send them again.
// Both sessions, IPv4 and IPv6, are reported moved and carry on at s2
// with every command once, the clients sent nothing twice and saw no
// reset, and s1 holds nothing.
func TestSwitchRefusedKeepsHeld(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Env: map[string][]string{"mtcpd-s1": {"MTCP_FAULT=switch-rules-refuse"}}})
	sessions := []*abortSession{newAbortSession(t, p, bed, false), newAbortSession(t, p, bed, true)}
	// Acknowledgements the clients delayed go out before the hold, so
	// that what it queues first, and the fault waits for, is a command.
	time.Sleep(300 * time.Millisecond)
	type result struct {
		rep *admin.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := migrateSessions(t, p, bed.S1, "s2", sessions)
		done <- result{rep, err}
	}()
	// Both are held at once (one transaction): the commands go out
	// together, well within the clients' retransmission timeouts.
	eventually(t, 5*time.Second, "s1 to hold both sessions", func() (bool, string) {
		var es []nftElem
		for _, s := range sessions {
			es = append(es, flowElems(t, bed.S1, s.client, "hold")...)
		}
		return len(es) == len(sessions), fmt.Sprint(es)
	})
	for _, s := range sessions {
		s.send("SET during-hold "+s.client.String(), "OK")
	}
	r := <-done
	if r.err != nil || len(r.rep.Moved) != len(sessions) || len(r.rep.Failed) != 0 {
		t.Fatalf("migrate: %v, %+v: want both moved", r.err, r.rep)
	}
	for _, s := range sessions {
		s.awaitReplies(t)
		s.expect("HOST", "s2")
		s.expect("GET during-hold", s.client.String())
		s.expect("GET colour", s.colour)
		s.sent++
		if got := s.do("COUNT"); got != strconv.Itoa(s.sent) {
			t.Errorf("%s: COUNT = %q, want %d: the session lost or repeated commands", s, got, s.sent)
		}
		if info := clientInfo(t, bed, s.c); info.TotalRetrans != 0 {
			t.Errorf("%s: the client sent %d segments again: what the hold queued did not wait for the switch that went through", s, info.TotalRetrans)
		}
		if e := flowElems(t, bed.S1, s.client, "hold"); len(e) != 0 {
			t.Errorf("%s: s1 still holds it: %v", s, e)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestSwitchLostRecovered: s1, the source and the steering point, fails
// both tries of a migration's switch to s2 (switch-rules-refuse=2) while
// s2 commits: the migration reports the sessions failed at the switch,
// lost maybe, their commands sent meanwhile held at s1. s1 then tries the
// switch again in the background, which goes through: the sessions carry
// on at s2 with every command, without a reset, and s1 holds nothing.
func TestSwitchLostRecovered(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Env: map[string][]string{"mtcpd-s1": {"MTCP_FAULT=switch-rules-refuse=2"}}})
	sessions := []*abortSession{newAbortSession(t, p, bed, false), newAbortSession(t, p, bed, true)}
	rep, err := migrateSessions(t, p, bed.S1, "s2", sessions)
	if err != nil || rep.Error == "" || len(rep.Moved) != 0 || rep.Aborted {
		t.Fatalf("migrate: %v, %+v: want both failed at the switch, not aborted", err, rep)
	}
	for _, s := range sessions {
		if why := rep.Failed[s.client.String()]; !strings.Contains(why, "switch") || !strings.Contains(why, "switch-rules-refuse") {
			t.Errorf("failure of %s is %q, want it at the switch, naming the fault", s, why)
		}
		s.send("SET after-lost "+s.client.String(), "OK")
	}
	for _, s := range sessions {
		s.awaitReplies(t)
		s.expect("HOST", "s2")
		s.expect("GET after-lost", s.client.String())
		s.expect("GET colour", s.colour)
		s.sent++
		if got := s.do("COUNT"); got != strconv.Itoa(s.sent) {
			t.Errorf("%s: COUNT = %q, want %d: the session lost or repeated commands", s, got, s.sent)
		}
		if e := flowElems(t, bed.S1, s.client, "hold"); len(e) != 0 {
			t.Errorf("%s: s1 still holds it: %v", s, e)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestLostSwitchHoldExpires: s1, the source and the steering point, can
// never switch a migration's flow to s2 (switch-rules-refuse=1000): the
// migration reports it failed at the switch and leaves it held at s1,
// where its client's packets would fill the queue. The hold, made by s1
// for itself, is lifted once it is older than the orphan timeout (6 s
// here, orphan-after; the two failed switches take 3 s), before s1 gives
// up its switch in the background (after a minute).
func TestLostSwitchHoldExpires(t *testing.T) {
	bed := testbed.ForTest(t)
	p := pool.Start(t, bed, pool.Options{Env: map[string][]string{"mtcpd-s1": {"MTCP_FAULT=switch-rules-refuse=1000,orphan-after=6s"}}})
	s := newAbortSession(t, p, bed, false)
	rep, err := migrateSessions(t, p, bed.S1, "s2", []*abortSession{s})
	if err != nil || !strings.Contains(rep.Failed[s.client.String()], "switch-rules-refuse") {
		t.Fatalf("migrate: %v, %+v: want the flow failed at the switch", err, rep)
	}
	if e := flowElems(t, bed.S1, s.client, "hold"); len(e) != 1 {
		t.Fatalf("s1 does not hold the flow after its switch failed: %v", e)
	}
	eventually(t, 15*time.Second, "s1 to lift the hold", func() (bool, string) {
		e := flowElems(t, bed.S1, s.client, "hold")
		return len(e) == 0, fmt.Sprint(e)
	})
}

// TestCommitAnswerLost: s1 takes s2's answer to its commit for lost with
// the connection (MTCP_FAULT=commit-answer-refuse) and asks again on a new
// connection; s2 gives the first commit's answer again. Both sessions,
// IPv4 and IPv6, are reported moved and carry on at s2 with their state,
// with no reset. (Asked again, s2 used to answer that it had no such
// transfer, and the connections, alive on s2, were reported failed.)
//
// With commit-drop, s1 closes the connection while s2 commits: s2 goes on
// with the commit (it no longer follows the connection's end, which left
// sockets aborted and imports failed) and answers the question asked
// again as before.
func TestCommitAnswerLost(t *testing.T) {
	for _, fault := range []string{"commit-answer-refuse", "commit-drop"} {
		t.Run(fault, func(t *testing.T) { testCommitAnswerLost(t, fault) })
	}
}

func testCommitAnswerLost(t *testing.T, fault string) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	tap := &logTap{TB: t}
	p := pool.Start(tap, bed, pool.Options{Env: map[string][]string{"mtcpd-s1": {"MTCP_FAULT=" + fault}}})
	sessions := []*abortSession{newAbortSession(t, p, bed, false), newAbortSession(t, p, bed, true)}
	rep, err := migrateSessions(t, p, bed.S1, "s2", sessions)
	if err != nil || len(rep.Moved) != len(sessions) || len(rep.Failed) != 0 || rep.Error != "" {
		t.Fatalf("migrate: %v, %+v: want both moved", err, rep)
	}
	// The fault fired: s1 asked again, and s2 had the first commit
	// (under way or done) when the second came. With commit-drop the
	// connection may close before the first commit was on its way (the
	// timer's 50 µs run out early on a loaded machine): s2 then commits
	// the second, which says nothing of a commit under way.
	lines := []struct{ proc, line string }{{"mtcpd-s1", "commit: the connection to the target was lost, asking again"}}
	if fault == "commit-answer-refuse" {
		lines = append(lines, struct{ proc, line string }{"mtcpd-s2", "commit asked again"})
	}
	for _, l := range lines {
		eventually(t, 5*time.Second, l.proc+" to log "+l.line+" once", func() (bool, string) {
			m := tap.matching(l.proc, l.line)
			return len(m) == 1, fmt.Sprint(m)
		})
	}
	if fault == "commit-drop" {
		t.Logf("s2 answered %d commits asked again (1 if the connection broke during the commit)", len(tap.matching("mtcpd-s2", "commit asked again")))
	}
	for _, s := range sessions {
		s.expect("HOST", "s2")
		s.expect("GET colour", s.colour)
		s.sent++
		if got := s.do("COUNT"); got != strconv.Itoa(s.sent) {
			t.Errorf("%s: COUNT = %q, want %d", s, got, s.sent)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// poolTrust returns the pool CA's certificates (to verify the daemons)
// and a peer identity named name, issued by the pool CA: a member's
// credentials as far as the daemons can tell.
func poolTrust(t *testing.T, p *pool.Pool, name string, ip netip.Addr) (*x509.CertPool, *peer.Config) {
	t.Helper()
	ca := p.CA()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	certPEM, keyPEM, err := ca.Issue(name, []netip.Addr{ip}, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return roots, &peer.Config{Name: name, Certificate: cert, Roots: roots}
}

// dialAsTester connects from s3's namespace to h's peer port as a member
// with cfg (poolTrust), closing the client at the test's end.
func dialAsTester(t *testing.T, bed *testbed.Bed, h *testbed.Host, cfg *peer.Config) *peer.Client {
	t.Helper()
	var c *peer.Client
	in(t, bed.S3, func() (err error) {
		c, err = peer.Dial(abortCtx(t, 10*time.Second), netip.AddrPortFrom(h.Ctl4, abortPeerPort).String(), h.Name, cfg)
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// sampleState is a well-formed encoded state for the flow of s, as a
// member that captured it would send: valid for repair.Decode, made up
// rather than captured (the real socket stays untouched on s1).
func sampleState(t *testing.T, s *abortSession) []byte {
	t.Helper()
	st := &repair.State{
		Local: s.service, Remote: s.client, TCPState: repair.StateEstablished,
		SendSeq: 0x10000, RecvSeq: 0x20000, MSS: 1448,
		Options:   repair.OptTimestamps | repair.OptSACK | repair.OptWindowScale,
		SndWScale: 7, RcvWScale: 7, Timestamp: 0x1234,
		Window:    repair.Window{SndWL1: 0x20000, SndWnd: 64256, MaxWindow: 64256, RcvWnd: 64256, RcvWup: 0x20000},
		Sockopts:  repair.Sockopts{NoDelay: true, Congestion: "cubic"},
		SendQueue: []byte("OK\n"), RecvQueue: []byte("GET colour\n"),
	}
	b, err := st.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := repair.Decode(b); err != nil {
		t.Fatalf("sample state does not decode: %v", err)
	}
	return b
}

// rawFrame is one frame of the peer protocol (peer/wire.go): payload
// length, type, id, payload.
func rawFrame(typ byte, id uint64, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(payload)))
	b = append(b, typ)
	b = binary.BigEndian.AppendUint64(b, id)
	return append(b, payload...)
}

// rawHelloAndTransfer is what an impostor sends on the peer channel: the
// protocol hello and a Transfer of state for flow (client, service), as
// peer/wire.go encodes them.
func rawHelloAndTransfer(client, service netip.AddrPort, state []byte) []byte {
	hello := binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint16([]byte("MTCP"), 1), 64<<20)
	ap := func(b []byte, a netip.AddrPort) []byte {
		raw := a.Addr().AsSlice()
		b = append(b, byte(len(raw)))
		b = append(b, raw...)
		return binary.BigEndian.AppendUint16(b, a.Port())
	}
	blob := func(b, v []byte) []byte { return append(binary.BigEndian.AppendUint32(b, uint32(len(v))), v...) }
	tr := binary.BigEndian.AppendUint64(nil, 0)        // no deadline
	tr = binary.BigEndian.AppendUint64(tr, 0xbad)      // TxID
	tr = binary.BigEndian.AppendUint32(tr, 1)          // one item
	tr = ap(ap(tr, client), service)                   // its flow
	tr = blob(tr, []byte(":7000"))                     // service
	tr = blob(tr, state)                               // state
	tr = blob(tr, []byte(`{"data":{"colour":"red"}}`)) // app snapshot
	return append(rawFrame(0x01, 0, hello), rawFrame(0x11, 1, tr)...)
}

// readAnswer reads what the server sends back until it closes the
// connection, and returns it with the error that ended the reading
// (io.EOF for a clean close).
func readAnswer(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err == nil {
		err = io.EOF
	}
	return got, err
}

// TestRefuseUnauthenticatedPeer: clients that cannot prove membership of
// the pool try to Transfer state for a live flow to s1 over the control
// network, from s2's namespace: a plain TCP client, a TLS client with no
// certificate, one with a certificate of another CA (as peer.Dial sends
// it, and forced through). Each is refused during the handshake with an
// error that says so; s1 installs nothing; the session goes on.
func TestRefuseUnauthenticatedPeer(t *testing.T) {
	testbed.RequireNetns(t) // enters the hosts' namespaces from the test process
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	s := newAbortSession(t, p, bed, false)
	state := sampleState(t, s)
	frames := rawHelloAndTransfer(s.client, s.service, state)
	roots, _ := poolTrust(t, p, "unused", bed.S2.Ctl4)
	s1peer := netip.AddrPortFrom(bed.S1.Ctl4, abortPeerPort).String()

	// Another pool's member, claiming to be s2.
	evil, err := peer.NewCA("evil-pool", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	evilPEM, evilKey, err := evil.Issue("s2", []netip.Addr{bed.S2.Ctl4}, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	evilCert, err := tls.X509KeyPair(evilPEM, evilKey)
	if err != nil {
		t.Fatal(err)
	}

	// rawTLS connects with cfg, sends the hello and the Transfer, and
	// returns what came back and the error that ended the exchange.
	rawTLS := func(cfg *tls.Config) ([]byte, error) {
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(&d, "tcp", s1peer, cfg)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		// In TLS 1.3 the server judges the client's certificate after
		// the client's side of the handshake is done: the refusal
		// arrives as an alert on the first read. The writes may fail
		// once it has closed.
		c.Write(frames)
		return readAnswer(c)
	}
	base := func() *tls.Config {
		return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: "s1", NextProtos: []string{"mtcp-peer"}}
	}

	for _, tc := range []struct {
		name string
		// try returns the bytes s1 answered with (decrypted, for TLS)
		// and the error that ended the exchange.
		try  func() ([]byte, error)
		want []string // in the error, any of
	}{{
		name: "plain TCP client sending frames",
		try: func() ([]byte, error) {
			c, err := net.DialTimeout("tcp", s1peer, 5*time.Second)
			if err != nil {
				return nil, err
			}
			defer c.Close()
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write(frames)
			got, err := readAnswer(c)
			// A TLS server meeting no TLS record closes the
			// connection; all it may send is a TLS alert record
			// (content type 21), never an mtcp frame.
			if len(got) > 0 && got[0] == 21 {
				got = nil
			}
			if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
				err = fmt.Errorf("s1 closed the connection of a client that did not start a TLS handshake: %w", err)
			}
			return got, err
		},
		want: []string{"did not start a TLS handshake"},
	}, {
		name: "TLS client without a certificate",
		try:  func() ([]byte, error) { return rawTLS(base()) },
		want: []string{"certificate required"},
	}, {
		name: "peer.Dial with another CA's certificate",
		try: func() ([]byte, error) {
			cfg := &peer.Config{Name: "s2", Certificate: evilCert, Roots: roots}
			c, err := peer.Dial(abortCtx(t, 10*time.Second), s1peer, "s1", cfg)
			if err != nil {
				return nil, err
			}
			defer c.Close()
			rep, err := c.Transfer(abortCtx(t, 10*time.Second), &peer.TransferRequest{TxID: 0xbad, Items: []peer.Item{{
				Flow: peer.FlowID{Client: s.client, Service: s.service}, Service: ":7000", State: state}}})
			return []byte(fmt.Sprint(rep)), fmt.Errorf("s1 accepted the connection; Transfer: %v", err)
		},
		// Go's client does not send a certificate the server's CA
		// list rules out: s1 sees none.
		want: []string{"TLS handshake: s1 refused this server's certificate", "certificate required", "certificate signed by unknown authority"},
	}, {
		name: "TLS client forcing another CA's certificate",
		try: func() ([]byte, error) {
			cfg := base()
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &evilCert, nil }
			return rawTLS(cfg)
		},
		want: []string{"unknown certificate authority", "bad certificate"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			var got []byte
			var err error
			in(t, bed.S2, func() error { got, err = tc.try(); return nil })
			t.Logf("error: %v", err)
			if len(got) > 0 {
				t.Errorf("s1 answered an unauthenticated client with %d bytes: %q", len(got), got[:min(len(got), 64)])
			}
			if err == nil {
				t.Fatal("the exchange ended without an error")
			}
			if !slices.ContainsFunc(tc.want, func(w string) bool { return strings.Contains(err.Error(), w) }) {
				t.Errorf("error %q mentions none of %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), "certificate") && !strings.Contains(err.Error(), "handshake") {
				t.Errorf("error %q mentions neither the certificate nor the handshake", err)
			}
			s.check(t)
			assertNoTrace(t, p, bed, false, s)
		})
	}
	// s1's peer server still serves the pool's members.
	eventually(t, 5*time.Second, "s2 to see s1 healthy", func() (bool, string) {
		st, err := p.Admin(bed.S2).Status(abortCtx(t, 5*time.Second))
		if err != nil {
			return false, err.Error()
		}
		i := slices.IndexFunc(st.Peers, func(ps admin.PeerStatus) bool { return ps.Name == "s1" })
		return i >= 0 && st.Peers[i].Healthy, fmt.Sprintf("%+v", st.Peers)
	})
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestRefuseGarbledState: a member of the pool (a valid certificate of the
// pool CA) sends s2 a Prepare and a Transfer for the live flow whose state
// is garbage — random bytes, a truncated encoding, an encoding with one
// byte changed. Every item is refused with an error naming the malformed
// state, a Commit of the transaction is refused, and s2 installs nothing:
// no reply rewrite, no socket. The session on s1 never notices.
//
// A control case sends the well-formed state: s2 restores it (in repair
// mode: silent) and installs its reply rewrite, which shows that the
// checks below see what a restore leaves; its Abort removes both.
func TestRefuseGarbledState(t *testing.T) {
	testbed.RequireNetns(t) // enters the hosts' namespaces from the test process
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	s := newAbortSession(t, p, bed, false)
	// A certificate of the pool CA for a name the pool's configuration
	// does not list is refused at the handshake.
	_, stranger := poolTrust(t, p, "stranger", bed.S3.Ctl4)
	var err error
	in(t, bed.S3, func() error {
		var c *peer.Client
		if c, err = peer.Dial(abortCtx(t, 10*time.Second), netip.AddrPortFrom(bed.S2.Ctl4, abortPeerPort).String(), bed.S2.Name, stranger); err == nil {
			c.Close()
		}
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "TLS handshake") {
		t.Fatalf("a pool CA certificate for a name not in the configuration: %v, want refused at the handshake", err)
	}
	// A member (s3's identity) sends the states.
	_, cfg := poolTrust(t, p, "s3", bed.S3.Ctl4)
	c := dialAsTester(t, bed, bed.S2, cfg)

	valid := sampleState(t, s)
	random := make([]byte, len(valid))
	rand.Read(random)
	withMagic := slices.Concat(valid[:12], random[12:]) // a plausible header, then noise
	flipped := slices.Clone(valid)
	flipped[len(flipped)/2] ^= 0x01
	flippedSeq := slices.Clone(valid)
	flippedSeq[12+1+6+6+1] ^= 0x80 // the high byte of SendSeq (IPv4)
	flippedCRC := slices.Clone(valid)
	flippedCRC[len(flippedCRC)-1] ^= 0xff

	item := func(state []byte) peer.Item {
		return peer.Item{Flow: peer.FlowID{Client: s.client, Service: s.service}, Service: ":7000",
			State: state, App: []byte(`{"data":{"colour":"red"},"count":1}`)}
	}
	tx := uint64(0x7e57_0000_0000_0000) + uint64(time.Now().UnixNano()&0xffff)<<16
	for _, tc := range []struct {
		name   string
		states [][]byte
	}{
		{"random bytes", [][]byte{random}},
		{"magic and header, then random bytes", [][]byte{withMagic}},
		{"empty", [][]byte{{}}},
		{"truncated to its header", [][]byte{valid[:12]}},
		{"truncated by half", [][]byte{valid[:len(valid)/2]}},
		{"truncated by one byte", [][]byte{valid[:len(valid)-1]}},
		{"one byte appended", [][]byte{append(slices.Clone(valid), 0)}},
		{"one bit flipped mid-body", [][]byte{flipped}},
		{"sequence number changed", [][]byte{flippedSeq}},
		{"checksum changed", [][]byte{flippedCRC}},
		{"all of them in one request", [][]byte{random, withMagic, valid[:len(valid)/2], flipped, flippedSeq, flippedCRC}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tx++
			rep, err := c.Prepare(abortCtx(t, 5*time.Second), &peer.PrepareRequest{TxID: tx, Service: ":7000", Count: len(tc.states)})
			if err != nil || !rep.OK {
				t.Fatalf("Prepare: %+v, %v", rep, err)
			}
			req := &peer.TransferRequest{TxID: tx}
			for _, st := range tc.states {
				req.Items = append(req.Items, item(st))
			}
			tr, err := c.Transfer(abortCtx(t, 10*time.Second), req)
			if err != nil {
				t.Fatalf("Transfer: %v", err)
			}
			if len(tr.Results) != len(req.Items) {
				t.Fatalf("Transfer: %d results for %d items: %+v", len(tr.Results), len(req.Items), tr.Results)
			}
			for i, r := range tr.Results {
				t.Logf("item %d: %+v", i, r)
				if r.OK || !strings.Contains(r.Error, repair.ErrMalformed.Error()) {
					t.Errorf("item %d: result %+v, want an error naming the %q", i, r, repair.ErrMalformed)
				}
			}
			crep, err := c.Commit(abortCtx(t, 5*time.Second), &peer.CommitRequest{TxID: tx})
			var re *peer.RemoteError
			if !errors.As(err, &re) {
				t.Errorf("Commit of transaction %#x, whose every item was refused: %+v, %v; want it refused", tx, crep, err)
			}
			if e := flowElems(t, bed.S2, s.client, "reply"); len(e) > 0 {
				t.Errorf("s2 installed a reply rewrite for the flow: %v", e)
			}
			s.check(t)
			assertNoTrace(t, p, bed, false, s)
		})
	}

	t.Run("control: well-formed state, then Abort", func(t *testing.T) {
		tx++
		if rep, err := c.Prepare(abortCtx(t, 5*time.Second), &peer.PrepareRequest{TxID: tx, Service: ":7000", Count: 1}); err != nil || !rep.OK {
			t.Fatalf("Prepare: %+v, %v", rep, err)
		}
		tr, err := c.Transfer(abortCtx(t, 10*time.Second), &peer.TransferRequest{TxID: tx, Items: []peer.Item{item(valid)}})
		if err != nil || len(tr.Results) != 1 || !tr.Results[0].OK {
			t.Fatalf("Transfer of a well-formed state: %+v, %v", tr, err)
		}
		aborted := false
		defer func() {
			if !aborted {
				c.Abort(abortCtx(t, 5*time.Second), &peer.AbortRequest{TxID: tx, Reason: "test cleanup"})
			}
		}()
		if e := flowElems(t, bed.S2, s.client, "reply"); len(e) != 1 {
			t.Errorf("s2's reply rewrites for the flow after a restore: %v, want one", e)
		}
		if l := socketsOf(t, bed.S2, s.client); len(l) != 1 {
			t.Errorf("s2's sockets for the client after a restore: %q, want one", l)
		}
		s.check(t) // the restored socket is in repair mode: silent
		aborted = true
		if err := c.Abort(abortCtx(t, 5*time.Second), &peer.AbortRequest{TxID: tx, Reason: "test"}); err != nil {
			t.Fatalf("Abort: %v", err)
		}
		s.check(t)
		assertNoTrace(t, p, bed, false, s)
	})
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestOrphansExpire: a member that transfers a connection to s2 and then
// goes away without a commit or an abort, and one that holds a flow at
// its steering point (s1) and never switches it, leave nothing behind
// once their transactions expire (MTCP_FAULT=orphan-after=2s here,
// daemon.OrphanTimeout otherwise): s2 throws the restored socket and its
// reply rewrite away, s1 lifts the hold, and the session carries on. The
// session lives on s3 meanwhile, as only the member serving a flow may
// hold it, and the test plays s3.
func TestOrphansExpire(t *testing.T) {
	testbed.RequireNetns(t) // enters the hosts' namespaces from the test process
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	env := map[string][]string{}
	for _, h := range []string{"s1", "s2"} {
		env["mtcpd-"+h] = []string{daemon.FaultEnv + "=orphan-after=2s"}
	}
	p := pool.Start(t, bed, pool.Options{Env: env})
	s := newAbortSession(t, p, bed, false)
	p.Migrate(bed.S1, bed.S3, s.c)
	s.expect("HOST", "s3")
	_, cfg := poolTrust(t, p, "s3", bed.S3.Ctl4)
	flow := peer.FlowID{Client: s.client, Service: s.service}

	c2 := dialAsTester(t, bed, bed.S2, cfg)
	tx := uint64(0x0f0f_0000_0000_0000) + uint64(time.Now().UnixNano()&0xffff)<<16
	if rep, err := c2.Prepare(abortCtx(t, 5*time.Second), &peer.PrepareRequest{TxID: tx, Service: ":7000", Count: 1}); err != nil || !rep.OK {
		t.Fatalf("Prepare: %+v, %v", rep, err)
	}
	tr, err := c2.Transfer(abortCtx(t, 10*time.Second), &peer.TransferRequest{TxID: tx, Items: []peer.Item{{Flow: flow, Service: ":7000",
		State: sampleState(t, s), App: []byte(`{"data":{"colour":"red"},"count":1}`)}}})
	if err != nil || len(tr.Results) != 1 || !tr.Results[0].OK {
		t.Fatalf("Transfer: %+v, %v", tr, err)
	}
	if len(socketsOf(t, bed.S2, s.client)) == 0 || len(flowElems(t, bed.S2, s.client, "reply")) == 0 {
		t.Fatal("s2 restored nothing for the transfer")
	}
	c2.Close()

	c1 := dialAsTester(t, bed, bed.S1, cfg)
	if err := c1.Steer(abortCtx(t, 5*time.Second), &peer.SteerRequest{Op: peer.SteerHold, Flows: []peer.FlowID{flow}}); err != nil {
		t.Fatalf("Steer hold: %v", err)
	}
	if len(flowElems(t, bed.S1, s.client, "hold")) == 0 {
		t.Fatal("s1 did not hold the flow")
	}
	c1.Close()

	eventually(t, 15*time.Second, "the orphans to expire", func() (bool, string) {
		sock, reply, hold := socketsOf(t, bed.S2, s.client), flowElems(t, bed.S2, s.client, ""), flowElems(t, bed.S1, s.client, "hold")
		return len(sock) == 0 && len(reply) == 0 && len(hold) == 0, fmt.Sprintf("s2 sockets %q, s2 elements %v, s1 holds %v", sock, reply, hold)
	})
	s.expect("HOST", "s3")
	p.Migrate(bed.S3, bed.S1, s.c)
	s.check(t)
	assertNoTrace(t, p, bed, false, s)
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestRefuseBadItems: a member's transfer whose items cannot be restored
// as they say (a flow off its service's port, a snapshot over the limit,
// a flow of two families, a loopback client, a service address outside
// the pool) gets each refused with its reason before anything is built;
// a good item beside them is restored, and the abort leaves nothing.
func TestRefuseBadItems(t *testing.T) {
	testbed.RequireNetns(t) // enters the hosts' namespaces from the test process
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	s := newAbortSession(t, p, bed, false)
	_, cfg := poolTrust(t, p, "s3", bed.S3.Ctl4)
	c := dialAsTester(t, bed, bed.S2, cfg)
	state := sampleState(t, s)
	snap := []byte(`{"data":{"colour":"red"},"count":1}`)
	flow := peer.FlowID{Client: s.client, Service: s.service}
	with := func(f func(*peer.Item)) peer.Item {
		it := peer.Item{Flow: flow, Service: ":7000", State: state, App: snap}
		f(&it)
		return it
	}
	bad := []struct {
		item peer.Item
		want string
	}{
		{with(func(it *peer.Item) { it.Flow.Service = netip.AddrPortFrom(s.service.Addr(), 22) }), "not one of service :7000"},
		{with(func(it *peer.Item) { it.App = make([]byte, app.MaxSnapshot+1) }), "snapshot of"},
		{with(func(it *peer.Item) { it.Flow.Service = netip.AddrPortFrom(bed.S1.LAN6, 7000) }), "different families"},
		{with(func(it *peer.Item) { it.Flow.Client = netip.MustParseAddrPort("127.0.0.1:4000") }), "is not one a connection"},
		{with(func(it *peer.Item) { it.Flow.Service = netip.MustParseAddrPort("10.77.2.99:7000") }), "not a service address of the pool"},
	}
	req := &peer.TransferRequest{TxID: uint64(0x0bad_0000_0000_0000) + uint64(time.Now().UnixNano()&0xffff)<<16}
	for _, b := range bad {
		req.Items = append(req.Items, b.item)
	}
	req.Items = append(req.Items, with(func(*peer.Item) {}))
	if rep, err := c.Prepare(abortCtx(t, 5*time.Second), &peer.PrepareRequest{TxID: req.TxID, Service: ":7000", Count: len(req.Items)}); err != nil || !rep.OK {
		t.Fatalf("Prepare: %+v, %v", rep, err)
	}
	tr, err := c.Transfer(abortCtx(t, 10*time.Second), req)
	if err != nil || len(tr.Results) != len(req.Items) {
		t.Fatalf("Transfer: %+v, %v", tr, err)
	}
	for i, b := range bad {
		if r := tr.Results[i]; r.OK || !strings.Contains(r.Error, b.want) {
			t.Errorf("item %d: %+v, want it refused with %q", i, r, b.want)
		}
	}
	if r := tr.Results[len(bad)]; !r.OK {
		t.Fatalf("the good item: %+v", r)
	}
	// The good item alone is built: one socket, one reply rewrite.
	if l := socketsOf(t, bed.S2, s.client); len(l) != 1 {
		t.Errorf("s2 has %d sockets for the client, want the good item's: %q", len(l), l)
	}
	if e := flowElems(t, bed.S2, s.client, "reply"); len(e) != 1 {
		t.Errorf("s2 has %d reply rewrites for the client, want the good item's: %v", len(e), e)
	}
	if e := flowElems(t, bed.S2, netip.MustParseAddrPort("127.0.0.1:4000"), ""); len(e) != 0 {
		t.Errorf("s2 has elements for the loopback item: %v", e)
	}
	if err := c.Abort(abortCtx(t, 5*time.Second), &peer.AbortRequest{TxID: req.TxID, Reason: "test"}); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	// The steering point switches flows only to the pool's members.
	c1 := dialAsTester(t, bed, bed.S1, cfg)
	err = c1.Steer(abortCtx(t, 5*time.Second), &peer.SteerRequest{Op: peer.SteerSwitch, Flows: []peer.FlowID{flow}, To: netip.MustParseAddr("10.77.2.1")})
	if err == nil || !strings.Contains(err.Error(), "not a service address of the pool") {
		t.Errorf("a switch to an address outside the pool: %v", err)
	}
	assertNoTrace(t, p, bed, false, s)
	s.check(t)
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestImportRefusedRulesGo: past the switch, the target's application
// does not take the connection (MTCP_FAULT=import-refuse on s2), or the
// target cannot bring its socket to life (commit-socket-refuse): the
// migration reports it lost, the client sees the connection end, and the
// flow's rules (s1's forward, s2's reply rewrite) go once its socket is
// gone, as for any ended connection, rather than wait for their idle
// timeout.
func TestImportRefusedRulesGo(t *testing.T) {
	testbed.RequireNetns(t) // reads the hosts' tables from the test process
	for _, fault := range []string{"import-refuse", "commit-socket-refuse"} {
		t.Run(fault, func(t *testing.T) { testCommitFailedRulesGo(t, fault) })
	}
}

func testCommitFailedRulesGo(t *testing.T, fault string) {
	bed := testbed.ForTest(t)
	p := pool.Start(t, bed, pool.Options{Env: map[string][]string{"mtcpd-s2": {daemon.FaultEnv + "=" + fault}}})
	s := newAbortSession(t, p, bed, false)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := p.Admin(bed.S1).Migrate(ctx, &admin.MigrateRequest{Flows: []string{s.client.String()}, To: "s2"})
	if err != nil || len(rep.Moved) != 0 || !strings.Contains(rep.Failed[s.client.String()], "fault injected") {
		t.Fatalf("migrate: %v (report %+v), want the flow failed at the commit", err, rep)
	}
	s.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if fault == "commit-socket-refuse" {
		// The socket went silently: the client learns it when it next
		// sends, from the reset of whichever host then gets it.
		if _, err := io.WriteString(s.c, "HOST\n"); err != nil {
			t.Fatalf("probe: %v", err)
		}
	}
	n, err := s.c.Read(make([]byte, 1))
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection lives on (read %d bytes, %v) with nobody to serve it", n, err)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the client's read: %v, want the connection ended (EOF or reset)", err)
	}
	t.Logf("the client sees: %v", err)
	s.c.Close()
	eventually(t, 20*time.Second, "the flow's rules to go", func() (bool, string) {
		e1, e2 := flowElems(t, bed.S1, s.client, ""), flowElems(t, bed.S2, s.client, "")
		return len(e1) == 0 && len(e2) == 0, fmt.Sprintf("s1 %v, s2 %v", e1, e2)
	})
}

// TestSteerOnlyByServer: a member of the pool cannot hold, switch or
// unhold a connection it does not serve. s3, a configured member with its
// own certificate, asks s1, the steering point of a session, to hold the
// session's flow and to switch it to s3: while the session is at home on
// s1, and again after it has migrated to s2. Every request is refused
// with an error naming the member that serves the connection; s1 holds
// nothing for the flow and forwards it where it did; the session goes on.
// s2, which serves it, can still migrate it on to s3, and s3 then back to
// s1.
func TestSteerOnlyByServer(t *testing.T) {
	testbed.RequireNetns(t) // dials from s3's namespace
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	s := newAbortSession(t, p, bed, false)
	_, cfg := poolTrust(t, p, "s3", bed.S3.Ctl4)
	c := dialAsTester(t, bed, bed.S1, cfg)
	flows := []peer.FlowID{{Client: s.client, Service: s.service}}
	refused := func(server, fwd string) {
		t.Helper()
		for _, r := range []*peer.SteerRequest{
			{Op: peer.SteerHold, Flows: flows},
			{Op: peer.SteerSwitch, Flows: flows, To: bed.S3.LAN4},
			{Op: peer.SteerUnhold, Flows: flows},
		} {
			err := c.Steer(abortCtx(t, 5*time.Second), r)
			var re *peer.RemoteError
			if !errors.As(err, &re) || !strings.Contains(re.Msg, server+" serves that connection") {
				t.Errorf("s3's %s of a connection %s serves: %v, want refused naming %s", r.Op, server, err, server)
			}
		}
		if els := flowElems(t, bed.S1, s.client, "hold"); len(els) != 0 {
			t.Errorf("s1 holds the flow after s3's refused requests: %v", els)
		}
		var got []string
		for _, e := range flowElems(t, bed.S1, s.client, "fwd") {
			got = append(got, e.JSON)
		}
		if (fwd == "") != (len(got) == 0) || (fwd != "" && (len(got) != 1 || !strings.Contains(got[0], fwd))) {
			t.Errorf("s1 forwards the flow by %q, want to %q (\"\": not at all)", got, fwd)
		}
	}
	refused("s1", "")
	s.expect("COUNT", "4")
	s.expect("HOST", "s1")
	p.Migrate(bed.S1, bed.S2, s.c)
	s.expect("HOST", "s2")
	refused("s2", bed.S2.LAN4.String())
	s.expect("GET colour", s.colour)
	p.Migrate(bed.S2, bed.S3, s.c)
	s.expect("HOST", "s3")
	p.Migrate(bed.S3, bed.S1, s.c)
	s.expect("HOST", "s1")
	s.check(t)
	assertHome(t, bed, s.client)
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestRefuseProcessFlows: a member sends s2 a process restore whose
// connections are not ones it may install: the flow of a session that
// lives on s2 already, and a flow to an address no member of the pool
// owns. Each restore is refused before anything is installed, with an
// error saying why, and so is a second restore of the same migration;
// the session's reply rewrite on s2 stays, and the session goes on.
func TestRefuseProcessFlows(t *testing.T) {
	testbed.RequireNetns(t) // dials from s3's namespace
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	s := newAbortSession(t, p, bed, false)
	p.Migrate(bed.S1, bed.S2, s.c)
	s.expect("HOST", "s2")
	before := flowElems(t, bed.S2, s.client, "reply")
	if len(before) != 1 {
		t.Fatalf("s2's reply rewrites of the session: %v, want one", before)
	}
	_, cfg := poolTrust(t, p, "s3", bed.S3.Ctl4)
	c := dialAsTester(t, bed, bed.S2, cfg)
	tx := uint64(0x7e57_1000_0000_0000) + uint64(time.Now().UnixNano()&0xffff)<<16
	for _, tc := range []struct {
		name string
		flow peer.ProcessFlow
		want string
	}{
		{"a connection s2 has", peer.ProcessFlow{Flow: peer.FlowID{Client: s.client, Service: s.service}, Local: s.service}, "has that connection already"},
		{"an address outside the pool", peer.ProcessFlow{Flow: peer.FlowID{Client: s.client, Service: netip.MustParseAddrPort("10.77.9.9:7000")}, Local: s.service}, "not a service address of the pool"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tx++
			if err := c.ProcessPrepare(abortCtx(t, 10*time.Second), &peer.ProcessPrepareRequest{TxID: tx, Name: "rogue"}); err != nil {
				t.Fatalf("ProcessPrepare: %v", err)
			}
			_, err := c.ProcessRestore(abortCtx(t, 10*time.Second), &peer.ProcessRestoreRequest{TxID: tx,
				Flows: []peer.ProcessFlow{tc.flow}, Rewrite: []netip.Addr{bed.S1.LAN4}})
			var re *peer.RemoteError
			if !errors.As(err, &re) || !strings.Contains(re.Msg, tc.want) {
				t.Errorf("ProcessRestore of %s: %v, want refused with %q", tc.name, err, tc.want)
			}
			// One restore per migration: a second would start a second
			// copy of the process.
			_, err = c.ProcessRestore(abortCtx(t, 10*time.Second), &peer.ProcessRestoreRequest{TxID: tx})
			if !errors.As(err, &re) || !strings.Contains(re.Msg, "asked for already") {
				t.Errorf("a second ProcessRestore of the migration: %v, want refused", err)
			}
			c.ProcessFinish(abortCtx(t, 10*time.Second), &peer.ProcessFinishRequest{TxID: tx, Reason: "test"})
			after := flowElems(t, bed.S2, s.client, "reply")
			if len(after) != 1 || after[0].JSON != before[0].JSON {
				t.Errorf("s2's reply rewrites of the session after the refusal: %v, want %v", after, before)
			}
			s.expect("HOST", "s2")
		})
	}
	p.Migrate(bed.S2, bed.S1, s.c)
	s.check(t)
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestStopDuringTransfer: s1's mtcpd is told to stop (SIGTERM) while a
// migration waits on a target that never answers its transfer
// (MTCP_FAULT=transfer-hang on s2), and its grace ends first (1 s here,
// MTCP_FAULT=shutdown-grace): cancelled, the migration rolls back, aborting
// on s2 (whose answers take 300 ms, peer-delay), thawing the sockets and
// lifting the holds, before the daemon exits, as that needs its services. The sessions go on at s1, served by
// the application alone, their state intact, with no RST.
func TestStopDuringTransfer(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Env: map[string][]string{
		"mtcpd-s1": {daemon.FaultEnv + "=shutdown-grace=1s"},
		"mtcpd-s2": {daemon.FaultEnv + "=transfer-hang,peer-delay=300ms"},
	}})
	sessions := []*abortSession{newAbortSession(t, p, bed, false), newAbortSession(t, p, bed, true)}
	req := &admin.MigrateRequest{To: "s2"}
	for _, s := range sessions {
		req.Flows = append(req.Flows, s.client.String())
	}
	done := make(chan error, 1)
	go func() {
		_, err := p.Admin(bed.S1).Migrate(abortCtx(t, 30*time.Second), req)
		done <- err
	}()
	for _, s := range sessions {
		eventually(t, 5*time.Second, "s1 to hold "+s.String(), func() (bool, string) {
			e := flowElems(t, bed.S1, s.client, "hold")
			return len(e) == 1, fmt.Sprint(e)
		})
	}
	if err := p.Signal("mtcpd-s1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Ended("mtcpd-s1"):
	case <-time.After(20 * time.Second):
		t.Fatal("s1's mtcpd did not exit on SIGTERM")
	}
	t.Logf("the migration, as s1's mtcpd stopped: %v", <-done)
	for _, s := range sessions {
		s.check(t)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

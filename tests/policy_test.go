package tests

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// The policy engine's end-to-end tests: each mtcpd runs a policy file and
// moves connections by itself, while unmodified clients (net.Dial) keep
// verifying their sessions with mtcp-kv.

// logTap is the test as the pool sees it, keeping the processes' log
// lines so that a test can check what the daemons said.
type logTap struct {
	testing.TB
	mu    sync.Mutex
	lines []string
}

func (l *logTap) Logf(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	l.mu.Lock()
	l.lines = append(l.lines, s)
	l.mu.Unlock()
	l.TB.Logf("%s", s)
}

// matching returns the lines of process proc ("mtcpd-s1") that contain
// every one of subs.
func (l *logTap) matching(proc string, subs ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range l.lines {
		rest, ok := strings.CutPrefix(line, proc+": ")
		if !ok {
			continue
		}
		all := true
		for _, s := range subs {
			all = all && strings.Contains(rest, s)
		}
		if all {
			out = append(out, rest)
		}
	}
	return out
}

// session is one client's mtcp-kv session, kept busy and verified by a
// goroutine: every SET is read back, the server's command count must
// match the commands sent, and any error ends it.
type session struct {
	name string
	c    *net.TCPConn
	rd   *bufio.Reader
	pace time.Duration

	mu    sync.Mutex
	err   error
	sent  int
	host  string
	hosts []string // each server seen, in order
	stop  chan struct{}
	done  chan struct{}
}

func (s *session) do(cmd string) (string, error) {
	s.c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(s.c, cmd+"\n"); err != nil {
		return "", fmt.Errorf("%s: %w", cmd, err)
	}
	s.sent++
	line, err := s.rd.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("%s: %w", cmd, err)
	}
	return strings.TrimSpace(line), nil
}

func (s *session) expect(cmd, want string) error {
	got, err := s.do(cmd)
	if err == nil && got != want {
		err = fmt.Errorf("%s = %q, want %q", cmd, got, want)
	}
	return err
}

func (s *session) loop() {
	defer close(s.done)
	fail := func(err error) {
		s.mu.Lock()
		s.err = fmt.Errorf("session %s after %d commands: %w", s.name, s.sent, err)
		s.mu.Unlock()
	}
	if err := s.expect("SET first "+s.name, "OK"); err != nil {
		fail(err)
		return
	}
	for i := 1; ; i++ {
		select {
		case <-s.stop:
			return
		case <-time.After(s.pace):
		}
		k, v := "k"+strconv.Itoa(i%50), s.name+"-"+strconv.Itoa(i)
		if err := s.expect("SET "+k+" "+v, "OK"); err != nil {
			fail(err)
			return
		}
		if err := s.expect("GET "+k, v); err != nil {
			fail(err)
			return
		}
		if i%5 == 0 {
			// The session's state crossed every move intact.
			if err := s.expect("GET first", s.name); err != nil {
				fail(err)
				return
			}
			h, err := s.do("HOST")
			if err != nil {
				fail(err)
				return
			}
			s.mu.Lock()
			if h != s.host {
				s.host = h
				s.hosts = append(s.hosts, h)
			}
			s.mu.Unlock()
		}
	}
}

// finish stops the session and checks it end to end: no error, and the
// server counted exactly the commands sent (none lost, none repeated).
// It returns the server the session ended on.
func (s *session) finish(t *testing.T) string {
	t.Helper()
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	if s.err != nil {
		t.Fatalf("%v", s.err)
	}
	n, err := s.do("COUNT")
	if err != nil {
		t.Fatalf("session %s: %v", s.name, err)
	}
	if got, _ := strconv.Atoi(n); got != s.sent {
		t.Fatalf("session %s: the server counted %s commands, the client sent %d", s.name, n, s.sent)
	}
	h, err := s.do("HOST")
	if err != nil {
		t.Fatalf("session %s: %v", s.name, err)
	}
	return h
}

func (s *session) current() (host string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.host, s.err
}

// startSession dials h's application from the client and keeps the
// session busy, a command pair every pace.
func startSession(t *testing.T, p *pool.Pool, h *testbed.Host, v6 bool, name string, pace time.Duration) *session {
	c := p.Dial(h, v6)
	s := &session{name: name, c: c, rd: bufio.NewReader(c), pace: pace, stop: make(chan struct{}), done: make(chan struct{})}
	go s.loop()
	t.Cleanup(func() {
		select {
		case <-s.stop:
		default:
			close(s.stop)
		}
		<-s.done
	})
	return s
}

// metric reads one metric (summed over the samples matching labels) from
// h's mtcpd.
func metric(t *testing.T, p *pool.Pool, h *testbed.Host, name string, labels ...string) float64 {
	t.Helper()
	text, err := p.Metrics(h)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return pool.Metric(text, name, labels...)
}

// connCount is the number of connections h's mtcpd serves.
func connCount(t *testing.T, p *pool.Pool, h *testbed.Host) int {
	t.Helper()
	st, err := p.Admin(h).Status(context.Background())
	if err != nil {
		t.Fatalf("%s status: %v", h.Name, err)
	}
	return st.Conns
}

// checkSessions fails the test as soon as a session broke.
func checkSessions(t *testing.T, ss []*session) {
	t.Helper()
	for _, s := range ss {
		if _, err := s.current(); err != nil {
			t.Fatalf("%v", err)
		}
	}
}

// steady checks, for d, that the sessions stay healthy and that no
// daemon moves anything: the policy has stopped.
func steady(t *testing.T, p *pool.Pool, ss []*session, d time.Duration) {
	t.Helper()
	count := func() []float64 {
		var out []float64
		for _, h := range p.Bed.Servers() {
			out = append(out, metric(t, p, h, "mtcp_policy_migrations_total"), metric(t, p, h, "mtcp_migrations_total"))
		}
		return out
	}
	// A migration the test saw finish (its connections gone from the
	// source) may not be counted yet: start from counters that hold
	// still for a moment.
	before := count()
	for settle := time.Now().Add(10 * time.Second); ; {
		time.Sleep(300 * time.Millisecond)
		now := count()
		if slices.Equal(before, now) {
			break
		}
		if time.Now().After(settle) {
			t.Fatalf("migrations never stopped: counters %v, then %v", before, now)
		}
		before = now
	}
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		checkSessions(t, ss)
		time.Sleep(100 * time.Millisecond)
	}
	if after := count(); !slices.Equal(before, after) {
		t.Fatalf("migrations went on for %v after the policy should have stopped (policy and total migrations per server: %v, then %v)", d, before, after)
	}
}

// TestPolicyOverload: a CPU burner in s1's namespace overloads it; s1's
// policy moves its connections, half at a time with a cooldown, to the
// least loaded servers, then stops: nothing moves while the burner runs
// on and after it stops, and no session lost a byte.
func TestPolicyOverload(t *testing.T) {
	testbed.RequireNetns(t) // the metrics are read from inside the servers' namespaces
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	tap := &logTap{TB: t}
	p := pool.Start(tap, bed, pool.Options{Policy: `
interval: 500ms
limits: {conn_cooldown: 60s}
rules:
  - name: cpu-overload
    service: ":7000"
    when:
      cpu: {above: 0.25, clear: 0.15, for: 1s}
    migrate: {fraction: 0.5, to: least_loaded, by: cpu, margin: 0.1}
    cooldown: 2s
`})
	var ss []*session
	for i := range 8 {
		ss = append(ss, startSession(t, p, bed.S1, i%2 == 1, fmt.Sprintf("c%d", i), 20*time.Millisecond))
	}
	eventually(t, 10*time.Second, "s1 to serve the 8 sessions", func() (bool, string) {
		n := connCount(t, p, bed.S1)
		return n == 8, fmt.Sprint(n)
	})
	// Nothing moves while s1 is not loaded, though the engine decides.
	steady(t, p, ss, 2*time.Second)
	if n := metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "cpu-overload", "reason", "not_triggered"); n < 2 {
		t.Fatalf("s1 counted %v not_triggered decisions in 2s at 500ms intervals", n)
	}

	p.Spawn(bed.S1, "burner-s1", "/bin/sh", "-c", "while :; do :; done")
	eventually(t, 45*time.Second, "s1's policy to move every connection away", func() (bool, string) {
		checkSessions(t, ss)
		n := connCount(t, p, bed.S1)
		return n == 0, fmt.Sprintf("%d left on s1, cpu %.2f", n, metric(t, p, bed.S1, "mtcp_load", "metric", "cpu"))
	})
	steady(t, p, ss, 4*time.Second) // the burner still runs
	if err := p.Signal("burner-s1", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	steady(t, p, ss, 3*time.Second)

	for _, s := range ss {
		if h := s.finish(t); h != "s2" && h != "s3" {
			t.Errorf("session %s ended on %s (went through %v)", s.name, h, s.hosts)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}

	// Every decision shows in the metrics and the logs, with its reason.
	triggered := metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "cpu-overload", "reason", "triggered")
	if moved := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "rule", "cpu-overload", "trigger", "cpu", "result", "moved"); moved != 8 {
		t.Errorf("s1 counted %v connections moved by cpu-overload, want 8", moved)
	}
	if failed := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "result", "failed"); failed != 0 {
		t.Errorf("s1 counted %v failed moves", failed)
	}
	// 8 connections, half (rounded up) at a time: 4, 2, 1, 1.
	if triggered != 4 {
		t.Errorf("s1 counted %v triggered decisions, want 4", triggered)
	}
	lines := tap.matching("mtcpd-s1", "policy decision", "rule=cpu-overload", "reason=triggered")
	if float64(len(lines)) != triggered {
		t.Errorf("%d log lines of triggered decisions, %v in the metrics: %q", len(lines), triggered, lines)
	}
	for _, l := range lines {
		if !strings.Contains(l, "least_loaded by cpu") || !strings.Contains(l, "trigger=cpu") || !strings.Contains(l, "failed=0") {
			t.Errorf("a decision's log line does not say why and what: %s", l)
		}
	}
	for _, reason := range []string{"cooldown", "nothing_to_move"} {
		n := metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "cpu-overload", "reason", reason)
		l := tap.matching("mtcpd-s1", "policy decision", "rule=cpu-overload", "reason="+reason)
		if n == 0 || len(l) == 0 || float64(len(l)) != n {
			t.Errorf("reason %s: %v in the metrics, %d log lines", reason, n, len(l))
		}
	}
	for _, h := range []*testbed.Host{bed.S2, bed.S3} {
		if n := metric(t, p, h, "mtcp_policy_decisions_total", "reason", "triggered"); n != 0 {
			t.Errorf("%s's policy acted %v times: connections went back and forth", h.Name, n)
		}
	}
}

// TestPolicyPeerDeath: s2's mtcpd dies; s1 and s3 declare it down once
// it missed the configured 3 heartbeats (1s apart), and say so in their
// metrics and logs; the other sessions carry on.
func TestPolicyPeerDeath(t *testing.T) {
	testbed.RequireNetns(t) // the metrics are read from inside the servers' namespaces
	bed := testbed.ForTest(t)
	tap := &logTap{TB: t}
	p := pool.Start(tap, bed, pool.Options{Policy: `
interval: 100ms
peers: {missed: 3}
rules:
  - name: drain
    when: {maintenance: true}
`})
	ss := []*session{startSession(t, p, bed.S1, false, "a", 20*time.Millisecond), startSession(t, p, bed.S3, true, "b", 20*time.Millisecond)}
	watchers := []*testbed.Host{bed.S1, bed.S3}
	for _, h := range watchers {
		eventually(t, 10*time.Second, h.Name+" to see s2 up", func() (bool, string) {
			return metric(t, p, h, "mtcp_peer_up", "peer", "s2") == 1, ""
		})
	}
	if err := p.Signal("mtcpd-s2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	const configured = 3 * time.Second // peers.missed × the heartbeat interval
	noticed := map[string]time.Duration{}
	eventually(t, 3*configured, "s1 and s3 to declare s2 down", func() (bool, string) {
		checkSessions(t, ss)
		for _, h := range watchers {
			if _, ok := noticed[h.Name]; !ok && metric(t, p, h, "mtcp_peer_up", "peer", "s2") == 0 {
				noticed[h.Name] = time.Since(killed)
			}
		}
		return len(noticed) == len(watchers), fmt.Sprint(noticed)
	})
	t.Logf("s2 declared down after %v", noticed)
	for _, h := range watchers {
		// The last heartbeat s2 answered came at most one interval
		// before it died; then 3 intervals must pass without one, and
		// the engine looks every 100ms. Scheduling on a busy machine gets
		// a little slack.
		if d := noticed[h.Name]; d < configured-time.Second || d > configured+700*time.Millisecond {
			t.Errorf("%s declared s2 down %v after it died; configured: %v after its last heartbeat", h.Name, d, configured)
		}
		if n := metric(t, p, h, "mtcp_policy_decisions_total", "reason", "peer_down"); n != 1 {
			t.Errorf("%s counted %v peer_down decisions", h.Name, n)
		}
		if l := tap.matching("mtcpd-"+h.Name, "policy decision", "peer=s2", "reason=peer_down", "missed"); len(l) != 1 {
			t.Errorf("%s logged %d peer_down lines for s2: %q", h.Name, len(l), l)
		}
	}
	for _, s := range ss {
		s.finish(t)
	}
}

// TestPolicyPathDegradation: the path from s1 to the clients' IPv4
// network degrades (a congested class on s1's link, IPv4 only). With gateway
// steering, s1's policy moves its IPv4 connections to the peers that
// measure a better path to that network; the IPv6 ones, whose path is
// fine, stay on s1.
func TestPolicyPathDegradation(t *testing.T) {
	testbed.RequireNetns(t) // the metrics are read from inside the servers' namespaces
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	tap := &logTap{TB: t}
	p := pool.Start(tap, bed, pool.Options{Steering: "gateway", Policy: `
interval: 500ms
limits: {conn_cooldown: 60s}
rules:
  - name: slow-path
    service: ":7000"
    when: {rtt: {above: 60ms, for: 1s}}
    migrate: {to: path_cost, margin: 0.3}
    cooldown: 1s
`})
	pace := 10 * time.Millisecond
	var v4, v6, others []*session
	for i := range 3 {
		v4 = append(v4, startSession(t, p, bed.S1, false, fmt.Sprintf("v4-%d", i), pace))
		v6 = append(v6, startSession(t, p, bed.S1, true, fmt.Sprintf("v6-%d", i), pace))
	}
	for _, h := range []*testbed.Host{bed.S2, bed.S3} {
		others = append(others, startSession(t, p, h, false, h.Name+"-v4", pace), startSession(t, p, h, true, h.Name+"-v6", pace))
	}
	all := slices.Concat(v4, v6, others)
	steady(t, p, all, 2*time.Second) // healthy paths: nothing moves

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// This kernel has no netem (CONFIG_NET_SCH_NETEM is off): the link
	// degrades by congestion instead. HTB gives s1's IPv4 traffic to the
	// clients' network a 4 kbit/s class: a reply of one segment waits
	// about 140 ms for its turn, even when it is the only one queued.
	for _, args := range [][]string{
		{"qdisc", "add", "dev", testbed.IfLAN, "root", "handle", "1:", "htb", "default", "20"},
		{"class", "add", "dev", testbed.IfLAN, "parent", "1:", "classid", "1:10", "htb", "rate", "4kbit", "ceil", "4kbit"},
		{"class", "add", "dev", testbed.IfLAN, "parent", "1:", "classid", "1:20", "htb", "rate", "1000mbit"},
		{"filter", "add", "dev", testbed.IfLAN, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
			"match", "ip", "dst", testbed.ClientNet4.String(), "flowid", "1:10"},
	} {
		if out, err := bed.S1.Run(ctx, "tc", args...); err != nil {
			t.Fatalf("tc %v: %v: %s", args, err, out)
		}
	}
	eventually(t, 30*time.Second, "s1's IPv4 sessions to move", func() (bool, string) {
		checkSessions(t, all)
		var where []string
		moved := 0
		for _, s := range v4 {
			h, _ := s.current()
			where = append(where, h)
			if h == "s2" || h == "s3" {
				moved++
			}
		}
		return moved == len(v4), strings.Join(where, ",")
	})
	steady(t, p, all, 3*time.Second)
	for _, s := range v4 {
		if h := s.finish(t); h != "s2" && h != "s3" {
			t.Errorf("session %s ended on %s", s.name, h)
		}
	}
	for _, s := range v6 {
		if h := s.finish(t); h != "s1" {
			t.Errorf("session %s (IPv6, a healthy path) moved to %s", s.name, h)
		}
	}
	for _, s := range others {
		if h := s.finish(t); h != strings.Split(s.name, "-")[0] {
			t.Errorf("session %s moved to %s", s.name, h)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
	if n := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "rule", "slow-path", "trigger", "rtt", "result", "moved"); n != 3 {
		t.Errorf("s1 counted %v connections moved by slow-path, want 3", n)
	}
	lines := tap.matching("mtcpd-s1", "policy decision", "rule=slow-path", "reason=triggered", "path_cost:")
	if n := metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "slow-path", "reason", "triggered"); n == 0 || float64(len(lines)) != n {
		t.Errorf("%v triggered decisions in the metrics, %d in the logs: %q", n, len(lines), lines)
	}
}

// TestPolicyDrain: s1's policy file changes while it runs. A malformed
// version is refused with its line number and the running policy stays;
// a dry run of maintenance only logs; SIGHUP reloads; then maintenance
// drains s1 completely, three connections at a time.
func TestPolicyDrain(t *testing.T) {
	testbed.RequireNetns(t) // the metrics are read from inside the servers' namespaces
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	tap := &logTap{TB: t}
	const base = `
interval: 250ms
limits: {conn_cooldown: 60s}
rules:
  - name: drain
    when: {maintenance: true}
    migrate: {count: 3, to: least_loaded, by: conns}
    cooldown: 1s
`
	p := pool.Start(tap, bed, pool.Options{Policy: base})
	var ss []*session
	for i := range 7 {
		ss = append(ss, startSession(t, p, bed.S1, i%2 == 0, fmt.Sprintf("d%d", i), 20*time.Millisecond))
	}
	ss = append(ss, startSession(t, p, bed.S2, false, "on-s2", 20*time.Millisecond))
	reloads := func(cause, result string) float64 {
		return metric(t, p, bed.S1, "mtcp_policy_reloads_total", "cause", cause, "result", result)
	}

	// A malformed file: refused, with its line, and the old policy runs.
	p.WritePolicy(bed.S1, base+"maintenance: [s1]\n    colour: red\n")
	eventually(t, 10*time.Second, "s1 to refuse the malformed policy", func() (bool, string) {
		return reloads("change", "error") == 1, ""
	})
	if ok := metric(t, p, bed.S1, "mtcp_policy_reload_ok"); ok != 0 {
		t.Fatalf("mtcp_policy_reload_ok = %v after a failed reload", ok)
	}
	if l := tap.matching("mtcpd-s1", "policy reload failed", "the running policy stays", "line 10"); len(l) != 1 {
		t.Fatalf("no log line with the error's line number: %q", tap.matching("mtcpd-s1", "policy"))
	}
	steady(t, p, ss, time.Second)

	// Dry run: decisions are logged and counted, nothing moves.
	p.WritePolicy(bed.S1, base+"maintenance: [s1]\ndry_run: true\n")
	eventually(t, 10*time.Second, "a dry run of the drain", func() (bool, string) {
		n := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "rule", "drain", "result", "dry_run")
		return n >= 6, fmt.Sprint(n)
	})
	if ok := metric(t, p, bed.S1, "mtcp_policy_reload_ok"); ok != 1 {
		t.Fatalf("mtcp_policy_reload_ok = %v after a good reload", ok)
	}
	if n := connCount(t, p, bed.S1); n != 7 {
		t.Fatalf("a dry run moved connections: %d left on s1", n)
	}
	if l := tap.matching("mtcpd-s1", "policy decision", "rule=drain", "reason=triggered", "dry_run=true", "trigger=maintenance"); len(l) == 0 {
		t.Fatal("no log line for the dry run's decisions")
	}

	if err := p.Signal("mtcpd-s1", syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "s1 to reload on SIGHUP", func() (bool, string) {
		return reloads("sighup", "ok") == 1, ""
	})

	// The drain itself.
	p.WritePolicy(bed.S1, base+"maintenance: [s1]\n")
	eventually(t, 30*time.Second, "s1 to drain", func() (bool, string) {
		checkSessions(t, ss)
		// The last batch leaves s1's list before its migration returns
		// and is counted: wait for both.
		n := connCount(t, p, bed.S1)
		moved := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "rule", "drain", "result", "moved")
		return n == 0 && moved == 7, fmt.Sprintf("%d left, %v counted as moved", n, moved)
	})
	steady(t, p, ss, 2*time.Second)
	for _, s := range ss {
		if h := s.finish(t); h != "s2" && h != "s3" {
			t.Errorf("session %s ended on %s", s.name, h)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
	if n := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "rule", "drain", "result", "moved"); n != 7 {
		t.Errorf("s1 counted %v connections drained, want 7", n)
	}
	// 7 connections, 3 at a time.
	if n := metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "drain", "reason", "triggered", "dry_run", "false"); n != 3 {
		t.Errorf("%v drain decisions, want 3", n)
	}
	if l := tap.matching("mtcpd-s1", "policy decision", "rule=drain", "reason=triggered", "dry_run=false", "moved=", "failed=0"); len(l) != 3 {
		t.Errorf("%d log lines of drain decisions, want 3: %q", len(l), l)
	}
	if n := metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "drain", "reason", "nothing_to_move"); n == 0 {
		t.Error("no nothing_to_move decision once s1 was empty")
	}
}

// TestPolicySlowTarget: while a decision's move waits on a target that
// never answers its transfer (until the 10 s deadline), s1's policy loop
// goes on: it takes SIGHUP at once, sees a peer (s3) stop answering, and
// does not decide again; the move then fails, the sessions stay on s1,
// unbroken, and the engine counts the failure against s2.
func TestPolicySlowTarget(t *testing.T) {
	testbed.RequireNetns(t) // the metrics are read from inside the servers' namespaces
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	tap := &logTap{TB: t}
	const base = `
interval: 250ms
rules:
  - name: drain
    when: {maintenance: true}
    migrate: {count: 1, to: weighted, weights: {s2: 1}}
    cooldown: 1s
`
	p := pool.Start(tap, bed, pool.Options{Policy: base, Env: map[string][]string{"mtcpd-s2": {"MTCP_FAULT=transfer-hang"}}})
	ss := []*session{
		startSession(t, p, bed.S1, false, "slow0", 20*time.Millisecond),
		startSession(t, p, bed.S1, true, "slow1", 20*time.Millisecond),
	}
	steady(t, p, ss, 500*time.Millisecond)
	moving := func() float64 { return metric(t, p, bed.S1, "mtcp_policy_moving") }
	triggered := func() float64 {
		return metric(t, p, bed.S1, "mtcp_policy_decisions_total", "rule", "drain", "reason", "triggered", "dry_run", "false")
	}

	p.WritePolicy(bed.S1, base+"maintenance: [s1]\n")
	eventually(t, 10*time.Second, "s1 to start moving a connection to s2", func() (bool, string) {
		m := moving()
		return m == 1, fmt.Sprint(m)
	})
	if err := p.Signal("mtcpd-s1", syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "s1 to reload on SIGHUP while its move waits", func() (bool, string) {
		return metric(t, p, bed.S1, "mtcp_policy_reloads_total", "cause", "sighup", "result", "ok") == 1, ""
	})
	// s3 stops answering heartbeats: s1 says so while its move waits.
	if err := p.Signal("mtcpd-s3", syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Signal("mtcpd-s3", syscall.SIGCONT) })
	eventually(t, 6*time.Second, "s1 to see s3 down while its move waits", func() (bool, string) {
		return len(tap.matching("mtcpd-s1", "policy decision", "peer=s3", "reason=peer_down")) == 1, ""
	})
	if err := p.Signal("mtcpd-s3", syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// Still waiting (the transfer's deadline is 10 s), and not decided
	// again meanwhile, though the interval has passed many times.
	if m := moving(); m != 1 {
		t.Fatalf("mtcp_policy_moving = %v once SIGHUP was taken and s3 seen down, want 1 (the move to s2 still waiting)", m)
	}
	if n := triggered(); n != 1 {
		t.Fatalf("%v triggered drain decisions while the first one's move waited, want 1", n)
	}

	eventually(t, 20*time.Second, "the move to s2 to fail", func() (bool, string) {
		checkSessions(t, ss)
		m := moving()
		return m == 0, fmt.Sprint(m)
	})
	p.WritePolicy(bed.S1, base)
	if l := tap.matching("mtcpd-s1", "policy decision", "rule=drain", "reason=triggered", "moves=s2:1", "moved=0", "failed=1"); len(l) != 1 {
		t.Errorf("want one log line of the failed drain decision: %q", tap.matching("mtcpd-s1", "policy decision", "rule=drain"))
	}
	if n := metric(t, p, bed.S1, "mtcp_policy_migrations_total", "rule", "drain", "result", "failed"); n != 1 {
		t.Errorf("s1 counted %v connections failed to move, want 1", n)
	}
	steady(t, p, ss, time.Second)
	for _, s := range ss {
		if h := s.finish(t); h != "s1" {
			t.Errorf("session %s ended on %s, want s1 (its move failed)", s.name, h)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

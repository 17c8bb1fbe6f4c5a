package tests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/daemon"
	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// TestSessionMoves: a client's session with the key-value service moves
// s1 -> s2 -> s3 -> s1 through the daemons (mtcpctl's admin API); the
// client keeps its one connection to s1's address, and the session's state
// (keys, command count) arrives intact on each server.
func TestSessionMoves(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	for _, v6 := range []bool{false, true} {
		c := p.Dial(bed.S1, v6)
		s := &kv{t: t, c: c, rd: bufio.NewReader(c)}
		// A migration asked for before the application has reported the
		// connection to its mtcpd is refused.
		waitServed(t, p, bed.S1, c)
		if got := s.do("SET colour blue"); got != "OK" {
			t.Fatalf("SET: %q", got)
		}
		if got := s.do("HOST"); got != "s1" {
			t.Fatalf("HOST before any move: %q", got)
		}
		count := func() int {
			n, err := strconv.Atoi(s.do("COUNT"))
			if err != nil {
				t.Fatalf("COUNT: %v", err)
			}
			return n
		}
		before := count()
		for i, hop := range [][2]*testbed.Host{{bed.S1, bed.S2}, {bed.S2, bed.S3}, {bed.S3, bed.S1}} {
			p.Migrate(hop[0], hop[1], c)
			if got := s.do("HOST"); got != hop[1].Name {
				t.Fatalf("hop %d: HOST = %q, want %s", i, got, hop[1].Name)
			}
			if got := s.do("GET colour"); got != "blue" {
				t.Fatalf("hop %d: GET colour = %q: the session's state was lost", i, got)
			}
			s.do("SET hop" + strconv.Itoa(i) + " " + hop[1].Name)
			// Three commands since the last COUNT, and this COUNT.
			if after := count(); after-before != 4 {
				t.Fatalf("hop %d: COUNT went from %d to %d, want +4: the session's counter was lost", i, before, after)
			}
			before += 4
		}
		if got := s.do("GET hop1"); got != "s3" {
			t.Fatalf("GET hop1 = %q", got)
		}
		if ra := unmapAP(c.RemoteAddr().(*net.TCPAddr).AddrPort()); ra.Addr() != addr(bed.S1, v6) {
			t.Fatalf("the client talks to %v, not s1", ra)
		}
		assertHome(t, bed, unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort()))
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestEndedFlowRulesGo: once a migrated session ends (the client quits),
// its rules go: the forward entry at s1 and the reply rewrite at s2. With
// switch-home-refuse, s1 fails s2's first request to end the flow's
// steering: s2 asks again at its next sweep.
func TestEndedFlowRulesGo(t *testing.T) {
	for _, fault := range []string{"", "switch-home-refuse"} {
		t.Run("fault="+fault, func(t *testing.T) { endedFlowRulesGo(t, fault) })
	}
}

func endedFlowRulesGo(t *testing.T, fault string) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	tap := &logTap{TB: t}
	p := pool.Start(tap, bed, pool.Options{Env: map[string][]string{"mtcpd-s1": {daemon.FaultEnv + "=" + fault}}})
	c := p.Dial(bed.S1, false)
	s := &kv{t: t, c: c, rd: bufio.NewReader(c)}
	s.do("SET k v")
	waitServed(t, p, bed.S1, c)
	p.Migrate(bed.S1, bed.S2, c)
	client := unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort())
	if len(flowElems(t, bed.S1, client, "")) == 0 || len(flowElems(t, bed.S2, client, "")) == 0 {
		t.Fatalf("after the move: s1 has %v, s2 has %v; want the forward and the reply rewrite", flowElems(t, bed.S1, client, ""), flowElems(t, bed.S2, client, ""))
	}
	// Their idle timeout is mtcpd's flow_idle (default a day), not the
	// nat package's ten minutes: a session may stay silent for longer.
	want := fmt.Sprintf(`"timeout": %d,`, int(daemon.DefaultFlowIdle.Seconds()))
	for _, e := range append(flowElems(t, bed.S1, client, ""), flowElems(t, bed.S2, client, "")...) {
		if !strings.Contains(e.JSON, want) {
			t.Errorf("element %s: want a timeout of %v", e.JSON, daemon.DefaultFlowIdle)
		}
	}
	if got := s.do("QUIT"); got != "BYE" {
		t.Fatalf("QUIT: %q", got)
	}
	// The rules stay while either socket still exchanges its last
	// segments: close the client's side too.
	c.Close()
	eventually(t, 15*time.Second, "the flow's rules to go", func() (bool, string) {
		e1, e2 := flowElems(t, bed.S1, client, ""), flowElems(t, bed.S2, client, "")
		return len(e1) == 0 && len(e2) == 0, fmt.Sprintf("s1 %v, s2 %v", e1, e2)
	})
	if fault != "" {
		if m := tap.matching("mtcpd-s2", "tried again to remove the rules of ended connections"); len(m) == 0 {
			t.Error("s2 did not say it tried again")
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestRestartRemembersMovedIn: mtcpd restarted on a host that received
// a connection still knows the address the client dialled (from its
// reply rewrite with forward steering, from the file it keeps with
// gateway steering), lists the connection with it, and moves it on
// intact.
func TestRestartRemembersMovedIn(t *testing.T) {
	for _, steering := range []string{"forward", "gateway"} {
		t.Run(steering, func(t *testing.T) { restartRemembersMovedIn(t, steering) })
	}
}

func restartRemembersMovedIn(t *testing.T, steering string) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Steering: steering})
	for _, v6 := range []bool{false, true} {
		c := p.Dial(bed.S1, v6)
		s := &kv{t: t, c: c, rd: bufio.NewReader(c)}
		s.do("SET k v")
		waitServed(t, p, bed.S1, c)
		p.Migrate(bed.S1, bed.S2, c)
		p.RestartDaemon(bed.S2)
		waitServed(t, p, bed.S2, c) // the application has reconnected
		client := unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort()).String()
		service := netip.AddrPortFrom(addr(bed.S1, v6), 7000).String()
		cs, err := p.Admin(bed.S2).Conns(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, cn := range cs {
			if cn.Client == client && cn.Service != service {
				t.Fatalf("after the restart s2 lists %s as a connection to %s, want %s", client, cn.Service, service)
			}
		}
		p.Migrate(bed.S2, bed.S3, c)
		s.expectOn("s3", "v")
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestAddrSpecificServices: applications that listen on their own
// host's address (10.77.2.11:7001 on s1, 10.77.2.12:7001 on s2) rather
// than on every address: a session moves between them, the target's
// application taking it under its own name.
func TestAddrSpecificServices(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	for _, h := range []*testbed.Host{bed.S1, bed.S2} {
		p.StartApp(h, "kv7001-"+h.Name, netip.AddrPortFrom(h.LAN4, 7001).String())
	}
	c := p.DialAddr(netip.AddrPortFrom(bed.S1.LAN4, 7001))
	s := &kv{t: t, c: c, rd: bufio.NewReader(c)}
	if got := s.do("SET k v"); got != "OK" {
		t.Fatalf("SET: %q", got)
	}
	waitServed(t, p, bed.S1, c)
	p.Migrate(bed.S1, bed.S2, c)
	s.expectOn("s2", "v")
	// Served by s2's application of 10.77.2.12:7001, not by its one of
	// :7000 (both answer HOST with s2).
	client := unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort()).String()
	want := netip.AddrPortFrom(bed.S2.LAN4, 7001).String()
	cs, err := p.Admin(bed.S2).Conns(context.Background())
	if i := slices.IndexFunc(cs, func(cn admin.Conn) bool { return cn.Client == client }); err != nil || i < 0 || cs[i].App != want || cs[i].Local != want {
		t.Errorf("s2 lists %+v (%v); want %s served by %s, locally %s", cs, err, client, want, want)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestSecondDaemonRefused: a second mtcpd started with the configuration
// of one running exits before it changes anything of the first's: its
// nftables rules (listed with their handles, which a rewrite changes),
// its application socket, its migrations.
func TestSecondDaemonRefused(t *testing.T) {
	bed := testbed.ForTest(t)
	p := pool.Start(t, bed, pool.Options{})
	if !bed.S1.Remote() {
		// The sockets' directory, which mtcpd made (as /run/mtcp): open
		// to an application running as the application socket's owner,
		// while the admin socket in it is root's alone.
		dir := p.SocketDir(bed.S1)
		for _, f := range []struct {
			path string
			want os.FileMode
		}{{dir, os.ModeDir | 0o755}, {filepath.Join(dir, "admin.sock"), os.ModeSocket | 0o600}} {
			fi, err := os.Stat(f.path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode() != f.want {
				t.Fatalf("%s: mode %v, want %v", f.path, fi.Mode(), f.want)
			}
		}
	}
	table := func() string {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := bed.S1.Run(ctx, "nft", "-a", "list", "table", "inet", "mtcp")
		if err != nil {
			t.Fatalf("nft: %v", err)
		}
		return string(out)
	}
	before := table()
	if code := p.RunDaemonAgain(bed.S1); code == 0 {
		t.Fatal("the second mtcpd exited 0")
	}
	if after := table(); after != before {
		t.Fatalf("the second mtcpd changed the running one's table:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	p.StartApp(bed.S1, "kv7002-s1", ":7002") // the application socket is still there
	c := p.Dial(bed.S1, false)
	s := &kv{t: t, c: c, rd: bufio.NewReader(c)}
	s.do("SET k v")
	waitServed(t, p, bed.S1, c)
	p.Migrate(bed.S1, bed.S2, c)
	s.expectOn("s2", "v")
}

// TestAdminDrain drains s1 to s2 through the admin API (`mtcpctl drain`),
// 300 sessions of both address families in batches of 100 (several in
// flight): every session is served by s2 afterwards with its state, no
// client saw a RST, s1 lists none of them as soon as the drain is done,
// and s1 closes every frozen copy after that (3 s after, here:
// drain-flush-delay, so that the test sees them first).
func TestAdminDrain(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Quiet: true, Env: map[string][]string{"mtcpd-s1": {daemon.FaultEnv + "=drain-flush-delay=3s"}}})
	const n = 300
	sessions := drainSessions(t, p, bed, n)
	port := uint16(sessions[0].c.RemoteAddr().(*net.TCPAddr).Port)
	var reports int
	prog, err := p.Admin(bed.S1).Drain(context.Background(), &admin.DrainRequest{To: "s2", Batch: 100}, func(admin.Progress) { reports++ })
	if err != nil || prog.Done != n || prog.Failed != 0 {
		t.Fatalf("drain: %v (%+v)", err, prog)
	}
	// The drain is done: s1 serves none of them any more, although it
	// closes its frozen copies only now.
	if cs, err := p.Admin(bed.S1).Conns(context.Background()); err != nil || len(cs) != 0 {
		t.Errorf("right after the drain s1 lists %d connections (%v), want none", len(cs), err)
	}
	if k := connsOnPort(t, bed.S1, port); k != n {
		t.Errorf("right after the drain s1 has %d sockets on port %d, want its %d frozen copies", k, port, n)
	}
	// The first line, one per batch, the last.
	if len(prog.Reports) != 3 || reports != 5 {
		t.Errorf("%d batch reports in %d progress lines, want 3 in 5", len(prog.Reports), reports)
	}
	for _, r := range prog.Reports {
		if len(r.Moved) > 100 {
			t.Errorf("a batch moved %d connections, more than the 100 asked for", len(r.Moved))
		}
	}
	for i, s := range sessions {
		if got := s.do("HOST"); got != "s2" {
			t.Fatalf("session %d after the drain: HOST = %q", i, got)
		}
		if got := s.do("GET k"); got != strconv.Itoa(i) {
			t.Fatalf("session %d after the drain: GET k = %q", i, got)
		}
	}
	pool.Eventually(t, 10*time.Second, "s1 to close its frozen copies", func() (bool, string) {
		k := connsOnPort(t, bed.S1, port)
		return k == 0, fmt.Sprintf("%d left", k)
	})
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the clients saw %d RSTs and sent %d", in, out)
	}
}

// TestDrainComesBack: sessions drained from s1 to s2 are migrated back
// to s1 before s1 has closed the frozen copies the drain keeps until its
// end (MTCP_FAULT=drain-flush-delay=6s on s1). They move back, with their
// state: s1 closes the copy of each first, whose 4-tuple the restore
// needs, and removes its old rules then, not at the end of the drain,
// when they would be the new ones. After that end they still work; no
// client saw a RST.
func TestDrainComesBack(t *testing.T) {
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{Env: map[string][]string{"mtcpd-s1": {daemon.FaultEnv + "=drain-flush-delay=6s"}}})
	const n = 20
	sessions := drainSessions(t, p, bed, n)
	start := time.Now()
	if prog, err := p.Admin(bed.S1).Drain(context.Background(), &admin.DrainRequest{To: "s2", Batch: 10}, nil); err != nil || prog.Done != n {
		t.Fatalf("drain: %v (%+v)", err, prog)
	}
	port := uint16(sessions[0].c.RemoteAddr().(*net.TCPAddr).Port)
	if k := connsOnPort(t, bed.S1, port); k != n {
		t.Fatalf("after the drain s1 has %d sockets on port %d, want its %d frozen copies", k, port, n)
	}
	back := sessions[:4] // two of each family
	req := &admin.MigrateRequest{To: "s1"}
	for _, s := range back {
		req.Flows = append(req.Flows, s.c.LocalAddr().String())
	}
	rep, err := p.Admin(bed.S2).Migrate(context.Background(), req)
	if time.Since(start) > 5*time.Second {
		t.Fatalf("the drain and the migration back took %v: the drain's frozen copies may be gone already, the test shows nothing", time.Since(start))
	}
	if err != nil || len(rep.Moved) != len(back) {
		t.Fatalf("migrating back to s1 during the drain's end: %v, %+v", err, rep)
	}
	for i, s := range back {
		s.expectOn("s1", strconv.Itoa(i))
	}
	// Each came back in place of its frozen copy.
	if k := connsOnPort(t, bed.S1, port); k != n {
		t.Errorf("with %d sessions back, s1 has %d sockets on port %d, want %d", len(back), k, port, n)
	}
	time.Sleep(time.Until(start.Add(8 * time.Second))) // past the drain's end
	pool.Eventually(t, 5*time.Second, "s1 to close the other frozen copies", func() (bool, string) {
		k := connsOnPort(t, bed.S1, port)
		return k == len(back), fmt.Sprintf("%d sockets", k)
	})
	for i, s := range sessions {
		host := "s2"
		if i < len(back) {
			host = "s1"
		}
		s.expectOn(host, strconv.Itoa(i))
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the clients saw %d RSTs and sent %d", in, out)
	}
}

// drainSessions opens n kv sessions with s1, of both address families,
// sets key k to each one's index, and waits until s1's mtcpd serves them.
func drainSessions(t *testing.T, p *pool.Pool, bed *testbed.Bed, n int) []*kv {
	t.Helper()
	sessions := make([]*kv, n)
	for i := range sessions {
		c := p.Dial(bed.S1, i%2 == 1)
		sessions[i] = &kv{t: t, c: c, rd: bufio.NewReader(c)}
		if got := sessions[i].do(fmt.Sprintf("SET k %d", i)); got != "OK" {
			t.Fatalf("session %d: SET: %q", i, got)
		}
	}
	pool.Eventually(t, 20*time.Second, "s1 to see every session", func() (bool, string) {
		cs, err := p.Admin(bed.S1).Conns(context.Background())
		return err == nil && len(cs) == n, fmt.Sprint(len(cs))
	})
	return sessions
}

// expectOn checks that host serves the session now and that its key k
// still holds v.
func (s *kv) expectOn(host, v string) {
	s.t.Helper()
	if got := s.do("HOST"); got != host {
		s.t.Fatalf("HOST after the move: %q, want %s", got, host)
	}
	if got := s.do("GET k"); got != v {
		s.t.Fatalf("GET k after the move: %q, want %q", got, v)
	}
}

// TestSilentSessionKeepsRules: a migrated session that stays silent (no
// data, no keepalive) for longer than its rules' idle timeout
// (flow_idle, 2 s here) keeps them: the daemon where it lives refreshes
// its own elements and has its steering point (s1, or the gateway)
// refresh the flow's. Without the refresh the rules time out and the
// client's next command meets s1 with no socket for it: a RST.
func TestSilentSessionKeepsRules(t *testing.T) {
	const idle = 2 * time.Second
	for _, steering := range []string{"forward", "gateway"} {
		t.Run(steering, func(t *testing.T) {
			bed := testbed.ForTest(t)
			p := pool.Start(t, bed, pool.Options{FlowIdle: idle, Steering: steering})
			rsts := watchRSTs(t, bed.Client)
			point, others := bed.S1, []*testbed.Host{bed.S2}
			if steering == "gateway" {
				point, others = bed.Gateway, nil
			}
			for _, v6 := range []bool{false, true} {
				c := p.Dial(bed.S1, v6)
				s := &kv{t: t, c: c, rd: bufio.NewReader(c)}
				s.do("SET k v")
				waitServed(t, p, bed.S1, c)
				p.Migrate(bed.S1, bed.S2, c)
				client := unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort())
				// The rules time out after idle (so that the silence
				// outlasts them), and are kept by their refresh.
				for _, h := range append([]*testbed.Host{point}, others...) {
					for _, e := range flowElems(t, h, client, "") {
						if !strings.Contains(e.JSON, fmt.Sprintf(`"timeout": %d,`, int(idle.Seconds()))) {
							t.Fatalf("%s's element %s: want a timeout of %v", h.Name, e.JSON, idle)
						}
					}
				}
				time.Sleep(3 * idle) // silent
				for _, h := range append([]*testbed.Host{point}, others...) {
					if e := flowElems(t, h, client, ""); len(e) == 0 {
						t.Fatalf("after %v of silence, %s has no rules for the session", 3*idle, h.Name)
					}
				}
				if got := s.do("GET k"); got != "v" {
					t.Fatalf("GET k after the silence = %q", got)
				}
			}
			if in, out := rsts(); in != 0 || out != 0 {
				t.Fatalf("the client saw %d RSTs and sent %d", in, out)
			}
		})
	}
}

// TestNetcatSession: an unmodified client program, nc(1), keeps its
// session with mtcp-kv through s1 -> s2 -> s3 -> s1: the session's state
// carries over, nc reports no error, and nothing is reset.
func TestNetcatSession(t *testing.T) {
	nc, err := exec.LookPath("nc")
	if err != nil {
		t.Skip("needs nc (netcat-openbsd; tests/setup.sh installs it)")
	}
	bed := testbed.ForTest(t)
	rsts := watchRSTs(t, bed.Client)
	p := pool.Start(t, bed, pool.Options{})
	const clientPort = 41777
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := bed.Client.Command(ctx, nc, "-p", strconv.Itoa(clientPort), addr(bed.S1, false).String(), "7000")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	do := func(line string) string {
		t.Helper()
		if _, err := io.WriteString(stdin, line+"\n"); err != nil {
			t.Fatalf("%s: writing to nc: %v (nc says %q)", line, err, stderr.String())
		}
		if !lines.Scan() {
			t.Fatalf("%s: nc's output ended: %v (nc says %q)", line, lines.Err(), stderr.String())
		}
		return strings.TrimSpace(lines.Text())
	}
	if got := do("SET colour blue"); got != "OK" {
		t.Fatalf("SET: %q", got)
	}
	flow := netip.AddrPortFrom(addr(bed.Client, false), clientPort).String()
	waitServedFlow(t, p, bed.S1, flow)
	for _, hop := range [][2]*testbed.Host{{bed.S1, bed.S2}, {bed.S2, bed.S3}, {bed.S3, bed.S1}} {
		p.MigrateFlow(hop[0], hop[1], flow)
		if got := do("HOST"); got != hop[1].Name {
			t.Fatalf("after %s -> %s: HOST = %q", hop[0].Name, hop[1].Name, got)
		}
		if got := do("GET colour"); got != "blue" {
			t.Fatalf("after %s -> %s: GET colour = %q: the session's state was lost", hop[0].Name, hop[1].Name, got)
		}
	}
	if got := do("QUIT"); got != "BYE" {
		t.Fatalf("QUIT: %q", got)
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil || stderr.Len() > 0 {
		t.Fatalf("nc: %v: %q", err, stderr.String())
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestCurlDownload: an unmodified HTTP client, curl(1), downloads a
// stream from mtcp-bulk at s1's address while the connection moves s1 ->
// s2 -> s3 -> s1: curl reports success, every byte of the body arrives
// exactly once and in order, and nothing is reset.
func TestCurlDownload(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("needs curl (tests/setup.sh installs it)")
	}
	bed := testbed.ForTest(t)
	p := pool.Start(t, bed, pool.Options{App: "mtcp-bulk", Quiet: true})
	rsts := watchPortRSTs(t, bed.Client, 7000)
	const (
		seed       = 4242
		length     = 120 << 20
		clientPort = 41888
	)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	url := fmt.Sprintf("http://%s:7000/%d/%d", addr(bed.S1, false), seed, length)
	// 40 MB/s: the download lasts three seconds, the migrations happen
	// while it runs.
	cmd := bed.Client.Command(ctx, curl, "--silent", "--show-error", "--fail", "--limit-rate", "40M", "--local-port", strconv.Itoa(clientPort), "--output", "-", url)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	v := &stream.Verifier{Pattern: seed}
	var mu sync.Mutex
	var copyErr error // the body's first error, under mu
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		buf := make([]byte, 64<<10)
		for {
			n, err := stdout.Read(buf)
			mu.Lock()
			_, verr := v.Write(buf[:n])
			if err == io.EOF {
				err = nil
			}
			if copyErr = errors.Join(verr, err); verr != nil || err != nil || n == 0 {
				mu.Unlock()
				return
			}
			mu.Unlock()
		}
	}()
	received := func() int64 {
		mu.Lock()
		defer mu.Unlock()
		if copyErr != nil {
			t.Fatalf("the body: %v (after %d bytes)", copyErr, v.N)
		}
		return v.N
	}
	flow := netip.AddrPortFrom(addr(bed.Client, false), clientPort).String()
	waitServedFlow(t, p, bed.S1, flow)
	for i, hop := range [][2]*testbed.Host{{bed.S1, bed.S2}, {bed.S2, bed.S3}, {bed.S3, bed.S1}} {
		at := int64(i+1) * length / 5
		eventually(t, 10*time.Second, fmt.Sprintf("%d bytes to arrive", at), func() (bool, string) {
			return received() >= at, fmt.Sprint(received())
		})
		p.MigrateFlow(hop[0], hop[1], flow)
	}
	<-copied
	received() // fails on the body's error
	if err := cmd.Wait(); err != nil || stderr.Len() > 0 {
		t.Fatalf("curl: %v: %q", err, stderr.String())
	}
	if n := received(); n != length {
		t.Fatalf("curl received %d bytes of %d", n, length)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

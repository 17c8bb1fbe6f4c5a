package tests

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/criu"
	"github.com/mtcp-dev/mtcp/daemon"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// skipUnlessProcessMode skips unless CRIU ≥ 4.2 and redis are installed.
func skipUnlessProcessMode(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("process mode: needs root")
	}
	if _, err := criu.Check(context.Background(), criu.Options{}); err != nil {
		t.Skipf("process mode: %v", err)
	}
	if r := pool.SkipReasonRedis(); r != "" {
		t.Skip(r)
	}
}

// respClient is a plain Go client of the redis protocol: nothing in it
// knows about mtcp.
type respClient struct {
	c net.Conn
	r *bufio.Reader
}

func newRESP(c net.Conn) *respClient { return &respClient{c: c, r: bufio.NewReader(c)} }

// do sends one command and returns its reply (simple string, integer or
// bulk string; "(nil)" for a nil bulk).
func (rc *respClient) do(args ...string) (string, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	rc.c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := rc.c.Write(b.Bytes()); err != nil {
		return "", err
	}
	line, err := rc.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimSuffix(line, "\r\n")
	switch {
	case line == "":
		return "", fmt.Errorf("empty reply")
	case line[0] == '+' || line[0] == ':':
		return line[1:], nil
	case line[0] == '-':
		return "", fmt.Errorf("redis error: %s", line[1:])
	case line == "$-1":
		return "(nil)", nil
	case line[0] == '$':
		var n int
		fmt.Sscanf(line[1:], "%d", &n)
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(rc.r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("unexpected reply %q", line)
}

// goLoop runs SET/GET pairs on one connection until stopped, checking
// every GET, and records the first error and the longest gap between
// replies (what the client saw of a migration).
type goLoop struct {
	rc      *respClient
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	err     error
	ops     int
	maxGap  time.Duration
	lastGap time.Time
}

func startGoLoop(t *testing.T, c net.Conn) *goLoop {
	l := &goLoop{rc: newRESP(c), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		last := time.Now()
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			default:
			}
			k, v := fmt.Sprintf("loop:%d", i%500), fmt.Sprintf("v%d", i)
			if _, err := l.rc.do("SET", k, v); err != nil {
				l.fail(err)
				return
			}
			got, err := l.rc.do("GET", k)
			if err == nil && got != v {
				err = fmt.Errorf("GET %s = %q, want %q", k, got, v)
			}
			if err != nil {
				l.fail(err)
				return
			}
			now := time.Now()
			l.mu.Lock()
			l.ops++
			if g := now.Sub(last); g > l.maxGap {
				l.maxGap = g
			}
			l.mu.Unlock()
			last = now
		}
	}()
	return l
}

func (l *goLoop) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err == nil {
		l.err = err
	}
}

func (l *goLoop) finish() (ops int, maxGap time.Duration, err error) {
	close(l.stop)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ops, l.maxGap, l.err
}

func (l *goLoop) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ops
}

// cliSession is an interactive redis-cli (unmodified, from Debian) on the
// client host, fed one command at a time.
type cliSession struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
}

func startCLI(t *testing.T, client *testbed.Host, r *pool.Redis) *cliSession {
	t.Helper()
	cmd := client.Command(context.Background(), "redis-cli", "-h", r.Addr().Addr().String(), "-p", fmt.Sprint(r.Port))
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatalf("redis-cli: %v", err)
	}
	s := &cliSession{cmd: cmd, in: in, lines: make(chan string, 100)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
	}()
	t.Cleanup(func() { in.Close(); cmd.Process.Kill(); cmd.Wait() })
	return s
}

// do sends one command line and returns redis-cli's one-line answer.
func (s *cliSession) do(t *testing.T, line string) string {
	t.Helper()
	fmt.Fprintln(s.in, line)
	select {
	case l, ok := <-s.lines:
		if !ok {
			t.Fatalf("redis-cli exited (after %q)", line)
		}
		return l
	case <-time.After(20 * time.Second):
		t.Fatalf("redis-cli: no answer to %q", line)
	}
	return ""
}

// benchRun is redis-benchmark looping on the client host.
type benchRun struct {
	cmd  *exec.Cmd
	out  *lockedBuf
	done chan error
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startBenchmark(t *testing.T, client *testbed.Host, r *pool.Redis, conns int) *benchRun {
	t.Helper()
	cmd := client.Command(context.Background(), "redis-benchmark", "-h", r.Addr().Addr().String(), "-p", fmt.Sprint(r.Port),
		"-c", fmt.Sprint(conns), "-t", "set,get", "-d", "64", "-r", "10000", "-l", "-q")
	b := &benchRun{cmd: cmd, out: &lockedBuf{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = b.out, b.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("redis-benchmark: %v", err)
	}
	go func() { b.done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill(); <-b.done })
	return b
}

// alive fails the test if the benchmark has exited or reported an error.
func (b *benchRun) check(t *testing.T, when string) {
	t.Helper()
	select {
	case err := <-b.done:
		b.done <- err
		t.Fatalf("redis-benchmark exited %s: %v: %s", when, err, tail(b.out.String()))
	default:
	}
	if out := b.out.String(); strings.Contains(out, "Error") || strings.Contains(out, "rror:") {
		t.Fatalf("redis-benchmark reported an error %s: %s", when, tail(out))
	}
}

func tail(s string) string {
	s = strings.ReplaceAll(s, "\r", "\n")
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-5):], " | ")
}

// noProcessRules fails the test if h's mtcp table still has an element
// naming the client host: after a process came home, nothing of its trip
// may stay behind.
func noProcessRules(t *testing.T, bed *testbed.Bed, h *testbed.Host) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Run(ctx, "nft", "list", "table", "inet", "mtcp")
	if err != nil {
		t.Fatalf("nft on %s: %v", h.Name, err)
	}
	if strings.Contains(string(out), bed.Client.LAN4.String()) {
		t.Errorf("%s's mtcp table still has elements of the client's flows:\n%s", h.Name, out)
	}
}

// TestProcessRedis moves a stock redis-server s1→s2→s1 through the
// daemons while redis-benchmark, a redis-cli session and a Go client keep
// their connections: no client error, no reset, the data intact after
// each move, nothing left behind. Both ways of moving the memory: lazy
// (post-copy, the daemons' default) and eager.
func TestProcessRedis(t *testing.T) {
	skipUnlessProcessMode(t)
	for _, pages := range []string{"lazy", "eager"} {
		t.Run(pages, func(t *testing.T) { testProcessRedis(t, pages) })
	}
}

func testProcessRedis(t *testing.T, pages string) {
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: pages})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rsts := watchPortRSTs(t, bed.Client, r.Port)

	// Data written before any move, checked after each.
	dc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	data := newRESP(dc)
	for i := range 300 {
		if got, err := data.do("SET", fmt.Sprintf("k:%d", i), fmt.Sprintf("value-%d", i)); err != nil || got != "OK" {
			t.Fatalf("SET: %q %v", got, err)
		}
	}
	checkData := func(when string) {
		t.Helper()
		for i := range 300 {
			got, err := data.do("GET", fmt.Sprintf("k:%d", i))
			if err != nil || got != fmt.Sprintf("value-%d", i) {
				t.Fatalf("%s: GET k:%d = %q, %v", when, i, got, err)
			}
		}
		if got, err := data.do("SET", "after", when); err != nil || got != "OK" {
			t.Fatalf("%s: SET: %q %v", when, got, err)
		}
		if got, err := data.do("GET", "after"); err != nil || got != when {
			t.Fatalf("%s: GET after = %q %v", when, got, err)
		}
	}

	gc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	loop := startGoLoop(t, gc)
	cli := startCLI(t, bed.Client, r)
	id := cli.do(t, "CLIENT ID")
	if got := cli.do(t, "SET cli hello"); got != "OK" {
		t.Fatalf("redis-cli SET: %q", got)
	}
	bench := startBenchmark(t, bed.Client, r, 20)
	eventually(t, 20*time.Second, "the clients to run", func() (bool, string) {
		n := loop.count()
		return n > 200 && strings.Contains(bench.out.String(), "requests per second") || strings.Contains(bench.out.String(), "rps"), fmt.Sprintf("%d go ops; bench %q", n, tail(bench.out.String()))
	})

	for i, hop := range []struct{ from, to *testbed.Host }{{bed.S1, bed.S2}, {bed.S2, bed.S1}} {
		before := loop.count()
		oldPID := r.PID
		rep := r.MigrateProcess(hop.to)
		t.Logf("%s -> %s: pid %d -> %d, %d conns, %d pages, phases %+v, held %v", hop.from.Name, hop.to.Name, oldPID, rep.NewPID, rep.Conns, rep.Pages, rep.Phases, rep.Pause)
		if rep.Aborted || rep.NewPID <= 0 {
			t.Fatalf("hop %d: %+v", i, rep)
		}
		if rep.Lazy != (pages == "lazy") {
			t.Errorf("hop %d: lazy %v, want process_pages %s", i, rep.Lazy, pages)
		}
		if rep.Conns < 23 { // data, Go loop, redis-cli, 20 benchmark connections
			t.Errorf("hop %d: %d connections moved, want at least 23", i, rep.Conns)
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", oldPID)); err == nil {
			eventually(t, 5*time.Second, "the source process to be gone", func() (bool, string) {
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", oldPID))
				return err != nil || strings.Contains(string(b), ") Z "), string(b)
			})
		}
		if pid := pool.ListenerPID(hop.to, r.Port); pid != rep.NewPID {
			t.Errorf("hop %d: the listener on %s belongs to pid %d, want %d", i, hop.to.Name, pid, rep.NewPID)
		}
		checkData(fmt.Sprintf("after hop %d", i))
		if got := cli.do(t, "GET cli"); got != "hello" {
			t.Fatalf("redis-cli GET after hop %d: %q", i, got)
		}
		eventually(t, 20*time.Second, "the Go client to go on", func() (bool, string) {
			n := loop.count()
			return n > before+100, fmt.Sprintf("%d ops", n-before)
		})
		bench.check(t, fmt.Sprintf("after hop %d", i))
	}
	ops, gap, err := loop.finish()
	if err != nil {
		t.Fatalf("Go client: %v (after %d ops)", err, ops)
	}
	t.Logf("Go client: %d SET/GET pairs, longest gap %v", ops, gap)
	if got := cli.do(t, "CLIENT ID"); got != id {
		t.Errorf("redis-cli's connection changed: CLIENT ID %s, then %s (it reconnected)", id, got)
	}
	bench.check(t, "at the end")
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client host saw %d resets in, %d out on port %d", in, out, r.Port)
	}
	for _, h := range []*testbed.Host{bed.S1, bed.S2} {
		noProcessRules(t, bed, h)
	}
}

// TestProcessRestoreFailsSourceResumes makes the restore fail on the
// target — redis runs in the host's PID namespace, and on this testbed
// its PID is taken on s2 by the stopped original — and checks that the
// process carries on at s1 with its connections: no client error, no
// reset, no rule and no process left on s2.
func TestProcessRestoreFailsSourceResumes(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true})
	r := p.StartRedis(bed.S1, pool.RedisOptions{HostPIDNamespace: true})
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	gc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	loop := startGoLoop(t, gc)
	eventually(t, 10*time.Second, "the Go client to run", func() (bool, string) { return loop.count() > 100, "" })

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{Port: r.Port, To: bed.S2.Name}, nil)
	if err == nil || rep == nil || !rep.Aborted {
		t.Fatalf("migration of a process whose PID is taken on the target: err %v, report %+v", err, rep)
	}
	t.Logf("aborted as expected: %v", err)
	before := loop.count()
	eventually(t, 10*time.Second, "the Go client to go on at s1", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	ops, _, err := loop.finish()
	if err != nil {
		t.Fatalf("Go client: %v (after %d ops)", err, ops)
	}
	if pid := pool.ListenerPID(bed.S1, r.Port); pid != r.PID {
		t.Errorf("the listener on s1 belongs to %d, want the original %d", pid, r.PID)
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.PID))
	if strings.Contains(string(b), ") T ") {
		t.Errorf("the source process is still stopped: %s", b)
	}
	if pid := pool.ListenerPID(bed.S2, r.Port); pid != 0 {
		t.Errorf("a process (%d) listens on s2 after the abort", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client host saw %d resets in, %d out", in, out)
	}
	noProcessRules(t, bed, bed.S2)
}

// TestProcessLazySourceDies kills the source's mtcpd right after the
// switch of a lazy migration, while the target still fetches the
// process's memory from it: the target must kill the restored process,
// whose missing pages would otherwise read as zeros. The process (built
// here from C) fills 48 MiB with a pattern and then only waits in
// pause(2): it touches no more memory, so it would live on, its memory
// silently zeroed, unless the target kills it.
func TestProcessLazySourceDies(t *testing.T) {
	skipUnlessProcessMode(t)
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler (cc): tests/setup-criu.sh installs one when it builds CRIU")
	}
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	dir := t.TempDir()
	const prog = `#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
int main(void) {
	size_t n = 48 << 20;
	unsigned char *m = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) return 1;
	for (size_t i = 0; i < n; i++) m[i] = (unsigned char)(i * 131 + 7);
	printf("ready\n");
	fflush(stdout);
	fclose(stdout);
	for (;;) pause();
}
`
	if err := os.WriteFile(filepath.Join(dir, "holder.c"), []byte(prog), 0o600); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "mtcp-lazy-holder")
	if out, err := exec.Command(cc, "-O1", "-o", bin, filepath.Join(dir, "holder.c")).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}

	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "lazy",
		Env: map[string][]string{"mtcpd-s1": {daemon.FaultEnv + "=pages-crash"}}})
	cmd := bed.S1.Command(context.Background(), "unshare", "--pid", "--fork", "--kill-child", "setsid", bin)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		for _, h := range []*testbed.Host{bed.S1, bed.S2} {
			for _, pid := range markedIn(t, h, bin) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		t.Fatalf("holder: %q", line)
	}
	src := markedIn(t, bed.S1, bin)
	if len(src) != 1 {
		t.Fatalf("holder processes in s1: %v, want one", src)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: src[0], To: bed.S2.Name}, nil)
	if err == nil {
		t.Fatalf("the migration succeeded although s1's mtcpd was to die: %+v", rep)
	}
	t.Logf("s1's mtcpd died mid-migration, as injected: %v", err)
	eventually(t, 15*time.Second, "s2 to kill the process whose pages stopped coming", func() (bool, string) {
		pids := markedIn(t, bed.S2, bin)
		return len(pids) == 0, fmt.Sprintf("%v alive in s2", pids)
	})
	// Nothing is left of the checkpoint: s2 dropped what arrived, and
	// s1's mtcpd, started again, removes what its crash left. The copy it
	// had stopped is the process's only one now: it carries on at s1.
	if st := testbed.ProcState(src[0]); st != "T" {
		t.Fatalf("s1's copy is %q, want stopped (T) until s1's mtcpd is back", st)
	}
	p.RestartDaemon(bed.S1)
	eventually(t, 15*time.Second, "s1's copy to carry on", func() (bool, string) {
		st := testbed.ProcState(src[0])
		return st == "S" || st == "R", st
	})
	for _, h := range []*testbed.Host{bed.S1, bed.S2} {
		eventually(t, 15*time.Second, h.Name+"'s checkpoints to go", func() (bool, string) {
			left, _ := filepath.Glob(daemon.CheckpointGlob(h.Name, filepath.Join(p.SocketDir(h), "admin.sock")))
			return len(left) == 0, fmt.Sprint(left)
		})
	}
}

// markedIn lists the processes in h's network namespace that run the
// executable exe. (By the executable, which the kernel knows, not by the
// command line, which lives in the process's memory: a restored
// process's may be among its missing pages.)
func markedIn(t *testing.T, h *testbed.Host, exe string) []int {
	t.Helper()
	var want syscall.Stat_t
	if err := syscall.Stat(h.NetNSPath(), &want); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if path, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || path != exe {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && st.Ino == want.Ino {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestProcessOneMigrationAtATime: two migrations of the same process
// asked for at once (to s2 and to s3): the second is refused, the first
// moves it, and its client never notices. (Both used to go ahead: two
// live copies of the process, or one migration's abort thawing the
// other's frozen sockets.)
func TestProcessOneMigrationAtATime(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager"})
	r, _, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	targets := []*testbed.Host{bed.S2, bed.S3}
	reps := make([]*admin.ProcessReport, len(targets))
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, to := range targets {
		wg.Go(func() {
			time.Sleep(time.Duration(i) * 20 * time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			reps[i], errs[i] = p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: to.Name}, nil)
		})
	}
	wg.Wait()
	moved := -1
	for i := range targets {
		switch {
		case errs[i] == nil && reps[i] != nil && !reps[i].Aborted:
			if moved >= 0 {
				t.Fatalf("both migrations moved the process: %+v, %+v", reps[0], reps[1])
			}
			moved = i
			r.PID = reps[i].NewPID
		case !strings.Contains(fmt.Sprint(errs[i], reps[i]), "already migrating"):
			t.Errorf("migration to %s: %v (report %+v); want it moved, or refused as already migrating", targets[i].Name, errs[i], reps[i])
		}
	}
	if moved < 0 {
		t.Fatalf("neither migration moved the process: %v, %v", errs, reps)
	}
	before := loop.count()
	eventually(t, 10*time.Second, "the client to go on", func() (bool, string) { return loop.count() > before+100, fmt.Sprint(loop.count() - before) })
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	for _, h := range []*testbed.Host{bed.S1, bed.S2, bed.S3} {
		if pid := pool.ListenerPID(h, r.Port); (pid > 0) != (h == targets[moved]) {
			t.Errorf("%s: listener pid %d; the process should listen on %s alone", h.Name, pid, targets[moved].Name)
		}
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessTargetRestart: mtcpd restarts on the server a process moved
// to. The process lives on (restored, it is mtcpd's child, and redis
// here was started with a parent-death signal, by unshare --kill-child),
// its client is served on, and the next migration takes its connection
// for what it is, one whose client dialled s1 (it went to s3 as a
// connection of s2's own before), and leaves nothing of it on s2.
func TestProcessTargetRestart(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager"})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	gc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	loop := startGoLoop(t, gc)
	progress := func(when string) {
		t.Helper()
		before := loop.count()
		eventually(t, 10*time.Second, "the client to be served "+when, func() (bool, string) {
			return loop.count() > before+100, fmt.Sprint(loop.count() - before)
		})
	}
	progress("at first")
	r.MigrateProcess(bed.S2)
	progress("on s2")
	p.RestartDaemon(bed.S2)
	progress("after s2's mtcpd restarted")
	if pool.ListenerPID(bed.S2, r.Port) != r.PID {
		t.Fatalf("redis (pid %d) no longer listens on s2 after its mtcpd restarted", r.PID)
	}
	r.MigrateProcess(bed.S3)
	progress("on s3")
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if e := flowElems(t, bed.S2, client, ""); len(e) != 0 {
		t.Errorf("s2 keeps rules of a connection that left it: %v", e)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessSourceStopsMidMigration: the source's mtcpd is told to stop
// (SIGTERM, as for an upgrade) while a process migration is under way,
// the target still restoring (MTCP_FAULT=restore-delay on s2): the
// daemon lets the migration finish before it exits, rather than leave the
// process stopped at the source with its connections held.
func TestProcessSourceStopsMidMigration(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager",
		Env: map[string][]string{"mtcpd-s2": {daemon.FaultEnv + "=restore-delay=1500ms"}}})
	r, _, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	type result struct {
		rep *admin.ProcessReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
		done <- result{rep, err}
	}()
	time.Sleep(500 * time.Millisecond) // s2 sits in its restore delay, the process stopped here
	if err := p.Signal("mtcpd-s1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil || res.rep == nil || res.rep.Aborted {
		t.Fatalf("the migration under way when s1's mtcpd was told to stop: %v (report %+v)", res.err, res.rep)
	}
	old := r.PID
	r.Host, r.PID = bed.S2, res.rep.NewPID
	before := loop.count()
	eventually(t, 10*time.Second, "the client to be served from s2", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", old)); err == nil {
		t.Errorf("the source's copy (pid %d) is still there", old)
	}
	p.RestartDaemon(bed.S1) // exited once the migration was done
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessRestoreDeadline: the target takes longer to restore than the
// source gives it (MTCP_FAULT=restore-delay=3s on s2, restore-deadline=1s
// on s1): the migration aborts, the process carries on at s1 with its
// client, and s2, which learns of the abort while it waits, restores
// nothing and keeps nothing of it.
func TestProcessRestoreDeadline(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager", Env: map[string][]string{
		"mtcpd-s1": {daemon.FaultEnv + "=restore-deadline=1s"},
		"mtcpd-s2": {daemon.FaultEnv + "=restore-delay=3s"}}})
	r, gc, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t0 := time.Now()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
	if err == nil && (rep == nil || !rep.Aborted) {
		t.Fatalf("the migration went ahead past its restore deadline: %+v", rep)
	}
	if took := time.Since(t0); took > 2500*time.Millisecond {
		t.Errorf("the migration took %v to give up; its restore deadline is 1 s", took)
	}
	time.Sleep(3 * time.Second) // past s2's delay
	stayedAtS1(t, bed, r, client, loop, rsts)
}

// stayedAtS1 checks what an aborted process migration from s1 to s2
// leaves: the client served at s1 again, without error or RST, and
// nothing of the process on s2, neither a copy nor rules.
func stayedAtS1(t *testing.T, bed *testbed.Bed, r *pool.Redis, client netip.AddrPort, loop *goLoop, rsts func() (int, int)) {
	t.Helper()
	before := loop.count()
	eventually(t, 10*time.Second, "the client to be served at s1 again", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	if pid := pool.ListenerPID(bed.S2, r.Port); pid != 0 {
		t.Errorf("s2 keeps a copy of the process (pid %d) of an aborted migration", pid)
	}
	if e := flowElems(t, bed.S2, client, ""); len(e) != 0 {
		t.Errorf("s2 keeps rules of an aborted migration: %v", e)
	}
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client saw %d RSTs and sent %d", in, out)
	}
}

// redisWithClient starts redis on h and a client busy with it, and
// returns them once the client runs.
func redisWithClient(t *testing.T, p *pool.Pool, h *testbed.Host) (*pool.Redis, *net.TCPConn, *goLoop) {
	t.Helper()
	r := p.StartRedis(h, pool.RedisOptions{})
	gc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gc.Close() })
	loop := startGoLoop(t, gc)
	eventually(t, 10*time.Second, "the client to run", func() (bool, string) { return loop.count() > 100, fmt.Sprint(loop.count()) })
	return r, gc, loop
}

// TestProcessSourceCrashWhileRestoring: the source's mtcpd dies (SIGKILL)
// while the target restores (MTCP_FAULT=restore-delay on s2), the process
// stopped at s1 with its sockets in repair mode. Started again, s1's
// mtcpd finds the migration's journal, aborts it on s2 and lets the
// process carry on at s1 with its client. (Before, the process stayed
// stopped until someone noticed.)
func TestProcessSourceCrashWhileRestoring(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager",
		Env: map[string][]string{"mtcpd-s2": {daemon.FaultEnv + "=restore-delay=2s"}}})
	r, gc, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
		done <- err
	}()
	eventually(t, 10*time.Second, "redis to be stopped for its dump", func() (bool, string) {
		st := testbed.ProcState(r.PID)
		return st == "T", st
	})
	time.Sleep(300 * time.Millisecond) // s2 sits in its restore delay
	if err := p.Signal("mtcpd-s1", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil {
		t.Fatal("the migration succeeded although its source's mtcpd was killed")
	}
	stalled := loop.count()
	p.RestartDaemon(bed.S1)
	eventually(t, 20*time.Second, "the client to be served at s1 again", func() (bool, string) {
		return loop.count() > stalled+100, fmt.Sprint(loop.count() - stalled)
	})
	if pid := pool.ListenerPID(bed.S1, r.Port); pid != r.PID {
		t.Errorf("redis on s1 is pid %d, want %d", pid, r.PID)
	}
	time.Sleep(2 * time.Second) // past s2's restore delay
	if pid := pool.ListenerPID(bed.S2, r.Port); pid != 0 {
		t.Errorf("s2 keeps a copy (pid %d) of a migration its source undid", pid)
	}
	if e := flowElems(t, bed.S2, client, ""); len(e) != 0 {
		t.Errorf("s2 keeps rules of an undone migration: %v", e)
	}
	left, _ := filepath.Glob(daemon.CheckpointGlob(bed.S1.Name, filepath.Join(p.SocketDir(bed.S1), "admin.sock")))
	if len(left) != 0 {
		t.Errorf("s1's checkpoints left: %v", left)
	}
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessSourceCrashAfterSwitch: the source's mtcpd dies right after
// the switch, before it had the target commit (MTCP_FAULT=
// process-commit-crash on s1), once the target has committed but before
// its journal says so (process-committed-crash), or once the journal
// says so, before it killed its stopped copy (process-retire-crash).
// Started again, it finishes the migration: the target commits if it has
// not (and answers a second commit as it did the first), the copy at s1
// is killed, and the client is served from s2 throughout.
func TestProcessSourceCrashAfterSwitch(t *testing.T) {
	skipUnlessProcessMode(t)
	for _, fault := range []string{"process-commit-crash", "process-committed-crash", "process-retire-crash"} {
		t.Run(fault, func(t *testing.T) { sourceCrashAfterSwitch(t, fault) })
	}
}

func sourceCrashAfterSwitch(t *testing.T, fault string) {
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager",
		Env: map[string][]string{"mtcpd-s1": {daemon.FaultEnv + "=" + fault}}})
	r, gc, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil); err == nil {
		t.Fatal("the migration reported its end although its source's mtcpd was to die before the commit")
	}
	before := loop.count()
	eventually(t, 10*time.Second, "the client to be served from s2", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	if st := testbed.ProcState(r.PID); st != "T" {
		t.Fatalf("s1's copy of redis is %q, want stopped (T) until s1's mtcpd is back", st)
	}
	p.RestartDaemon(bed.S1)
	eventually(t, 20*time.Second, "s1's stopped copy to be killed", func() (bool, string) {
		st := testbed.ProcState(r.PID)
		return st == "" || st == "Z", st
	})
	if pid := pool.ListenerPID(bed.S2, r.Port); pid == 0 {
		t.Error("no redis listens on s2")
	} else {
		r.Host, r.PID = bed.S2, pid // for the cleanup
	}
	if e := flowElems(t, bed.S2, client, ""); len(e) == 0 {
		t.Error("s2 has no reply rewrite for the client's connection")
	}
	left, _ := filepath.Glob(daemon.CheckpointGlob(bed.S1.Name, filepath.Join(p.SocketDir(bed.S1), "admin.sock")))
	if len(left) != 0 {
		t.Errorf("s1's checkpoints left: %v", left)
	}
	before = loop.count()
	eventually(t, 10*time.Second, "the client to be served from s2 still", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessSilentKeepsRules: a connection of a migrated process that
// stays silent for longer than its rules' idle timeout (flow_idle, 2 s
// here) keeps them, as in connection mode (TestSilentSessionKeepsRules):
// the target refreshes them while the socket lives.
func TestProcessSilentKeepsRules(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	const idle = 2 * time.Second
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager", FlowIdle: idle})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	gc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	rc := newRESP(gc)
	if _, err := rc.do("SET", "k", "v"); err != nil {
		t.Fatal(err)
	}
	r.MigrateProcess(bed.S2)
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	time.Sleep(3 * idle) // silent
	for _, h := range []*testbed.Host{bed.S1, bed.S2} {
		if e := flowElems(t, h, client, ""); len(e) == 0 {
			t.Fatalf("after %v of silence, %s has no rules for the connection", 3*idle, h.Name)
		}
	}
	gc.SetDeadline(time.Now().Add(10 * time.Second))
	if got, err := rc.do("GET", "k"); err != nil || got != "v" {
		t.Fatalf("GET k after the silence: %q, %v", got, err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessEndedRulesGo: the rules of a process's connection that ended
// after the process moved go (the reply rewrite at the target, the
// forward at the steering point), while those of its connection that
// lives on stay and it goes on working. No application reports a
// process's connections: the daemon looks for their sockets (here every
// 300 ms, MTCP_FAULT=unclaimed-reap).
func TestProcessEndedRulesGo(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	env := map[string][]string{}
	for _, h := range []string{"s1", "s2", "s3"} {
		env["mtcpd-"+h] = []string{daemon.FaultEnv + "=unclaimed-reap=300ms"}
	}
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager", Env: env})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	var conns []*respClient
	var clients []netip.AddrPort
	for range 2 {
		gc, err := r.Dial()
		if err != nil {
			t.Fatal(err)
		}
		defer gc.Close()
		gc.SetDeadline(time.Now().Add(30 * time.Second))
		rc := newRESP(gc)
		if _, err := rc.do("SET", "k", "v"); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, rc)
		clients = append(clients, pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort()))
	}
	r.MigrateProcess(bed.S2)
	for _, c := range clients {
		for _, h := range []*testbed.Host{bed.S1, bed.S2} {
			if e := flowElems(t, h, c, ""); len(e) == 0 {
				t.Fatalf("after the migration %s has no rules for %v", h.Name, c)
			}
		}
	}
	if got, err := conns[0].do("GET", "k"); err != nil || got != "v" {
		t.Fatalf("GET k after the migration: %q, %v", got, err)
	}
	conns[0].c.Close()
	pool.Eventually(t, 10*time.Second, "the ended connection's rules to go", func() (bool, string) {
		e1, e2 := flowElems(t, bed.S1, clients[0], ""), flowElems(t, bed.S2, clients[0], "")
		return len(e1)+len(e2) == 0, fmt.Sprintf("s1 %v, s2 %v", e1, e2)
	})
	time.Sleep(time.Second) // more sweeps
	for _, h := range []*testbed.Host{bed.S1, bed.S2} {
		if e := flowElems(t, h, clients[1], ""); len(e) == 0 {
			t.Fatalf("%s lost the rules of the connection that lives on", h.Name)
		}
	}
	if got, err := conns[1].do("GET", "k"); err != nil || got != "v" {
		t.Fatalf("GET k on the connection that lives on: %q, %v", got, err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the clients saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessLazyPagesBreak: the page stream of a lazy migration breaks
// right after the target restored the process (MTCP_FAULT=
// target-pages-refuse on s2), or once every page is there, which lets the
// source commit meanwhile (target-pages-end-refuse), so the target kills
// its copy, without a word to the clients. The source lets its own copy
// carry on instead of killing it too (told by the target's answer to its
// commit, the second time): redis runs at s1, serves a new client and the
// connection from before, no RST, and s2 keeps no copy and no rules. In
// "home", redis first moves to s2, and the pages break on its way back to
// s1, where its connections are restored on their own address (no
// rewrite): s2's copy carries on.
func TestProcessLazyPagesBreak(t *testing.T) {
	skipUnlessProcessMode(t)
	for _, fault := range []string{"target-pages-refuse", "target-pages-end-refuse"} {
		t.Run(fault, func(t *testing.T) { lazyPagesBreak(t, fault, false) })
	}
	t.Run("home", func(t *testing.T) { lazyPagesBreak(t, "target-pages-refuse", true) })
}

func lazyPagesBreak(t *testing.T, fault string, home bool) {
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	from, to := bed.S1, bed.S2
	if home {
		from, to = bed.S2, bed.S1
	}
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "lazy",
		Env: map[string][]string{"mtcpd-" + to.Name: {daemon.FaultEnv + "=" + fault}}})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	gc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	gc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := newRESP(gc).do("SET", "k", "v"); err != nil {
		t.Fatal(err)
	}
	if home {
		r.MigrateProcess(bed.S2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.Admin(from).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: to.Name}, nil); err == nil {
		t.Fatal("the migration reported success although its pages stopped coming")
	} else {
		t.Logf("migration: %v", err)
	}
	eventually(t, 10*time.Second, "redis at "+from.Name+" to run", func() (bool, string) {
		st := testbed.ProcState(r.PID)
		return st == "S" || st == "R", st
	})
	// A new client dials the address of the server redis runs on (new
	// connections to the address it left are not forwarded).
	at := *r
	at.Home = from
	nc, err := at.Dial()
	if err != nil {
		t.Fatalf("a new client of %s's redis: %v", from.Name, err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	if got, err := newRESP(nc).do("GET", "k"); err != nil || got != "v" {
		t.Fatalf("GET k at %s: %q, %v", from.Name, got, err)
	}
	if pid := pool.ListenerPID(to, r.Port); pid != 0 {
		t.Errorf("a redis (pid %d) listens on %s", pid, to.Name)
	}
	if !home { // s1 forwards the flows to s2 in "home"
		noProcessRules(t, bed, to)
	}
	// The client from before the migration is served there too.
	if got, err := newRESP(gc).do("GET", "k"); err != nil || got != "v" {
		t.Errorf("GET k on the connection from before the migration: %q, %v", got, err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the clients saw %d RSTs and sent %d", in, out)
	}
}

// TestConnsListsProcesses: `mtcpctl conns` (the admin API's conns) lists,
// beside the connections of the application registered with mtcpd, those
// of a server process that knows nothing of mtcp (redis), with its pid and
// command, where it lives: at s1, then at s2 after process mode moved it,
// with the address its client dialled. Migrating such a connection on its
// own is refused with an error that names the process to move instead.
func TestConnsListsProcesses(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager"})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rc, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if got, err := newRESP(rc).do("PING"); err != nil || got != "PONG" {
		t.Fatalf("PING: %q %v", got, err)
	}
	kv := p.Dial(bed.S1, false)
	defer kv.Close()
	client := pool.Unmap(rc.LocalAddr().(*net.TCPAddr).AddrPort()).String()
	kvClient := pool.Unmap(kv.LocalAddr().(*net.TCPAddr).AddrPort()).String()
	dialled := netip.AddrPortFrom(pool.Addr(bed.S1, false), r.Port).String()

	// find waits until h's mtcpd lists the connection from c.
	find := func(h *testbed.Host, c string) admin.Conn {
		t.Helper()
		var found admin.Conn
		eventually(t, 10*time.Second, h.Name+" to list the connection from "+c, func() (bool, string) {
			conns, err := p.Admin(h).Conns(context.Background())
			for _, cn := range conns {
				if cn.Client == c {
					found = cn
					return true, ""
				}
			}
			return false, fmt.Sprintf("%+v %v", conns, err)
		})
		return found
	}
	want := admin.Conn{Client: client, Service: dialled, Local: dialled, PID: r.PID, Command: "redis-server", State: "ESTABLISHED"}
	got := find(bed.S1, client)
	if got.Client != want.Client || got.Service != want.Service || got.Local != want.Local || got.PID != want.PID ||
		got.Command != want.Command || got.App != "" || got.State != want.State || got.Migratable != "" {
		t.Errorf("s1 lists redis's connection as %+v, want %+v", got, want)
	}
	if kvc := find(bed.S1, kvClient); kvc.App == "" || kvc.PID != 0 {
		t.Errorf("s1 lists the application's connection as %+v, want it served by its application, with no pid", kvc)
	}

	_, err = p.Admin(bed.S1).Migrate(context.Background(), &admin.MigrateRequest{Flows: []string{client}, To: "s2"})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("--pid %d", r.PID)) {
		t.Errorf("migrating redis's connection on its own: %v, want an error naming --pid %d", err, r.PID)
	}

	r.MigrateProcess(bed.S2)
	want.Local = netip.AddrPortFrom(pool.Addr(bed.S2, false), r.Port).String()
	want.PID = r.PID
	got = find(bed.S2, client)
	if got.Client != want.Client || got.Service != want.Service || got.Local != want.Local || got.PID != want.PID ||
		got.Command != want.Command || got.App != "" {
		t.Errorf("s2 lists redis's connection as %+v, want %+v", got, want)
	}
	conns, err := p.Admin(bed.S1).Conns(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range conns {
		if c.Client == client {
			t.Errorf("s1 still lists redis's connection after it moved: %+v", c)
		}
	}
	if got, err := newRESP(rc).do("PING"); err != nil || got != "PONG" {
		t.Fatalf("PING after the move: %q %v", got, err)
	}
}

// TestProcessAcceptedDuringDump: redis accepts a connection after s1's
// mtcpd has listed its sockets and before it dumps it (the window widened
// to a second by MTCP_FAULT=listed-delay=1s). The checkpoint has that
// connection, but nothing would have held or switched it, and its client
// would have been reset: the migration is undone and starts again, and
// moves it with the others. Both clients go on at s2 without an error or
// a reset.
func TestProcessAcceptedDuringDump(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager",
		Env: map[string][]string{"mtcpd-s1": {daemon.FaultEnv + "=listed-delay=1s"}}})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	first, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	loop := startGoLoop(t, first)
	eventually(t, 10*time.Second, "the first client to run", func() (bool, string) {
		return loop.count() > 100, fmt.Sprint(loop.count())
	})

	type result struct {
		rep *admin.ProcessReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{Port: r.Port, To: "s2"}, nil)
		done <- result{rep, err}
	}()
	time.Sleep(300 * time.Millisecond) // listed, not dumped yet
	late, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	lc := newRESP(late)
	if got, err := lc.do("SET", "late", "before"); err != nil || got != "OK" {
		t.Fatalf("SET on the late connection: %q %v", got, err)
	}
	res := <-done
	if res.err != nil {
		t.Fatalf("migration: %v (report %+v)", res.err, res.rep)
	}
	r.Host, r.PID = bed.S2, res.rep.NewPID
	var retries int
	for _, ph := range res.rep.Phases {
		if ph.Name == admin.PhaseRetry {
			retries++
		}
	}
	t.Logf("moved with %d connections after %d retries, phases %+v", res.rep.Conns, retries, res.rep.Phases)
	if retries != 1 || res.rep.Conns != 2 {
		t.Errorf("%d retries and %d connections moved, want 1 retry and both connections", retries, res.rep.Conns)
	}
	if got, err := lc.do("GET", "late"); err != nil || got != "before" {
		t.Fatalf("GET on the late connection after the move: %q %v", got, err)
	}
	if got, err := lc.do("SET", "late", "after"); err != nil || got != "OK" {
		t.Fatalf("SET on the late connection after the move: %q %v", got, err)
	}
	before := loop.count()
	eventually(t, 10*time.Second, "the first client to go on", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("first client: %v", err)
	}
	if pid := pool.ListenerPID(bed.S2, r.Port); pid != r.PID {
		t.Errorf("the listener on s2 belongs to pid %d, want %d", pid, r.PID)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Errorf("the client host saw %d resets in, %d out on port %d", in, out, r.Port)
	}
}

// TestProcessMovesUnderNewConnections: clients connect to redis every
// 2 ms while it moves s1 -> s2. Each attempt finds connections accepted
// or queued during its dump (CRIU refuses to dump a listener with a
// queue), is undone and starts again; the last one goes through without
// them. The migration succeeds, its report counts what did not move, and
// the connections that were there before it keep working at s2.
func TestProcessMovesUnderNewConnections(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager"})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	first, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	loop := startGoLoop(t, first)
	var before []net.Conn
	for range 20 {
		c, err := r.Dial()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		before = append(before, c)
	}

	stop := make(chan struct{})
	churned := make(chan []net.Conn, 1)
	go func() {
		var cs []net.Conn
		defer func() { churned <- cs }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if c, err := r.Dial(); err == nil {
				cs = append(cs, c)
			}
		}
	}()
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{Port: r.Port, To: "s2"}, nil)
	close(stop)
	for _, c := range <-churned {
		defer c.Close()
	}
	if err != nil {
		t.Fatalf("migration under new connections: %v", err)
	}
	r.Host, r.PID = bed.S2, rep.NewPID
	retries := 0
	for _, ph := range rep.Phases {
		if ph.Name == admin.PhaseRetry {
			retries++
		}
	}
	t.Logf("moved %d connections after %d retries; %d did not move", rep.Conns, retries, rep.Unmoved)
	if retries == 0 {
		t.Errorf("no retry: every attempt should have found connections accepted or queued during its dump")
	}
	for i, c := range before {
		if got, err := newRESP(c).do("PING"); err != nil || got != "PONG" {
			t.Errorf("connection %d, from before the migration: PING after it: %q %v", i, got, err)
		}
	}
	before0 := loop.count()
	eventually(t, 10*time.Second, "the first client to go on", func() (bool, string) {
		return loop.count() > before0+100, fmt.Sprint(loop.count() - before0)
	})
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("first client: %v", err)
	}
}

// TestProcessCommitUnanswered: the target leaves the commits of the first
// 14 s after its restore unanswered, as if lost on the way
// (MTCP_FAULT=process-finish-unanswered on s2), longer than the source
// asks for (10 s). The source kills its stopped copy only once the target
// has answered: it reports the commit unconfirmed, keeps the copy stopped,
// and asks again in the background, as after a restart, until the commit
// goes through; then its copy goes, and the client, served at s2
// throughout, never notices. (The source used to kill its copy when it
// gave up asking, leaving the process to the target's timeout, which
// kills an uncommitted copy: the process ran nowhere.)
func TestProcessCommitUnanswered(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager",
		Env: map[string][]string{"mtcpd-s2": {daemon.FaultEnv + "=process-finish-unanswered=14s"}}})
	r, _, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
	if err == nil || rep == nil || rep.Aborted || !strings.Contains(err.Error(), "no answer to the commit") {
		t.Fatalf("migration whose commit goes unanswered: %v (report %+v), want it reported unconfirmed, not aborted", err, rep)
	}
	t.Logf("migration: %v", err)
	if st := testbed.ProcState(r.PID); st != "T" {
		t.Fatalf("the source's copy is %q once the commit went unanswered, want stopped (T): it must stay until the target answers", st)
	}
	old := r.PID
	r.Host, r.PID = bed.S2, rep.NewPID
	eventually(t, 20*time.Second, "the commit to go through and the source's copy to go", func() (bool, string) {
		_, err := os.Stat(fmt.Sprintf("/proc/%d", old))
		return err != nil, testbed.ProcState(old)
	})
	before := loop.count()
	eventually(t, 10*time.Second, "the client to be served from s2", func() (bool, string) {
		return loop.count() > before+100, fmt.Sprint(loop.count() - before)
	})
	if st := testbed.ProcState(r.PID); st != "S" && st != "R" {
		t.Fatalf("s2's copy is %q, want running", st)
	}
	if _, _, err := loop.finish(); err != nil {
		t.Fatalf("client: %v", err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		t.Fatalf("the client saw %d RSTs and sent %d", in, out)
	}
}

// TestProcessAbortUnanswered: s2 restores the process, but its answer is
// lost (restored-hang), so the source gives up (restore-deadline=1s on
// s1) and aborts; s2 leaves the abort unanswered and unhandled too, as if
// lost on the way (process-finish-unanswered=6s), its copy alive. The
// source must not resume its copy beside s2's: it reports the abort
// unconfirmed, keeps its copy stopped and asks again in the background
// until s2 has answered, which it does once its copy is gone. Then the process carries
// on at s1 with its client, and s2 keeps nothing. (The source used to
// resume at once: two live copies, s2's until its timeout.)
func TestProcessAbortUnanswered(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager", Env: map[string][]string{
		"mtcpd-s1": {daemon.FaultEnv + "=restore-deadline=1s"},
		"mtcpd-s2": {daemon.FaultEnv + "=restored-hang,process-finish-unanswered=6s"}}})
	r, gc, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
	if err == nil || rep == nil || rep.Aborted || !strings.Contains(err.Error(), "no answer to the abort") {
		t.Fatalf("migration whose abort goes unanswered: %v (report %+v), want it reported unconfirmed", err, rep)
	}
	t.Logf("migration: %v", err)
	// Never two live copies: s1's resumes only once s2's is gone.
	eventually(t, 30*time.Second, "s1's copy to resume", func() (bool, string) {
		st := testbed.ProcState(r.PID)
		running := st == "S" || st == "R"
		if pid := pool.ListenerPID(bed.S2, r.Port); running && pid != 0 {
			t.Fatalf("s1's copy runs (%s) while s2's (pid %d) does too", st, pid)
		}
		return running, st
	})
	stayedAtS1(t, bed, r, client, loop, rsts)
}

// TestProcessPagesStall: the target of an eager migration never reads its
// page images (MTCP_FAULT=pages-in-hang on s2), its connection open. The
// source gives up once the transfer has made no progress for a while
// (pages-stall=1s on s1, 30 s by default) rather than keep the process
// stopped until the request's own end: the migration aborts within
// seconds, and the process carries on at s1 with its client.
func TestProcessPagesStall(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager", Env: map[string][]string{
		"mtcpd-s1": {daemon.FaultEnv + "=pages-stall=1s"},
		"mtcpd-s2": {daemon.FaultEnv + "=pages-in-hang"}}})
	r, gc, loop := redisWithClient(t, p, bed.S1)
	rsts := watchPortRSTs(t, bed.Client, r.Port)
	client := pool.Unmap(gc.LocalAddr().(*net.TCPAddr).AddrPort())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	t0 := time.Now()
	rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
	took := time.Since(t0)
	if err == nil || rep == nil || !rep.Aborted || !strings.Contains(err.Error(), "sending the memory pages") {
		t.Fatalf("migration to a target that reads no pages: %v (report %+v), want it aborted while sending the pages", err, rep)
	}
	if took > 10*time.Second {
		t.Errorf("the migration took %v to give up on a stalled transfer", took)
	}
	t.Logf("aborted after %v: %v", took.Round(time.Millisecond), err)
	stayedAtS1(t, bed, r, client, loop, rsts)
}

// TestProcessForkDuringMigration: redis forks a child (BGSAVE, slowed by
// rdb-key-save-delay) after the source listed its process tree and before
// the dump (MTCP_FAULT=listed-delay on s1). The child is in the
// checkpoint, stopped with its parent, so it belongs to the migration:
// when the migration is undone (s2 never reads the page images,
// pages-in-hang, and s1 gives up after pages-stall), it resumes with its
// parent. (It stayed stopped for good, and redis's BGSAVE with it.)
func TestProcessForkDuringMigration(t *testing.T) {
	skipUnlessProcessMode(t)
	bed := testbed.ForTest(t)
	testbed.RequireNetns(t)
	p := pool.Start(t, bed, pool.Options{Quiet: true, ProcessPages: "eager", Env: map[string][]string{
		"mtcpd-s1": {daemon.FaultEnv + "=listed-delay=3s,pages-stall=1s"},
		"mtcpd-s2": {daemon.FaultEnv + "=pages-in-hang"}}})
	r := p.StartRedis(bed.S1, pool.RedisOptions{})
	c, err := r.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	rc := newRESP(c)
	for i := range 50 {
		if _, err := rc.do("SET", fmt.Sprint("k", i), "v"); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := rc.do("CONFIG", "SET", "rdb-key-save-delay", "100000"); err != nil || got != "OK" {
		t.Fatalf("CONFIG SET rdb-key-save-delay: %q %v", got, err)
	}
	type result struct {
		rep *admin.ProcessReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		rep, err := p.Admin(bed.S1).MigrateProcess(ctx, &admin.ProcessRequest{PID: r.PID, To: bed.S2.Name}, nil)
		done <- result{rep, err}
	}()
	time.Sleep(1500 * time.Millisecond) // within the listed-delay: the tree is listed
	if got, err := rc.do("BGSAVE"); err != nil || !strings.Contains(got, "started") {
		t.Fatalf("BGSAVE: %q %v", got, err)
	}
	kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", r.PID, r.PID))
	var child int
	if _, err := fmt.Sscan(string(kids), &child); err != nil {
		t.Fatalf("redis's BGSAVE child: %q %v", kids, err)
	}
	t.Cleanup(func() { syscall.Kill(child, syscall.SIGKILL) })
	res := <-done
	if res.err == nil || res.rep == nil || !res.rep.Aborted {
		t.Fatalf("migration to a target that reads no pages: %v (report %+v), want it aborted", res.err, res.rep)
	}
	eventually(t, 5*time.Second, "the BGSAVE child to resume with its parent", func() (bool, string) {
		st := testbed.ProcState(child)
		return st != "T", st
	})
	if got, err := rc.do("GET", "k7"); err != nil || got != "v" {
		t.Fatalf("GET at s1 after the abort: %q %v", got, err)
	}
}

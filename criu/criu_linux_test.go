package criu_test

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
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/criu"
	"github.com/mtcp-dev/mtcp/nat/netns"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// skipUnlessCRIU skips the test unless CRIU ≥ 4.2 answers.
func skipUnlessCRIU(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("criu: needs root")
	}
	if _, err := criu.Check(context.Background(), criu.Options{}); err != nil {
		t.Skipf("criu: %v", err)
	}
}

func TestCheck(t *testing.T) {
	skipUnlessCRIU(t)
	v, err := criu.Check(context.Background(), criu.Options{})
	if err != nil || v.Less(criu.MinVersion) {
		t.Fatalf("Check: %v %v", v, err)
	}
	_, err = criu.Check(context.Background(), criu.Options{Path: "/nonexistent/criu"})
	if err == nil || !strings.Contains(err.Error(), "setup-criu.sh") {
		t.Fatalf("missing CRIU: %v", err)
	}
}

// TestDumpStreamRestore moves a redis-server with one client connection
// from s1 to s2: dump (left stopped), pages streamed over a TCP
// connection, socket addresses rewritten, restore in s2's namespace.
// startRedis starts a redis-server in s1 (in a PID namespace of its own,
// so that its PID is free on s2) and connects a client to it from the
// client host, with one SET answered. The server is killed at the end of
// the test.
func startRedis(t *testing.T) (*testbed.Bed, net.Conn, *bufio.Reader) {
	t.Helper()
	testbed.RequireNetns(t)
	skipUnlessCRIU(t)
	redis, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server is not installed (tests/setup.sh installs it)")
	}
	bed := testbed.ForTest(t)
	dir := t.TempDir()
	srv := bed.S1.Command(context.Background(), "unshare", "--pid", "--fork", "--kill-child", "setsid", redis, "--port", "6379", "--bind", "0.0.0.0",
		"--save", "", "--appendonly", "no", "--protected-mode", "no", "--enable-debug-command", "yes", "--logfile", dir+"/redis.log")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })

	var c net.Conn
	svc := netip.AddrPortFrom(bed.S1.LAN4, 6379)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err = netns.Do(bed.Client.NetNSPath(), func() (err error) {
			c, err = net.DialTimeout("tcp", svc.String(), time.Second)
			return err
		})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := bufio.NewReader(c)
	fmt.Fprint(c, "SET k hello\r\n")
	if l, _ := r.ReadString('\n'); l != "+OK\r\n" {
		t.Fatalf("SET: %q", l)
	}
	return bed, c, r
}

func TestDumpStreamRestore(t *testing.T) {
	bed, c, _ := startRedis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	waitQuiet(t, bed.S1)
	pid := redisPID(t, bed.S1)
	src, dst := checkpointDirs(t, "page-server.log")
	pc, conn := loopbackPair(t)
	served := make(chan error, 1)
	go func() {
		err := criu.ServePages(ctx, criu.PageServerOptions{Options: criu.Options{}, Dir: dst, Conn: conn})
		if err != nil {
			t.Logf("ServePages: %v", err)
			pc.Close()
		}
		served <- err
	}()
	var res *criu.DumpResult
	err := netns.Do(bed.S1.NetNSPath(), func() (err error) {
		res, err = criu.Dump(ctx, criu.DumpOptions{Options: criu.Options{}, PID: pid, Dir: src, Pages: pc, LeaveStopped: true})
		return err
	})
	pc.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	t.Logf("dump: %+v", res)
	defer syscall.Kill(pid, syscall.SIGKILL)
	waitState(t, pid, "T")
	names, err := criu.Images(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasPrefix(n, "pages-") {
			t.Errorf("page image %s written on the source", n)
		}
		b, err := os.ReadFile(src + "/" + n)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst+"/"+n, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	n, err := criu.Rewrite(dst, map[netip.Addr]netip.Addr{bed.S1.LAN4: bed.S2.LAN4})
	if err != nil || n != 1 {
		t.Fatalf("rewrite: %d sockets, %v", n, err)
	}
	// Without mtcp's rewriting the restored socket's first segment (the
	// window probe sent when it leaves repair mode) reaches the client
	// from s2's address, and the client would answer it with a RST: drop
	// it there. (The daemon rewrites it instead; see tests/process_test.go.)
	if err := bed.Client.Nft(ctx, fmt.Sprintf("table inet crtest {\n chain in {\n type filter hook input priority 0; policy accept;\n ip saddr %s tcp sport 6379 drop\n }\n}\n", bed.S2.LAN4)); err != nil {
		t.Fatal(err)
	}
	rr := restoreIn(t, ctx, bed.S2, criu.RestoreOptions{Dir: dst})
	if st := testbed.ProcState(rr.PID); st == "" || st == "T" || st == "Z" {
		t.Fatalf("restored process: state %q", st)
	}
	// The connection lives in s2 with s2's address, in repair mode no more.
	var conns []repair.Conn
	netns.Do(bed.S2.NetNSPath(), func() (err error) {
		conns, err = repair.List(ctx, repair.ListOptions{Port: 6379})
		return err
	})
	want := netip.AddrPortFrom(bed.S2.LAN4, 6379)
	found := false
	for _, cn := range conns {
		if cn.Local == want && cn.Remote == c.LocalAddr().(*net.TCPAddr).AddrPort() {
			found = true
		}
	}
	if !found {
		t.Fatalf("no restored connection %v<-%v in s2: %+v", want, c.LocalAddr(), conns)
	}
	// The source is still there, stopped, until the caller decides.
	waitState(t, pid, "T")
}

// restoreIn restores o in h's namespace; the restored process is killed
// at the end of the test.
func restoreIn(t *testing.T, ctx context.Context, h *testbed.Host, o criu.RestoreOptions) *criu.RestoreResult {
	t.Helper()
	var rr *criu.RestoreResult
	err := netns.Do(h.NetNSPath(), func() (err error) {
		rr, err = criu.Restore(ctx, o)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	p, _ := os.FindProcess(rr.PID)
	t.Cleanup(func() { p.Kill(); p.Wait() })
	t.Logf("restored in %s as pid %d in %v", h.Name, rr.PID, rr.Took)
	return rr
}

// checkpointDirs makes the source's and the target's checkpoint
// directories; if the test fails, it logs the end of the dump's log, the
// target's log named targetLog and the restore's.
func checkpointDirs(t *testing.T, targetLog string) (src, dst string) {
	t.Helper()
	src, dst = t.TempDir(), t.TempDir()
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{src + "/dump.log", dst + "/" + targetLog, dst + "/restore.log"} {
				b, _ := os.ReadFile(f)
				t.Logf("%s:\n%s", f, lastLines(string(b), 20))
			}
		}
	})
	return src, dst
}

// loopbackPair returns the two ends of a loopback TCP connection, the
// page stream between a dump and its target in these tests. Both are
// closed at the end of the test.
func loopbackPair(t *testing.T) (a, b net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if a, err = net.Dial("tcp", ln.Addr().String()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if b, err = ln.Accept(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return a, b
}

// waitQuiet waits until redis's connections in h have nothing in flight
// (ss: empty Send-Q and Recv-Q), before a dump. These tests steer the
// client's segments to the restored copy themselves, without the hold
// the daemons put up: a segment still on its way at the dump (the
// client's delayed acknowledgement of redis's last reply) would reach the
// target before the restored socket exists and draw a RST there, which
// resets the connection once the copy is restored.
func waitQuiet(t *testing.T, h *testbed.Host) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := h.Run(context.Background(), "ss", "-Htn", "state", "established", "sport", "=", ":6379")
		if err != nil {
			t.Fatalf("ss: %v\n%s", err, out)
		}
		busy := ""
		for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && (f[0] != "0" || f[1] != "0") {
				busy = line
			}
		}
		if busy == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis's connection still has data in flight after 5 s: %s", busy)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// redisPID finds the redis-server in h's namespace.
func redisPID(t *testing.T, h *testbed.Host) int {
	t.Helper()
	var conns []repair.Conn
	err := netns.Do(h.NetNSPath(), func() (err error) {
		conns, err = repair.List(context.Background(), repair.ListOptions{Port: 6379, Owners: true})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range conns {
		for _, o := range c.Owners {
			return o.PID
		}
	}
	t.Fatalf("no redis connection in %s", h.Name)
	return 0
}

// waitState waits up to a second for process pid to be in state (as
// /proc/PID/stat says: "T" stopped, ...): CRIU stops a dumped tree with a
// signal, which takes effect asynchronously.
func waitState(t *testing.T, pid int, state string) {
	t.Helper()
	var st string
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(time.Millisecond) {
		if st = testbed.ProcState(pid); st == state {
			return
		}
	}
	t.Fatalf("pid %d: state %q, want %q", pid, st, state)
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

// TestLazyDumpRestore moves a redis-server holding some megabytes from s1
// to s2 post-copy: the restore in s2 runs once the images but the lazy
// pages are there, the pages follow on demand through a lazy-pages daemon
// and the page stream, and every value reads back intact through the
// client connection the server had before.
func TestLazyDumpRestore(t *testing.T) {
	bed, c, r := startRedis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	get := func(cmd string) string {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprint(c, cmd)
		l, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%q: %v", cmd, err)
		}
		if strings.HasPrefix(l, "$") {
			var n int
			fmt.Sscanf(l, "$%d", &n)
			b := make([]byte, n+2)
			if _, err := io.ReadFull(r, b); err != nil {
				t.Fatalf("%q: %v", cmd, err)
			}
			return string(b[:n])
		}
		return strings.TrimSpace(l)
	}
	if got := get("DEBUG POPULATE 20000 key 1000\r\n"); got != "+OK" {
		t.Fatalf("DEBUG POPULATE: %q", got)
	}
	values := make([]string, 20)
	for i := range values {
		b := make([]byte, 64<<10)
		for j := range b {
			b[j] = 'a' + byte((i*7+j*13)%26)
		}
		values[i] = string(b)
		// In RESP, not inline: redis refuses an inline request of
		// which it has 64 KiB without the end of the line yet.
		key := fmt.Sprintf("big%d", i)
		if got := get(fmt.Sprintf("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", len(key), key, len(values[i]), values[i])); got != "+OK" {
			t.Fatalf("SET big%d: %q", i, got)
		}
	}

	waitQuiet(t, bed.S1)
	pid := redisPID(t, bed.S1)
	src, dst := checkpointDirs(t, "lazy-pages.log")
	pc, lc := loopbackPair(t)

	var res *criu.DumpResult
	err := netns.Do(bed.S1.NetNSPath(), func() (err error) {
		res, err = criu.Dump(ctx, criu.DumpOptions{PID: pid, Dir: src, LeaveStopped: true, Lazy: true})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dump: %+v", res)
	waitState(t, pid, "T")
	procs, err := criu.CheckpointPIDs([]int{pid})
	if err != nil || len(procs) != 1 || procs[1] != pid {
		t.Fatalf("CheckpointPIDs(%d) = %v, %v; want 1 -> %d (redis is its PID namespace's first)", pid, procs, err, pid)
	}
	served := make(chan error, 1)
	go func() { served <- criu.ServeLazyPages(ctx, pc, procs) }()
	defer syscall.Kill(pid, syscall.SIGKILL)
	names, err := criu.Images(src)
	if err != nil {
		t.Fatal(err)
	}
	var size int64
	sizes := map[string]int{}
	for _, n := range names {
		b, err := os.ReadFile(src + "/" + n)
		if err != nil {
			t.Fatal(err)
		}
		size += int64(len(b))
		sizes[n] = len(b)
		if err := os.WriteFile(dst+"/"+n, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("images without the lazy pages: %d files, %d bytes", len(names), size)
	if size > 16<<20 {
		// Seen once in about 100 runs (CI, 2026-11-29); which image
		// held the bytes was not known then.
		t.Errorf("the images hold %d bytes: the memory was not left for later; by image: %v", size, sizes)
	}
	if n, err := criu.Rewrite(dst, map[netip.Addr]netip.Addr{bed.S1.LAN4: bed.S2.LAN4}); err != nil || n != 1 {
		t.Fatalf("rewrite: %d sockets, %v", n, err)
	}
	// As in TestDumpStreamRestore: the restored socket's first segment
	// leaves with s2's address, which the client would answer with a
	// RST; the client's own segments still reach s1's address, so
	// steer them to s2 the way the daemons' rules would.
	if err := bed.Client.Nft(ctx, fmt.Sprintf("table inet crtest {\n chain in {\n type filter hook input priority -200; policy accept;\n ip saddr %s tcp sport 6379 ip saddr set %s\n }\n chain out {\n type filter hook output priority -200; policy accept;\n ip daddr %s tcp dport 6379 ip daddr set %s\n }\n}\n",
		bed.S2.LAN4, bed.S1.LAN4, bed.S1.LAN4, bed.S2.LAN4)); err != nil {
		t.Fatal(err)
	}
	lp, err := criu.StartLazyPages(ctx, criu.LazyOptions{Dir: dst, Conn: lc})
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Kill()
	restoreIn(t, ctx, bed.S2, criu.RestoreOptions{Dir: dst, Lazy: true})
	// The first answers need pages still at the source.
	if got := get("GET k\r\n"); got != "hello" {
		t.Fatalf("GET k after the restore: %q", got)
	}
	for i, v := range values {
		if got := get(fmt.Sprintf("GET big%d\r\n", i)); got != v {
			t.Fatalf("GET big%d after the restore: %d bytes, not the %d bytes set", i, len(got), len(v))
		}
	}
	if err := lp.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if got := get("DBSIZE\r\n"); got != ":20021" {
		t.Fatalf("DBSIZE after every page came: %q", got)
	}
	waitState(t, pid, "T")
}

// lazyProgHead is what the lazy test programs share: waiting for the
// file named by their argument to appear (the test's go, once the
// program is restored; a signal sent right after a restore can be lost
// in CRIU's restorer), and filling and checking memory with a pattern.
const lazyProgHead = `#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#define MB (1UL << 20)
static void wait_for(const char *path) {
	while (access(path, F_OK)) usleep(1000);
}
static void ready_then_wait(const char *go) {
	printf("ready\n");
	fflush(stdout);
	fclose(stdout);
	wait_for(go);
}
static int child_status(pid_t ch, int bad) {
	int st;
	if (waitpid(ch, &st, 0) != ch || !WIFEXITED(st)) return bad;
	return WEXITSTATUS(st);
}
static unsigned char pat(size_t i, int seed) { return (unsigned char)(i * 131 + seed * 17 + (i >> 12)); }
static int check(unsigned char *m, size_t from, size_t to, int seed) {
	for (size_t i = from; i < to; i++)
		if (m[i] != pat(i, seed)) return 0;
	return 1;
}
static unsigned char *fill(size_t n, int seed) {
	unsigned char *m = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) _exit(2);
	for (size_t i = 0; i < n; i++) m[i] = pat(i, seed);
	return m;
}
`

// lazyEventsProg fills three 24 MiB mappings with patterns, says ready and
// waits for its go. Then, while its memory is still arriving post-copy,
// it forks a child that checks two of the mappings, moves the second
// mapping elsewhere (mremap), drops half of the third (madvise), unmaps a
// piece of the first, and checks what is left against the patterns and
// the dropped half for zeros. Its exit status says which check failed.
const lazyEventsProg = "#define _GNU_SOURCE\n" + lazyProgHead + `int main(int argc, char **argv) {
	size_t n = 24 * MB;
	unsigned char *a = fill(n, 1), *b = fill(n, 2), *c = fill(n, 3);
	ready_then_wait(argv[1]);
	pid_t ch = fork();
	if (ch < 0) return 3;
	if (ch == 0) _exit(check(a, 0, n, 1) && check(c, 0, n, 3) ? 0 : 10);
	void *dst = mmap(0, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *nb = mremap(b, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
	if (nb == MAP_FAILED || nb == b || !check(nb, 0, n, 2)) return 11;
	if (madvise(c, n / 2, MADV_DONTNEED)) return 12;
	for (size_t i = 0; i < n / 2; i++)
		if (c[i]) return 13;
	if (!check(c, n / 2, n, 3)) return 14;
	if (munmap(a + 8 * MB, 4 * MB)) return 15;
	if (!check(a, 0, 8 * MB, 1) || !check(a, 12 * MB, n, 1)) return 16;
	return child_status(ch, 17);
}
`

// TestLazyMemoryEvents moves a process post-copy and, while its pages are
// still arriving, has it fork, mremap, madvise and munmap (lazyEventsProg):
// the lazy-pages daemon must follow each change, fill the forked child's
// memory too, and leave dropped memory zero.
func TestLazyMemoryEvents(t *testing.T) {
	s := runLazyProg(t, lazyEventsProg)
	if s.Processes != 2 {
		t.Errorf("the daemon served %d processes, want 2 (the program and the child it forked while pages were missing)", s.Processes)
	}
}

// lazyTreeProg fills a mapping, forks a child that rewrites half of it
// and fills one of its own, and says ready once both are done. On the
// go both check their memory; the parent's exit status is its own
// check's or the child's.
const lazyTreeProg = lazyProgHead + `int main(int argc, char **argv) {
	size_t n = 24 * MB;
	unsigned char *a = fill(n, 1);
	int p[2];
	if (pipe(p)) return 3;
	pid_t ch = fork();
	if (ch < 0) return 4;
	if (ch == 0) {
		unsigned char *b = fill(n, 4);
		for (size_t i = 0; i < n / 2; i++) a[i] = pat(i, 5);
		close(p[0]);
		if (write(p[1], "x", 1) != 1) _exit(5);
		close(p[1]);
		wait_for(argv[1]);
		_exit(check(a, 0, n / 2, 5) && check(a, n / 2, n, 1) && check(b, 0, n, 4) ? 0 : 10);
	}
	char c;
	close(p[1]);
	if (read(p[0], &c, 1) != 1) return 6;
	close(p[0]);
	ready_then_wait(argv[1]);
	if (!check(a, 0, n, 1)) return 11;
	return child_status(ch, 12);
}
`

// TestLazyProcessTree moves a parent and its child post-copy, their
// memory partly shared copy-on-write, partly each its own
// (lazyTreeProg): each must get its own pages.
func TestLazyProcessTree(t *testing.T) {
	s := runLazyProg(t, lazyTreeProg)
	if s.Processes != 2 {
		t.Errorf("the daemon served %d processes, want 2", s.Processes)
	}
}

// lazyCheckProg fills a 256 MiB mapping, says ready, and on its go checks
// it against the pattern (exit status 10 if it differs). Its pages take
// the background transfer most of a second here, long after the restore
// is done.
const lazyCheckProg = lazyProgHead + `int main(int argc, char **argv) {
	size_t n = 256 * MB;
	unsigned char *a = fill(n, 1);
	ready_then_wait(argv[1]);
	return check(a, 0, n, 1) ? 0 : 10;
}
`

// TestLazyStreamBreak restores a process post-copy through a page stream
// that fails right after the restore, most of its pages still to come
// (lazyCheckProg): the daemon fails, and the process, faulting on a
// missing page, waits rather than run on with zeros in its place; it dies
// when killed.
func TestLazyStreamBreak(t *testing.T) {
	s := runLazyProgOn(t, lazyCheckProg, true)
	if all := 256 << 20 / 4096; s.Pages >= all {
		t.Errorf("%d pages came before the stream broke, all of the program's %d: the test shows nothing", s.Pages, all)
	}
}

// lazyRaceProg fills 16 MiB and maps another 16 MiB it never touches
// (none of it in the checkpoint), says ready and waits for its go. Then
// one thread drops a small mapping with madvise again and again (each a
// memory-map event the lazy-pages daemon must read before it can fill
// any page) while another touches every untouched page (each a fault
// the daemon answers with a zero page), and the main thread checks the
// filled memory. Its exit status says which check failed.
const lazyRaceProg = "#define _GNU_SOURCE\n#include <pthread.h>\n" + lazyProgHead + `static unsigned char *small;
static volatile int stop;
static void *dropper(void *arg) {
	while (!stop)
		if (madvise(small, 64 << 10, MADV_DONTNEED)) return (void *)1;
	return 0;
}
int main(int argc, char **argv) {
	size_t n = 16 * MB;
	unsigned char *a = fill(n, 1);
	unsigned char *fresh = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	small = fill(64 << 10, 2);
	if (fresh == MAP_FAILED) return 2;
	ready_then_wait(argv[1]);
	pthread_t th;
	if (pthread_create(&th, 0, dropper, 0)) return 3;
	for (size_t i = 0; i < n; i += 4096)
		if (fresh[i]) return 10;
	int ok = check(a, 0, n, 1);
	stop = 1;
	void *r;
	pthread_join(th, &r);
	if (r) return 11;
	return ok ? 0 : 12;
}
`

// TestLazyFaultsDuringEvents: zero-page faults come while memory-map
// events wait to be read (lazyRaceProg). The kernel refuses to fill a
// page while an event waits, and the events and the faults come through
// one descriptor, read by one goroutine: the fault must wait for the
// event, not the event for the fault.
func TestLazyFaultsDuringEvents(t *testing.T) {
	runLazyProg(t, lazyRaceProg)
}

// breakable is a page stream whose reads fail once broken is closed.
type breakable struct {
	io.ReadWriter
	broken chan struct{}
}

func (b breakable) Read(p []byte) (int, error) {
	select {
	case <-b.broken:
		return 0, errors.New("the page stream broke (test)")
	default:
	}
	return b.ReadWriter.Read(p)
}

// runLazyProg compiles the C program prog, runs it in s1 until it says
// ready, moves its process tree to s2 post-copy, gives the restored
// program its go and checks that it exits 0 (within 30 seconds) and that
// every page arrived. It returns what the lazy-pages daemon did.
func runLazyProg(t *testing.T, prog string) criu.LazyStats {
	return runLazyProgOn(t, prog, false)
}

// runLazyProgOn is runLazyProg, or with broken, the same through a page
// stream that breaks once the restore is done (brokenStream): then the
// program must not exit (its pages never come) until it is killed.
func runLazyProgOn(t *testing.T, prog string, broken bool) criu.LazyStats {
	testbed.RequireNetns(t)
	skipUnlessCRIU(t)
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler (cc): tests/setup-criu.sh installs one when it builds CRIU")
	}
	bed := testbed.ForTest(t)
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/prog.c", []byte(prog), 0o600); err != nil {
		t.Fatal(err)
	}
	bin, trigger := dir+"/mtcp-lazy-prog", dir+"/go"
	if out, err := exec.Command(cc, "-O1", "-o", bin, dir+"/prog.c").CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	cmd := bed.S1.Command(context.Background(), "unshare", "--pid", "--fork", "--kill-child", "setsid", bin, trigger)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		t.Fatalf("the program said %q", line)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
	var pid int
	if _, serr := fmt.Sscan(string(b), &pid); err != nil || serr != nil {
		t.Fatalf("the program's PID: %q %v %v", b, err, serr)
	}
	defer syscall.Kill(pid, syscall.SIGKILL)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, dst := checkpointDirs(t, "lazy-pages.log")
	err = netns.Do(bed.S1.NetNSPath(), func() error {
		_, err := criu.Dump(ctx, criu.DumpOptions{PID: pid, Dir: src, LeaveStopped: true, Lazy: true})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	procs, err := criu.CheckpointPIDs(treePIDs(pid))
	if err != nil {
		t.Fatal(err)
	}
	pc, lc := loopbackPair(t)
	served := make(chan error, 1)
	go func() { served <- criu.ServeLazyPages(ctx, pc, procs) }()
	brk := breakable{ReadWriter: lc, broken: make(chan struct{})}
	names, err := criu.Images(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		b, err := os.ReadFile(src + "/" + n)
		if err == nil {
			err = os.WriteFile(dst+"/"+n, b, 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	lp, err := criu.StartLazyPages(ctx, criu.LazyOptions{Dir: dst, Conn: brk})
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Kill()
	rr := restoreIn(t, ctx, bed.S2, criu.RestoreOptions{Dir: dst, Lazy: true})
	p, _ := os.FindProcess(rr.PID)
	watchdog := time.AfterFunc(30*time.Second, func() { p.Kill() })
	defer watchdog.Stop()
	if broken {
		close(brk.broken)
		lc.Close() // a read under way fails too
		if err := lp.Wait(ctx); err == nil {
			t.Fatal("the lazy-pages daemon reports every page in place through a broken stream")
		} else {
			t.Logf("lazy pages, as the stream broke: %v", err)
		}
		if err := os.WriteFile(trigger, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		exited := make(chan *os.ProcessState, 1)
		go func() { st, _ := p.Wait(); exited <- st }()
		select {
		case st := <-exited:
			t.Fatalf("the restored program ran on without its pages: %v (exit status 10: it read other bytes, zeros, where its pattern was)", st)
		case <-time.After(1500 * time.Millisecond):
		}
		p.Kill()
		select {
		case st := <-exited:
			if ws, ok := st.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Errorf("the restored program ended with %v, want killed", st)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the restored program, waiting for a page, did not die of SIGKILL")
		}
		return lp.Stats()
	}
	if err := os.WriteFile(trigger, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitCode() != 0 {
		t.Errorf("the restored program failed its check %d (%v): see its source", st.ExitCode(), st)
	}
	if err := lp.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	s := lp.Stats()
	t.Logf("lazy pages: %+v", s)
	return s
}

// treePIDs lists pid and its descendants.
func treePIDs(pid int) []int {
	out := []int{pid}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	for _, f := range strings.Fields(string(b)) {
		var c int
		if _, err := fmt.Sscan(f, &c); err == nil {
			out = append(out, treePIDs(c)...)
		}
	}
	return out
}

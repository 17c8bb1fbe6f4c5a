package tests

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// pauseClients are n Go clients, each on one connection, issuing GETs of
// the dataset's keys back to back; each remembers the longest time it
// waited for an answer since the last reset: the pause it saw.
type pauseClients struct {
	mu     sync.Mutex
	maxGap time.Duration
	last   []time.Time // each client's last answer (or its start)
	err    error
	ops    int
	stop   chan struct{}
	wg     sync.WaitGroup
}

func startPauseClients(b *testing.B, r *pool.Redis, n, keys int) *pauseClients {
	pc := &pauseClients{stop: make(chan struct{}), last: make([]time.Time, n)}
	for i := range n {
		pc.last[i] = time.Now()
		c, err := r.Dial()
		if err != nil {
			b.Fatal(err)
		}
		rc := newRESP(c)
		pc.wg.Add(1)
		go func() {
			defer pc.wg.Done()
			defer c.Close()
			last := time.Now()
			for j := 0; ; j++ {
				select {
				case <-pc.stop:
					return
				default:
				}
				k := fmt.Sprintf("key:%d", rand.IntN(keys))
				if i%2 == 1 {
					k = fmt.Sprintf("c%d", i)
					if _, err := rc.do("SET", k, fmt.Sprint(j)); err != nil {
						pc.fail(err)
						return
					}
				} else if _, err := rc.do("GET", k); err != nil {
					pc.fail(err)
					return
				}
				now := time.Now()
				pc.mu.Lock()
				pc.ops++
				pc.maxGap = max(pc.maxGap, now.Sub(last))
				pc.last[i] = now
				pc.mu.Unlock()
				last = now
				time.Sleep(2 * time.Millisecond) // 50 clients, 2 cores: leave CPU for the migration
			}
		}()
	}
	return pc
}

func (pc *pauseClients) fail(err error) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.err == nil {
		pc.err = err
	}
}

// reset returns the longest gap since the last reset, counting the wait
// of a client still waiting for its answer, and starts anew.
func (pc *pauseClients) reset() (time.Duration, error) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	g := pc.maxGap
	now := time.Now()
	for _, l := range pc.last {
		g = max(g, now.Sub(l))
	}
	pc.maxGap = 0
	return g, pc.err
}

func (pc *pauseClients) close() error {
	close(pc.stop)
	pc.wg.Wait()
	return pc.err
}

// BenchmarkProcessMigration moves a redis-server holding a 50 MB dataset,
// with 50 client connections busy on it, between s1 and s2 through the
// daemons, b.N times (run it with -benchtime 20x for the acceptance
// figures). It reports CRIU's phases, the time the connections were held
// and the longest pause a client saw, and, measured in the same run, the
// plain CRIU command line doing the same checkpoint and restore (dump to
// a directory, copy, restore) with its ratio to mtcp's total.
//
// Sub-benchmarks: lazy (post-copy, the daemons' default: pages-ms is the
// time the memory took to follow the process, while it ran on the
// target) and eager (every page before the restore).
func BenchmarkProcessMigration(b *testing.B) {
	skipUnlessProcessMode(b)
	for _, pages := range []string{"lazy", "eager"} {
		b.Run(pages, func(b *testing.B) { benchProcessMigration(b, pages) })
	}
}

func benchProcessMigration(b *testing.B, pages string) {
	bed := testbed.ForTest(b)
	testbed.RequireNetns(b)
	p := pool.Start(b, bed, pool.Options{Quiet: true, ProcessPages: pages})
	r := p.StartRedis(bed.S1, pool.RedisOptions{Args: []string{"--enable-debug-command", "yes"}})
	const keys, valueSize, clients = 50000, 1000, 50
	c, err := r.Dial()
	if err != nil {
		b.Fatal(err)
	}
	setup := newRESP(c)
	if _, err := setup.do("DEBUG", "POPULATE", fmt.Sprint(keys), "key", fmt.Sprint(valueSize)); err != nil {
		b.Fatal(err)
	}
	mem, _ := setup.do("MEMORY", "STATS")
	_ = mem
	c.Close()
	rsts := watchPortRSTs(b, bed.Client, r.Port)
	pc := startPauseClients(b, r, clients, keys)
	time.Sleep(500 * time.Millisecond)

	phases := map[string]time.Duration{}
	var held, clientPause, worstPause time.Duration
	var pauses []time.Duration
	retrans0 := clientsRetrans(b, bed.Client, r.Port)
	var dumped uint64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		to := bed.S2
		if r.Host == bed.S2 {
			to = bed.S1
		}
		pc.reset()
		rep := r.MigrateProcess(to)
		time.Sleep(300 * time.Millisecond) // let every client complete a request on the target
		gap, err := pc.reset()
		if err != nil {
			b.Fatalf("migration %d: a client failed: %v", i, err)
		}
		for _, ph := range rep.Phases {
			phases[ph.Name] += ph.Took
		}
		b.Logf("migration %d to %s: held %v, longest client wait %v, images %d bytes (%d pages), lazy %v, phases %v", i, to.Name, rep.Pause.Round(time.Millisecond), gap.Round(time.Millisecond), rep.ImageBytes, rep.Pages, rep.Lazy, rep.Phases)
		held += rep.Pause
		clientPause += gap
		pauses = append(pauses, gap)
		worstPause = max(worstPause, gap)
		dumped = rep.Pages
		if rep.Conns < clients {
			b.Fatalf("migration %d moved %d connections, want %d", i, rep.Conns, clients)
		}
	}
	b.StopTimer()
	retrans := clientsRetrans(b, bed.Client, r.Port) - retrans0
	if err := pc.close(); err != nil {
		b.Fatalf("a client failed: %v", err)
	}
	if in, out := rsts(); in != 0 || out != 0 {
		b.Fatalf("the client host saw %d resets in, %d out", in, out)
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / n }
	for _, name := range []string{admin.PhaseFreeze, admin.PhaseDump, admin.PhaseTransfer, admin.PhaseRestore, admin.PhaseSwitch, admin.PhasePages} {
		b.ReportMetric(ms(phases[name]), name+"-ms")
	}
	total := phases[admin.PhaseFreeze] + phases[admin.PhaseDump] + phases[admin.PhaseTransfer] + phases[admin.PhaseRestore] + phases[admin.PhaseSwitch]
	b.ReportMetric(ms(held), "held-ms")
	b.ReportMetric(ms(clientPause), "client-pause-ms")
	b.ReportMetric(float64(worstPause)/float64(time.Millisecond), "worst-client-pause-ms")
	slices.Sort(pauses)
	b.ReportMetric(float64(pauses[len(pauses)/2])/float64(time.Millisecond), "p50-client-pause-ms")
	b.ReportMetric(float64(pauses[0])/float64(time.Millisecond), "min-client-pause-ms")
	b.ReportMetric(float64(pauses[len(pauses)*9/10])/float64(time.Millisecond), "p90-client-pause-ms")
	over := 0
	for _, p := range pauses {
		if p > 300*time.Millisecond {
			over++
		}
	}
	// How many migrations a client waited more than 300 ms in (the
	// process-mode target).
	b.ReportMetric(float64(over), "over-300ms")
	// Retransmissions by the client sockets, per migration: the packets
	// held while the process moves cost some (the client's timer fires
	// while they wait), a lost segment costs more and shows here.
	b.ReportMetric(float64(retrans)/n, "client-retrans/op")
	b.ReportMetric(float64(dumped)*4096/(1<<20), "MiB-dumped")

	// The baseline, same run: the CRIU command line dumps the same
	// process to a directory on disk, the directory is copied, and the
	// command line restores it. It restores on the same server (s1): the
	// command line cannot change the sockets' addresses, and a socket
	// restored on s2 with s1's address fails to connect. Its own
	// nftables lock keeps the connections (no client traffic runs).
	if r.Host != bed.S1 {
		r.MigrateProcess(bed.S1)
	}
	cli := cliBaseline(b, bed.S1, r)
	b.ReportMetric(float64(cli)/float64(time.Millisecond), "cli-ms")
	b.ReportMetric(float64(total)/n/float64(cli), "mtcp/cli")
	// What the clients saw against the command line's whole time (which
	// no client sees: its clients wait that long at least).
	b.ReportMetric(float64(pauses[len(pauses)/2])/float64(cli), "p50-client-pause/cli")
}

// clientsRetrans sums the retransmissions of the client host's sockets
// connected to port (TCP_INFO through sock_diag).
func clientsRetrans(tb testing.TB, client *testbed.Host, port uint16) (total int) {
	var conns []repair.Conn
	in(tb, client, func() (err error) {
		conns, err = repair.List(context.Background(), repair.ListOptions{})
		return err
	})
	for _, c := range conns {
		if c.Remote.Port() == port {
			total += int(c.Info.TotalRetrans)
		}
	}
	return total
}

// cliBaseline checkpoints r's process with `criu dump` into a directory
// under /var/tmp, copies it, restores it with `criu restore`, and returns
// the time of the three steps.
func cliBaseline(b *testing.B, h *testbed.Host, r *pool.Redis) time.Duration {
	base, err := os.MkdirTemp("/var/tmp", "mtcp-cli-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(base)
	dump, cp := base+"/dump", base+"/copy"
	os.Mkdir(dump, 0o700)
	crit := "criu"
	if _, err := exec.LookPath(crit); err != nil {
		crit = "/usr/local/sbin/criu"
	}
	run := func(log string, args ...string) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := h.Command(ctx, args[0], args[1:]...).CombinedOutput()
		if err != nil {
			l, _ := os.ReadFile(log)
			b.Fatalf("%s: %v: %s\n%s ends with: %s", strings.Join(args, " "), err, out, log, tail(string(l)))
		}
	}
	start := time.Now()
	run(dump+"/dump.log", crit, "dump", "-t", fmt.Sprint(r.PID), "-D", dump, "--tcp-established", "--network-lock", "nftables", "-o", "dump.log")
	run("", "cp", "-a", dump, cp)
	run(cp+"/restore.log", crit, "restore", "-D", cp, "--tcp-established", "--network-lock", "nftables", "--restore-detached", "-o", "restore.log", "--pidfile", base+"/pid")
	took := time.Since(start)
	if pid := pool.ListenerPID(h, r.Port); pid > 0 {
		r.PID = pid
	}
	return took
}

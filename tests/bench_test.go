package tests

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/daemon"
	"github.com/mtcp-dev/mtcp/internal/prof"
	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// gapMeter records the largest gap between consecutive reads at the client
// while it is switched on.
type gapMeter struct {
	mu   sync.Mutex
	on   bool
	last time.Time
	max  time.Duration
	err  error
	n    int64
}

func (g *gapMeter) read(now time.Time, n int) {
	g.mu.Lock()
	if g.on {
		if d := now.Sub(g.last); d > g.max {
			g.max = d
		}
	}
	g.last = now
	g.n += int64(n)
	g.mu.Unlock()
}

func (g *gapMeter) start() {
	g.mu.Lock()
	g.on, g.max, g.last = true, 0, time.Now()
	g.mu.Unlock()
}

// stopAfter waits until the client has read data later than t, then
// switches the meter off and returns the largest gap.
func (g *gapMeter) stopAfter(tb testing.TB, t time.Time) time.Duration {
	pool.Eventually(tb, 10*time.Second, "the stream to resume", func() (bool, string) {
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.err != nil {
			tb.Fatalf("client: %v", g.err)
		}
		return g.last.After(t), fmt.Sprintf("last read %v", g.last)
	})
	g.mu.Lock()
	defer g.mu.Unlock()
	g.on = false
	return g.max
}

// meterStream reads and verifies the pattern stream of seed from c,
// feeding a gap meter.
func meterStream(c net.Conn, seed stream.Pattern) *gapMeter {
	g := &gapMeter{}
	go func() {
		v := &stream.Verifier{Pattern: seed}
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			now := time.Now()
			if n > 0 {
				if _, verr := v.Write(buf[:n]); verr != nil {
					err = verr
				}
				g.read(now, n)
			}
			if err != nil {
				g.mu.Lock()
				if g.err == nil && !errors.Is(err, net.ErrClosed) {
					g.err = err
				}
				g.mu.Unlock()
				return
			}
		}
	}()
	return g
}

// streamClient asks mtcp-bulk on s1 for an endless stream and verifies it
// as it reads, feeding the meter.
func streamClient(tb testing.TB, p *pool.Pool, v6 bool) (*net.TCPConn, *gapMeter) {
	c := p.Dial(p.Bed.S1, v6)
	seed := stream.Pattern(time.Now().UnixNano())
	var hdr [16]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(seed))
	if _, err := c.Write(hdr[:]); err != nil {
		tb.Fatal(err)
	}
	return c, meterStream(c, seed)
}

// clientInfo reads the client socket's TCP_INFO from sock_diag in the
// client's namespace.
func clientInfo(tb testing.TB, bed *testbed.Bed, c *net.TCPConn) repair.TCPInfo {
	port := uint16(c.LocalAddr().(*net.TCPAddr).Port)
	var conns []repair.Conn
	in(tb, bed.Client, func() (err error) {
		conns, err = repair.List(context.Background(), repair.ListOptions{Port: port})
		return err
	})
	for _, cn := range conns {
		if cn.Local.Port() == port {
			return cn.Info
		}
	}
	tb.Fatalf("client socket on port %d not found", port)
	return repair.TCPInfo{}
}

// BenchmarkMigrationPause moves a streaming connection around the pool
// (s1 -> s2 -> s3 -> s1 ...), one migration per op, and measures at the
// client the largest gap between consecutive reads around each migration.
// The baseline is the same measurement over the same time without a
// migration, taken in the same run. Two streams: "paced" (mtcp-bulk
// --rate 40 MB/s in 4 KiB writes, a steady stream whose baseline gap is
// about the 0.1 ms between writes; the stream itself, client and server
// with their veth and netfilter paths, takes about one of the testbed's
// two CPUs, but a tenth of it, 4 MB/s in 400-byte writes, was measured to
// pause as long) and "flat-out" (as fast
// as the client reads, which keeps both cores busy with the stream
// itself). Metrics: pause-p50-ms, pause-p99-ms, pause-max-ms,
// baseline-p50-ms, baseline-p99-ms, the median of each transaction phase
// (PHASE-p50-ms), client-rto, the client socket's retransmission timeouts
// over the whole run, and client-retrans, every segment it retransmitted
// (timeouts, tail loss probes, fast retransmits).
func BenchmarkMigrationPause(b *testing.B) {
	b.Run("paced", func(b *testing.B) { benchPause(b, pool.Options{AppArgs: pacedArgs}) })
	b.Run("flat-out", func(b *testing.B) { benchPause(b, pool.Options{}) })
}

// pacedArgs make mtcp-bulk stream 40 MB/s in 4 KiB writes.
var pacedArgs = []string{"--rate", "40000000"}

// BenchmarkDistantPause is BenchmarkMigrationPause/paced in a pool whose
// members answer each other as if 2 ms apart (MTCP_FAULT=peer-delay=2ms
// on every mtcpd: with the timers' slack a control round trip takes about
// 5 ms; the service network stays as fast as it is). It shows how many
// control round trips a pause costs. The steering point is s1, the owner
// of the address the client dialled, so two migrations of three hold and
// switch at another host.
func BenchmarkDistantPause(b *testing.B) {
	env := map[string][]string{}
	for _, h := range []string{"s1", "s2", "s3"} {
		env["mtcpd-"+h] = []string{daemon.FaultEnv + "=peer-delay=2ms"}
	}
	benchPause(b, pool.Options{AppArgs: pacedArgs, Env: env})
}

// benchPause measures the pauses of migrations of an mtcp-bulk stream
// around a pool started with o.
func benchPause(b *testing.B, o pool.Options) {
	testbed.RequireNetns(b) // reads the client socket from its namespace
	bed := testbed.ForTest(b)
	o.App, o.Quiet = "mtcp-bulk", true
	p := pool.Start(b, bed, o)
	c, g := streamClient(b, p, false)
	hosts := []*testbed.Host{bed.S1, bed.S2, bed.S3}
	info0 := clientInfo(b, bed, c)
	var pauses, baseline []time.Duration
	phases := map[string][]time.Duration{}
	i := 0
	for b.Loop() {
		from, to := hosts[i%3], hosts[(i+1)%3]
		i++
		g.start()
		t0 := time.Now()
		rep := p.Migrate(from, to, c)
		took := time.Since(t0)
		for ph, d := range rep.Timings {
			phases[ph] = append(phases[ph], d)
		}
		pauses = append(pauses, g.stopAfter(b, time.Now().Add(5*time.Millisecond)))
		b.Logf("%s -> %s: pause %v, took %v, phases %v", from.Name, to.Name, pauses[len(pauses)-1], took, rep.Timings)

		b.StopTimer()
		g.start()
		base := time.Now().Add(took + 5*time.Millisecond)
		baseline = append(baseline, g.stopAfter(b, base))
		b.StartTimer()
	}
	reportPauses(b, pauses, baseline, info0, clientInfo(b, bed, c))
	b.ReportMetric(float64(g.n)/1e6, "MB-verified")
	for ph, ds := range phases {
		b.ReportMetric(pctMS(ds, 0.5), ph+"-p50-ms")
	}
}

// pctMS is the q-quantile of ds (q = 1: the largest) in milliseconds.
func pctMS(ds []time.Duration, q float64) float64 {
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[min(len(s)-1, int(q*float64(len(s))))].Microseconds()) / 1000
}

// reportPauses reports the pause benchmarks' common metrics.
// before and after are the client socket's TCP_INFO at the start and the
// end of the run.
func reportPauses(b *testing.B, pauses, baseline []time.Duration, before, after repair.TCPInfo) {
	b.ReportMetric(pctMS(pauses, 0.5), "pause-p50-ms")
	b.ReportMetric(pctMS(pauses, 0.99), "pause-p99-ms")
	b.ReportMetric(pctMS(pauses, 1), "pause-max-ms")
	b.ReportMetric(pctMS(baseline, 0.5), "baseline-p50-ms")
	b.ReportMetric(pctMS(baseline, 0.99), "baseline-p99-ms")
	b.ReportMetric(float64(after.TotalRetrans-before.TotalRetrans), "client-retrans")
	b.ReportMetric(float64(after.TotalRTO-before.TotalRTO), "client-rto")
}

// BenchmarkDrain10k drains 10,000 idle kv sessions from s1 to s2 in one
// `mtcpctl drain` and checks every one is alive on s2 afterwards. Metrics:
// conns/s of the drain, until it says it is done; conns/s-cleaned, until
// s1 has also closed its frozen copies of the connections, which it does
// after that.
func BenchmarkDrain10k(b *testing.B) {
	testbed.RequireNetns(b) // reads CPU times by namespace
	const n = 10000
	bed := testbed.ForTest(b)
	p := pool.Start(b, bed, pool.Options{Quiet: os.Getenv("MTCP_VERBOSE") == ""})
	conns := make([]*net.TCPConn, 0, n)
	for range n {
		conns = append(conns, p.Dial(bed.S1, false))
	}
	pool.Eventually(b, 60*time.Second, "s1 to see every connection", func() (bool, string) {
		cs, err := p.Admin(bed.S1).Conns(context.Background())
		return err == nil && len(cs) == n, fmt.Sprintf("%d", len(cs))
	})
	var rate float64
	var cleaned time.Duration
	for b.Loop() {
		cpu0 := cpuByHost(b, bed.S1, bed.S2)
		rotateProfiles(b, p)
		sys0 := systemCPU(b)
		t0 := time.Now()
		prog, err := p.Admin(bed.S1).Drain(context.Background(), &admin.DrainRequest{To: "s2"}, nil)
		took := time.Since(t0)
		sys := systemCPU(b) - sys0
		rotateProfiles(b, p)
		var pool time.Duration
		for k, v := range cpuByHost(b, bed.S1, bed.S2) {
			b.Logf("CPU %s: %v", k, v-cpu0[k])
			pool += v - cpu0[k]
		}
		// The machine is shared: CPU time spent outside the pool's
		// processes (another job, kernel threads) slows the drain down.
		b.Logf("CPU of the whole machine: %v in %v (the pool's processes: %v)", sys, took.Round(time.Millisecond), pool)
		if err != nil || prog.Done != n || prog.Failed != 0 {
			b.Fatalf("drain: %v (%+v)", err, prog)
		}
		rate = n / took.Seconds()
		for _, r := range prog.Reports {
			b.Logf("batch of %d: %v", len(r.Moved), r.Timings)
		}
		// s1 closes its frozen copies once the drain is done: how long
		// until it holds none.
		port := uint16(conns[0].RemoteAddr().(*net.TCPAddr).Port)
		for connsOnPort(b, bed.S1, port) > 0 {
			if time.Since(t0) > 30*time.Second {
				b.Fatalf("s1 still holds %d connections on port %d after the drain", connsOnPort(b, bed.S1, port), port)
			}
			time.Sleep(20 * time.Millisecond) // listing 10,000 sockets costs CPU too
		}
		cleaned = time.Since(t0)
		b.Logf("drain done in %v, s1's frozen copies gone %v after its start", took.Round(time.Millisecond), cleaned.Round(time.Millisecond))
		b.StopTimer()
		for i, c := range conns {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(c, "HOST\n"); err != nil {
				b.Fatalf("connection %d after the drain: %v", i, err)
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || line != "s2\n" {
				b.Fatalf("connection %d after the drain: %q, %v", i, line, err)
			}
		}
		b.StartTimer()
	}
	b.ReportMetric(rate, "conns/s")
	// The same, counting s1's cleanup after the drain said it was done.
	b.ReportMetric(n/cleaned.Seconds(), "conns/s-cleaned")
}

// rotateProfiles asks the pool's daemons and applications to start a new
// CPU profile when they write them (MTCP_CPUPROFILE, see internal/prof),
// so that one file of each covers just the measured window.
func rotateProfiles(tb testing.TB, p *pool.Pool) {
	if os.Getenv(prof.Env) == "" {
		return
	}
	for _, h := range []string{"s1", "s2", "s3"} {
		for _, name := range []string{"mtcpd-" + h, "app-" + h} {
			if err := p.Signal(name, syscall.SIGUSR2); err != nil {
				tb.Logf("profile of %s: %v", name, err)
			}
		}
	}
	time.Sleep(20 * time.Millisecond) // let the signals land
}

// systemCPU is the CPU time the whole machine has spent busy (all but
// idle and iowait), from /proc/stat.
func systemCPU(tb testing.TB) time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		tb.Fatal(err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var busy uint64
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return time.Duration(busy) * 10 * time.Millisecond
}

// cpuByHost sums the CPU time (user+system) of the processes in each
// host's network namespace, by host and command name.
func cpuByHost(tb testing.TB, hosts ...*testbed.Host) map[string]time.Duration {
	out := map[string]time.Duration{}
	inode := map[uint64]string{}
	for _, h := range hosts {
		var st syscall.Stat_t
		if err := syscall.Stat(h.NetNSPath(), &st); err != nil {
			tb.Fatal(err)
		}
		inode[st.Ino] = h.Name
	}
	pids, _ := filepath.Glob("/proc/[0-9]*")
	for _, dir := range pids {
		var st syscall.Stat_t
		if syscall.Stat(dir+"/ns/net", &st) != nil {
			continue
		}
		host, ok := inode[st.Ino]
		if !ok {
			continue
		}
		b, err := os.ReadFile(dir + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		comm := s[strings.IndexByte(s, '(')+1 : i]
		f := strings.Fields(s[i+2:])
		ut, _ := strconv.ParseUint(f[11], 10, 64)
		stime, _ := strconv.ParseUint(f[12], 10, 64)
		out[host+"/"+comm] += time.Duration(ut+stime) * 10 * time.Millisecond
	}
	return out
}

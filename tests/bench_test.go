package tests

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
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
				if g.err == nil {
					g.err = err
				}
				g.mu.Unlock()
				return
			}
		}
	}()
	return c, g
}

// clientRetrans reads the client socket's retransmission count from
// sock_diag in the client's namespace.
func clientRetrans(tb testing.TB, bed *testbed.Bed, c *net.TCPConn) uint32 {
	port := uint16(c.LocalAddr().(*net.TCPAddr).Port)
	var conns []repair.Conn
	in(tb, bed.Client, func() (err error) {
		conns, err = repair.List(context.Background(), repair.ListOptions{Port: port})
		return err
	})
	for _, cn := range conns {
		if cn.Local.Port() == port {
			return cn.Info.TotalRetrans
		}
	}
	tb.Fatalf("client socket on port %d not found", port)
	return 0
}

// BenchmarkMigrationPause moves a streaming connection around the pool
// (s1 -> s2 -> s3 -> s1 ...), one migration per op, and measures at the
// client the largest gap between consecutive reads around each migration.
// The baseline is the same measurement over the same time without a
// migration, taken in the same run. Metrics: pause-p50-ms, pause-p99-ms,
// pause-max-ms, baseline-p50-ms, baseline-p99-ms, and client-retrans, the
// client socket's retransmissions over the whole run (an RTO caused by a
// migration would show there).
func BenchmarkMigrationPause(b *testing.B) {
	bed := testbed.ForTest(b)
	p := pool.Start(b, bed, pool.Options{App: "mtcp-bulk", Quiet: true})
	c, g := streamClient(b, p, false)
	hosts := []*testbed.Host{bed.S1, bed.S2, bed.S3}
	retrans0 := clientRetrans(b, bed, c)
	var pauses, baseline []time.Duration
	i := 0
	for b.Loop() {
		from, to := hosts[i%3], hosts[(i+1)%3]
		i++
		g.start()
		t0 := time.Now()
		p.Migrate(from, to, c)
		took := time.Since(t0)
		pauses = append(pauses, g.stopAfter(b, time.Now().Add(5*time.Millisecond)))

		b.StopTimer()
		g.start()
		base := time.Now().Add(took + 5*time.Millisecond)
		baseline = append(baseline, g.stopAfter(b, base))
		b.StartTimer()
	}
	retrans := clientRetrans(b, bed, c) - retrans0
	pct := func(ds []time.Duration, q float64) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[min(len(s)-1, int(q*float64(len(s))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(pauses, 0.5), "pause-p50-ms")
	b.ReportMetric(pct(pauses, 0.99), "pause-p99-ms")
	b.ReportMetric(pct(pauses, 1), "pause-max-ms")
	b.ReportMetric(pct(baseline, 0.5), "baseline-p50-ms")
	b.ReportMetric(pct(baseline, 0.99), "baseline-p99-ms")
	b.ReportMetric(float64(retrans), "client-retrans")
	b.ReportMetric(float64(g.n)/1e6, "MB-verified")
}

// BenchmarkDrain10k drains 10,000 idle kv sessions from s1 to s2 in one
// `mtcpctl drain` and checks every one is alive on s2 afterwards. Metric:
// conns/s of the drain.
func BenchmarkDrain10k(b *testing.B) {
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
	for b.Loop() {
		t0 := time.Now()
		prog, err := p.Admin(bed.S1).Drain(context.Background(), &admin.DrainRequest{To: "s2"}, nil)
		took := time.Since(t0)
		if err != nil || prog.Done != n || prog.Failed != 0 {
			b.Fatalf("drain: %v (%+v)", err, prog)
		}
		rate = n / took.Seconds()
		for _, r := range prog.Reports {
			b.Logf("batch of %d: %v", len(r.Moved), r.Timings)
		}
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
}

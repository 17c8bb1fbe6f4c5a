package tests

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// hopEchoEnv makes the test binary, started with it, an echo process for
// BenchmarkProcessHop instead of running tests: it dials the unix socket
// the variable names and sends back every byte it reads.
const hopEchoEnv = "MTCP_TEST_HOP_ECHO"

// hopEcho is the echo process's main, called from TestMain.
func hopEcho(path string) int {
	c, err := net.Dial("unix", path)
	if err != nil {
		return 1
	}
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			return 0
		}
		if _, err := c.Write(b); err != nil {
			return 0
		}
	}
}

// BenchmarkProcessHop is the machine's baseline for the pause benchmarks:
// the round trip of one byte between two Go processes over a unix
// socket, what each hand-off between mtcp's processes (application,
// mtcpd, peer mtcpd) costs before any work is done. "idle" leaves the
// processes idle for a while before each round trip, as a migration's
// hand-offs find them; "busy" sends the next byte at once. One op is one
// round trip; metrics are its percentiles in µs.
func BenchmarkProcessHop(b *testing.B) {
	for _, mode := range []struct {
		name string
		gap  time.Duration
	}{{"idle", 200 * time.Microsecond}, {"busy", 0}} {
		b.Run(mode.name, func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "echo.sock")
			ln, err := net.Listen("unix", path)
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), hopEchoEnv+"="+path)
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			c, err := ln.Accept()
			if err != nil {
				cmd.Process.Kill()
				cmd.Wait()
				b.Fatal(err)
			}
			rtts := make([]time.Duration, 0, b.N)
			buf := make([]byte, 1)
			for b.Loop() {
				if mode.gap > 0 {
					b.StopTimer()
					time.Sleep(mode.gap)
					b.StartTimer()
				}
				t := time.Now()
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Read(buf); err != nil {
					b.Fatal(err)
				}
				rtts = append(rtts, time.Since(t))
			}
			c.Close() // the echo process exits when it reads EOF
			if err := cmd.Wait(); err != nil {
				b.Fatalf("echo process: %v", err)
			}
			for _, p := range []struct {
				q    float64
				name string
			}{{0.5, "rtt-p50-µs"}, {0.9, "rtt-p90-µs"}, {0.99, "rtt-p99-µs"}} {
				b.ReportMetric(pctMS(rtts, p.q)*1000, p.name)
			}
		})
	}
}

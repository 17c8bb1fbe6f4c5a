//go:build linux

package repair

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// BenchmarkCaptureEncode: freeze, capture and encode an idle established
// socket, then thaw it.
func BenchmarkCaptureEncode(b *testing.B) {
	skipUnlessRoot(b)
	_, server := pair(b, pairOpts{ns: privateNetns(b), network: "tcp4"})
	b.ReportAllocs()
	for b.Loop() {
		f, err := Freeze(server)
		if err != nil {
			b.Fatal(err)
		}
		st, err := f.Capture()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := st.MarshalBinary(); err != nil {
			b.Fatal(err)
		}
		if err := f.Thaw(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeRestore: decode a captured idle socket and restore it to
// a live connection (the capture and discard of each round are untimed).
// The loop runs on one thread inside the test namespace, as a daemon would.
func BenchmarkDecodeRestore(b *testing.B) {
	skipUnlessRoot(b)
	ns := privateNetns(b)
	_, server := pair(b, pairOpts{ns: ns, network: "tcp4"})
	var sock interface {
		syscall.Conn
		io.Closer
	} = server
	b.ReportAllocs()
	err := inNetns(ns, func() error {
		for b.Loop() {
			b.StopTimer()
			f, err := Freeze(sock)
			if err != nil {
				return err
			}
			st, err := f.Capture()
			if err != nil {
				return err
			}
			blob, _ := st.MarshalBinary()
			f.Discard()
			b.StartTimer()
			if st, err = Decode(blob); err != nil {
				return err
			}
			r, err := Restore(st, RestoreOptions{})
			if err != nil {
				return err
			}
			if err := r.Commit(); err != nil {
				return err
			}
			if sock, err = r.File(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	sock.Close()
}

// BenchmarkMigrateIdle: the whole cycle for one idle socket, in one
// namespace, on descriptors as the daemon handles them. ns/op is the whole
// cycle; the phases are reported as metrics, timed with the monotonic
// clock inside the loop:
//
//	capture-ns   freeze + capture + encode (source, flow held)
//	restore-ns   decode + restore into a blank + commit + File (target)
//	critical-ns  capture-ns + restore-ns: the time the connection is frozen
//	blank-ns     making the blank socket (target, prepare phase)
//	discard-ns   closing the frozen socket (source, after the switch)
func BenchmarkMigrateIdle(b *testing.B) {
	skipUnlessRoot(b)
	for _, network := range []string{"tcp4", "tcp6"} {
		b.Run(network, func(b *testing.B) {
			ns := privateNetns(b)
			_, server := pair(b, pairOpts{ns: ns, network: network})
			var sock syscall.Conn = server
			var capture, restore, blank, discard time.Duration
			b.ReportAllocs()
			err := inNetns(ns, func() error {
				for b.Loop() {
					t0 := time.Now()
					bl, err := NewBlank(network == "tcp6")
					if err != nil {
						return err
					}
					t1 := time.Now()
					f, err := Freeze(sock)
					if err != nil {
						return err
					}
					st, err := f.Capture()
					if err != nil {
						return err
					}
					blob, err := st.MarshalBinary()
					if err != nil {
						return err
					}
					t2 := time.Now()
					if err := f.Discard(); err != nil {
						return err
					}
					t3 := time.Now()
					if st, err = Decode(blob); err != nil {
						return err
					}
					r, err := Restore(st, RestoreOptions{Blank: bl})
					if err != nil {
						return err
					}
					if err := r.Commit(); err != nil {
						return err
					}
					if sock, err = r.File(); err != nil {
						return err
					}
					t4 := time.Now()
					blank += t1.Sub(t0)
					capture += t2.Sub(t1)
					discard += t3.Sub(t2)
					restore += t4.Sub(t3)
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			sock.(io.Closer).Close()
			n := float64(b.N)
			b.ReportMetric(float64(capture.Nanoseconds())/n, "capture-ns")
			b.ReportMetric(float64(restore.Nanoseconds())/n, "restore-ns")
			b.ReportMetric(float64((capture+restore).Nanoseconds())/n, "critical-ns")
			b.ReportMetric(float64(blank.Nanoseconds())/n, "blank-ns")
			b.ReportMetric(float64(discard.Nanoseconds())/n, "discard-ns")
		})
	}
}

// BenchmarkBatch10k: freeze and capture 10,000 idle sockets, discard them,
// restore and commit all 10,000. One op is the whole batch; ns/socket is
// the cost per socket. The client ends live in a child process because the
// open-files limit (20,000 here) cannot hold both ends.
func BenchmarkBatch10k(b *testing.B) {
	skipUnlessRoot(b)
	const n = 10000
	ns := privateNetns(b)
	conns := manyConns(b, ns, n)
	port := conns[0].LocalAddr().(*net.TCPAddr).Port
	servers := make([]syscall.Conn, n)
	for i, c := range conns {
		servers[i] = c
	}
	states := make([]*State, n)
	blobs := make([][]byte, n)
	restored := make([]*Restored, n)
	b.ReportAllocs()
	for b.Loop() {
		// Hold the flows while they are frozen, as the daemon does: a
		// keepalive probe reaching a discarded socket would be answered
		// with a RST. The nft runs are not timed.
		b.StopTimer()
		release := hold(b, ns, port)
		b.StartTimer()
		for i, c := range servers {
			f, err := Freeze(c)
			if err != nil {
				b.Fatal(err)
			}
			if states[i], err = f.Capture(); err != nil {
				b.Fatal(err)
			}
			if blobs[i], err = states[i].MarshalBinary(); err != nil {
				b.Fatal(err)
			}
			if err := f.Discard(); err != nil {
				b.Fatal(err)
			}
		}
		err := inNetns(ns, func() error {
			for i, blob := range blobs {
				st, err := Decode(blob)
				if err != nil {
					return err
				}
				if restored[i], err = Restore(st, RestoreOptions{}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		release()
		b.StartTimer()
		for i, r := range restored {
			if err := r.Commit(); err != nil {
				b.Fatal(err)
			}
			if servers[i], err = r.File(); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/socket")
	for _, c := range servers {
		c.(io.Closer).Close()
	}
}

// manyConns opens n loopback connections in namespace ns whose client ends
// are held by a child process (TestHelperClients) until the benchmark ends.
func manyConns(b *testing.B, ns string, n int) []*net.TCPConn {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	var ln net.Listener
	if err := inNetns(ns, func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command("ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestHelperClients$")
	cmd.Env = append(os.Environ(), "MTCP_HELPER_CLIENTS="+ln.Addr().String()+","+strconv.Itoa(n))
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close() // the child exits when its stdin closes
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	conns := make([]*net.TCPConn, 0, n)
	for len(conns) < n {
		c, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c.(*net.TCPConn))
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		b.Fatalf("client helper: %q, %v", line, err)
	}
	return conns
}

// TestHelperClients is not a test: it is the child process of manyConns.
func TestHelperClients(t *testing.T) {
	spec := os.Getenv("MTCP_HELPER_CLIENTS")
	if spec == "" {
		t.Skip("helper process for BenchmarkBatch10k")
	}
	var addr string
	var n int
	for i := len(spec) - 1; i >= 0; i-- {
		if spec[i] == ',' {
			addr = spec[:i]
			n, _ = strconv.Atoi(spec[i+1:])
			break
		}
	}
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dial:", err)
			os.Exit(1)
		}
		conns = append(conns, c)
	}
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n') // until the parent closes stdin
	os.Exit(0)
}

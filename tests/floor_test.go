package tests

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/repair"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// BenchmarkPauseFloor is the pause of BenchmarkMigrationPause/paced with
// the control plane taken away: the server, every nftables table and the
// migration are this one process, which moves the stream s1 -> s2 -> s3
// -> s1 ... by calling repair and nat directly. Before the pause, the
// target gets a blank socket and the rewrite of its replies. Then each
// migration stops the paced writer, holds the flow at s1, freezes and
// captures the socket, encodes and decodes its state, restores it on the
// target, commits it and resumes the writer on it, then switches the flow
// at s1 and releases what was held: the steps of mtcpd's transaction with
// none of its messages between processes. Same metrics and the same
// stream (40 MB/s in 4 KiB writes) as BenchmarkMigrationPause.
//
// The sub-benchmarks add the hand-offs between processes that a design
// needs, as one-byte round trips with echo processes that do nothing
// else, so that what they cost is the processes' wake-ups and the
// network's hops alone:
//   - kernel: none. What the client sees is what a migration costs on
//     this machine in the kernel and in the stream's own wake-ups;
//     BenchmarkMigrationPause/paced minus this is the control plane's
//     share.
//   - one-hop: a round trip over TCP with an echo process on the target,
//     between the capture and the restore: the least any design that
//     moves the socket between two hosts' processes pays (the state goes
//     there, and the source learns it arrived before it lets go).
//   - handoffs: the hand-offs that no implementation of mtcpd's
//     transaction can take off its critical path, however it overlaps
//     them: the application handing its connection to mtcpd, and, once
//     the transfer's round trip of one-hop is back, the one message that
//     brings the target's copy to life (the target must not send before
//     the source knows the transfer arrived, or the source could not
//     abort); both stand in as one round trip over a unix socket. When
//     the source is not the steering point s1, the hold's request and
//     answer, a round trip over TCP with s1, go out beside that one, not
//     after it. Not counted: the TLS of the peers' channel, any work.
//     With the wake-ups of the processes as this machine has them, this
//     is the least a migration through mtcpd can pause.
func BenchmarkPauseFloor(b *testing.B) {
	for _, hops := range []floorHops{floorKernel, floorOneHop, floorHandoffs} {
		b.Run(hops.String(), func(b *testing.B) { benchFloor(b, hops) })
	}
}

// floorHops says which hand-offs a BenchmarkPauseFloor run adds.
type floorHops int

const (
	floorKernel floorHops = iota
	floorOneHop
	floorHandoffs
)

func (h floorHops) String() string { return [...]string{"kernel", "one-hop", "handoffs"}[h] }

func benchFloor(b *testing.B, hops floorHops) {
	testbed.RequireNetns(b)
	bed := testbed.ForTest(b)
	const port = 7300
	hosts := []*testbed.Host{bed.S1, bed.S2, bed.S3}
	tabs := map[*testbed.Host]*nat.Table{}
	for _, h := range hosts {
		in(b, h, func() (err error) {
			tabs[h], err = nat.Open(nat.Options{})
			return err
		})
		b.Cleanup(func() { tabs[h].Destroy() })
	}
	var q *nat.Queue
	in(b, bed.S1, func() (err error) {
		q, err = nat.OpenQueue(nat.Options{})
		return err
	})
	b.Cleanup(func() { q.Close() })

	var ln net.Listener
	in(b, bed.S1, func() (err error) {
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(bed.S1.LAN4, port).String())
		return err
	})
	defer ln.Close()
	var client net.Conn
	in(b, bed.Client, func() (err error) {
		client, err = net.DialTimeout("tcp4", ln.Addr().String(), 10*time.Second)
		return err
	})
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	f := nat.Flow{Client: client.LocalAddr().(*net.TCPAddr).AddrPort(), Service: netip.AddrPortFrom(bed.S1.LAN4, port)}

	seed := stream.Pattern(time.Now().UnixNano())
	w := &pacedWriter{conn: server, pattern: seed, rate: 40e6, chunk: 4 << 10}
	w.start()
	defer w.stop()
	g := meterStream(client, seed)
	info0 := clientInfo(b, bed, client.(*net.TCPConn))

	var e *echoes
	if hops != floorKernel {
		e = startEchoes(b, hosts)
	}

	var pauses, baseline []time.Duration
	i := 0
	for b.Loop() {
		from, to := hosts[i%3], hosts[(i+1)%3]
		i++
		blank := prepareFloor(b, f, bed.S1, tabs[to], to)
		var h *hopPlan
		if e != nil {
			h = &hopPlan{e: e, from: from, to: to, s1: bed.S1, all: hops == floorHandoffs}
		}
		g.start()
		t0 := time.Now()
		old := w.stop()
		h.beforeHold(b)
		moved, frozen := floorMigrate(b, old, f, bed.S1, tabs[bed.S1], to, blank, h)
		w.conn = moved
		w.start()
		floorSwitch(b, f, bed.S1, tabs[bed.S1], q, to)
		took := time.Since(t0)
		// Outside the pause: the source's copy goes, and with it the
		// rewrite of its replies.
		if err := frozen.Discard(); err != nil {
			b.Fatal(err)
		}
		if from != bed.S1 {
			var rb nat.Batch
			rb.Remove(f)
			if err := tabs[from].Apply(&rb); err != nil {
				b.Fatal(err)
			}
		}
		pauses = append(pauses, g.stopAfter(b, time.Now().Add(5*time.Millisecond)))
		b.StopTimer()
		g.start()
		baseline = append(baseline, g.stopAfter(b, time.Now().Add(took+5*time.Millisecond)))
		b.StartTimer()
	}
	w.stop()
	if w.err != nil {
		b.Fatalf("server: %v", w.err)
	}
	reportPauses(b, pauses, baseline, info0, clientInfo(b, bed, client.(*net.TCPConn)))
}

// floorMigrate moves the server end of flow f, socket c, to host to, with
// s1 (tab) as the steering point: hold, capture, restore, commit. It returns the
// restored connection, live, and the source's frozen socket. blank is a
// socket made on host to beforehand, as mtcpd makes them when a transfer
// is announced, so that nothing here enters another namespace; the rewrite
// of the target's replies is in beforehand too (see prepareFloor). The switch
// (floorSwitch) is left to the caller, to do after it resumes writing, as
// mtcpd's commit goes out beside the switch with forward steering. h, if
// not nil, adds the transfer's round trip.
func floorMigrate(tb testing.TB, c net.Conn, f nat.Flow, s1 *testbed.Host, tab *nat.Table, to *testbed.Host, blank *repair.Blank, h *hopPlan) (net.Conn, *repair.Frozen) {
	var hb nat.Batch
	hb.Hold(f)
	if err := tab.Apply(&hb); err != nil {
		tb.Fatal(err)
	}
	fr, err := repair.Freeze(c.(*net.TCPConn))
	if err != nil {
		tb.Fatal(err)
	}
	st, err := fr.Capture()
	if err != nil {
		tb.Fatal(err)
	}
	blob, err := st.MarshalBinary()
	if err != nil {
		tb.Fatal(err)
	}
	h.transfer(tb)
	got, err := repair.Decode(blob)
	if err != nil {
		tb.Fatal(err)
	}
	local := f.Service
	if to != s1 {
		local = netip.AddrPortFrom(to.LAN4, f.Service.Port())
	}
	r, err := repair.Restore(got, repair.RestoreOptions{Local: local, Remote: f.Client, Blank: blank})
	if err != nil {
		tb.Fatal(err)
	}
	if err := r.Commit(); err != nil {
		tb.Fatal(err)
	}
	moved, err := r.Conn()
	if err != nil {
		tb.Fatal(err)
	}
	return moved, fr
}

// prepareFloor readies host to (its table tab) for flow f before the
// pause, which mtcpd could do as well: a blank socket made in its
// namespace, and the rewrite of its replies to f's client, harmless while
// no socket of to sends them.
func prepareFloor(tb testing.TB, f nat.Flow, s1 *testbed.Host, tab *nat.Table, to *testbed.Host) *repair.Blank {
	var blank *repair.Blank
	in(tb, to, func() (err error) {
		blank, err = repair.NewBlank(f.Is6())
		return err
	})
	if to != s1 {
		var rb nat.Batch
		rb.ReplyFrom(f, netip.AddrPortFrom(to.LAN4, f.Service.Port()))
		if err := tab.Apply(&rb); err != nil {
			tb.Fatal(err)
		}
	}
	return blank
}

// floorSwitch sends flow f to host to at the steering point s1 (tab, q)
// and releases what the hold kept.
func floorSwitch(tb testing.TB, f nat.Flow, s1 *testbed.Host, tab *nat.Table, q *nat.Queue, to *testbed.Host) {
	var sb nat.Batch
	sb.Remove(f)
	if to != s1 {
		sb.Forward(f, to.LAN4)
	}
	if err := tab.Apply(&sb); err != nil {
		tb.Fatal(err)
	}
	if _, err := q.Release(f); err != nil {
		tb.Fatal(err)
	}
}

// pacedWriter writes a pattern stream to conn at rate bytes/s in chunks,
// paced with nanosleep(2) like mtcp-bulk --rate, until stopped.
type pacedWriter struct {
	conn    net.Conn
	pattern stream.Pattern
	rate    float64
	chunk   int
	sent    int64
	err     error
	quit    chan struct{}
	done    chan struct{}
}

func (w *pacedWriter) start() {
	w.quit, w.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(w.done)
		buf := make([]byte, w.chunk)
		t0, sent0 := time.Now(), w.sent
		for {
			select {
			case <-w.quit:
				return
			default:
			}
			w.pattern.Fill(buf, w.sent)
			n, err := w.conn.Write(buf)
			w.sent += int64(n)
			if err != nil {
				w.err = err
				return
			}
			due := t0.Add(time.Duration(float64(w.sent-sent0) / w.rate * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				ts := unix.NsecToTimespec(int64(d))
				for unix.Nanosleep(&ts, &ts) == unix.EINTR {
				}
			}
		}
	}()
}

// stop stops the writer at a chunk boundary and returns its connection.
func (w *pacedWriter) stop() net.Conn {
	if w.quit != nil {
		select {
		case <-w.quit:
		default:
			close(w.quit)
		}
		<-w.done
	}
	return w.conn
}

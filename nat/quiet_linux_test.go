//go:build linux

package nat

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/repair"
)

// TestQuietRestoreAcknowledges: what a client sends to a socket restored
// quiet, while the socket is still in repair mode, is acknowledged when
// the socket is committed, not only once the client retransmits it. The
// socket's own acknowledgement went out with the quiet mark bit and the table
// dropped it; the commit must make up for it, for data and for a FIN,
// also when the socket was restored with unread data.
func TestQuietRestoreAcknowledges(t *testing.T) {
	skipUnlessRoot(t)
	data := func(c *net.TCPConn) error { _, err := c.Write([]byte("x")); return err }
	fin := func(c *net.TCPConn) error { return c.CloseWrite() }
	for i, tc := range []struct {
		name   string
		unread string // sent to the server before the capture, unread
		send   func(c *net.TCPConn) error
	}{
		{"data", "", data},
		{"FIN", "", fin},
		{"data after unread data", "unread", data},
		{"FIN after unread data", "unread", fin},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := newNamespace(t, "quietack")
			openIn(t, ns, Options{})
			c, s := loopConn(t, ns, uint16(40010+i), uint16(7010+i), 0)
			if tc.unread != "" {
				if _, err := c.Write([]byte(tc.unread)); err != nil {
					t.Fatal(err)
				}
				eventually(t, 5*time.Second, "the client's data acknowledged", func() bool { return tcpInfo(t, c).Unacked == 0 })
			}
			f, err := repair.Freeze(s)
			if err != nil {
				t.Fatal(err)
			}
			st, err := f.Capture()
			if err != nil {
				t.Fatal(err)
			}
			if string(st.RecvQueue) != tc.unread {
				t.Fatalf("captured receive queue %q, want %q", st.RecvQueue, tc.unread)
			}
			if err := f.Discard(); err != nil {
				t.Fatal(err)
			}
			var r *repair.Restored
			in(t, ns, func() (err error) {
				r, err = repair.Restore(st, repair.RestoreOptions{Local: st.Local, Quiet: true})
				return err
			})
			defer r.Abort()
			if err := tc.send(c); err != nil {
				t.Fatal(err)
			}
			// Loopback delivers in microseconds; the restored socket's
			// answer is dropped, so the segment stays unacknowledged.
			time.Sleep(50 * time.Millisecond)
			if tcpInfo(t, c).Unacked == 0 {
				t.Fatal("the client's segment was acknowledged before the commit: the quiet socket was heard")
			}
			if err := r.Commit(); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "the client's segment acknowledged after the commit", func() bool { return tcpInfo(t, c).Unacked == 0 })
			if n := tcpInfo(t, c).Total_retrans; n != 0 {
				t.Errorf("the client retransmitted %d times: the commit did not acknowledge what the quiet socket took in", n)
			}
		})
	}
}

// TestMarkDefaults: nat's default mark bits are repair's, which nat does
// not import; and Options refuses marks that are not two different bits.
func TestMarkDefaults(t *testing.T) {
	if DefaultInjectMark != repair.DefaultMarks.Inject || DefaultQuietMark != repair.DefaultMarks.Quiet {
		t.Fatalf("nat's default marks %#x, %#x; repair's %+v", DefaultInjectMark, DefaultQuietMark, repair.DefaultMarks)
	}
	for _, o := range []Options{{InjectMark: 3}, {QuietMark: 1<<5 | 1}, {InjectMark: 1 << 4, QuietMark: 1 << 4}, {InjectMark: DefaultQuietMark}} {
		if err := o.Check(); !errors.Is(err, ErrInvalid) {
			t.Errorf("Options%+v.Check() = %v; want ErrInvalid", o, err)
		}
	}
	if err := (Options{InjectMark: 1, QuietMark: 1 << 31}).Check(); err != nil {
		t.Errorf("bits 0 and 31: %v", err)
	}
}

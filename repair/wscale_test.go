//go:build linux

package repair

import (
	"testing"
)

// TestWScales: tcp_info's window-scale byte is split by the host's byte
// order, and a capture reports the two shifts the right way round: the
// client's small receive buffer gives it a smaller shift than the
// server's, and the server's send shift is the client's receive shift.
func TestWScales(t *testing.T) {
	for _, c := range []struct {
		little   bool
		snd, rcv uint8
	}{{true, 7, 9}, {false, 9, 7}} {
		if snd, rcv := wscales(0x97, c.little); snd != c.snd || rcv != c.rcv {
			t.Errorf("wscales(0x97, little=%v) = %d, %d, want %d, %d", c.little, snd, rcv, c.snd, c.rcv)
		}
	}
	skipUnlessRoot(t)
	client, server := pair(t, pairOpts{network: "tcp4", clientRcvBuf: 4096})
	rc, err := client.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info tcpInfoHead
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = infoHead(int(fd)) }); err != nil || ierr != nil {
		t.Fatal(err, ierr)
	}
	f, err := Freeze(server)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Thaw()
	st, err := f.Capture()
	if err != nil {
		t.Fatal(err)
	}
	clientSnd, clientRcv := wscales(info.wscale, littleEndian)
	if st.SndWScale != clientRcv || st.RcvWScale != clientSnd || st.SndWScale >= st.RcvWScale {
		t.Errorf("server's shifts: send %d, receive %d; the client's: send %d, receive %d (want the server's send shift, the client's receive shift, below the server's receive shift)",
			st.SndWScale, st.RcvWScale, clientSnd, clientRcv)
	}
}

//go:build linux

package repair

import (
	"io"
	"net"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// getDefaultRcvBuf is a new TCP socket's SO_RCVBUF.
func getDefaultRcvBuf() (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return getInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
}

// sockInts reads SOL_SOCKET options of c.
func sockInts(t testing.TB, c *net.TCPConn, opts ...int) []int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]int, len(opts))
	err = control(rc, func(fd int) error {
		for i, o := range opts {
			if out[i], err = getInt(fd, unix.SOL_SOCKET, o); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestBufferSizes: a restored socket's buffers are what the application
// made them. Sizes it set stay set (SO_BUF_LOCK), also on an idle
// connection; a buffer it never sized is left to the kernel's autotuning
// even when the restore had to size it for queued data; and a state
// asking for more than the target allows gets the target's limit.
func TestBufferSizes(t *testing.T) {
	skipUnlessRoot(t)
	t.Run("autotuned with queues", func(t *testing.T) {
		client, server := pair(t, pairOpts{network: "tcp4"})
		if _, err := io.WriteString(client, strings.Repeat("x", 100<<10)); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the server to receive it", func() bool { return tcpInfo(t, server).Bytes_received >= 100<<10 })
		st, moved := migrateInPlace(t, "", server)
		if st.Sockopts.RcvBufLock || st.Sockopts.SndBufLock || st.Sockopts.RcvBuf == 0 {
			t.Fatalf("captured %+v, want no locks and the receive buffer's size", st.Sockopts)
		}
		if lock := sockInts(t, moved, unix.SO_BUF_LOCK)[0]; lock != 0 {
			t.Fatalf("restored SO_BUF_LOCK %d, want 0 (autotuning)", lock)
		}
		if _, err := io.ReadFull(moved, make([]byte, 100<<10)); err != nil {
			t.Fatal(err)
		}
		echo(t, client, moved)
	})
	t.Run("set by the application, idle", func(t *testing.T) {
		client, server := pair(t, pairOpts{network: "tcp4"})
		if err := server.SetReadBuffer(48 << 10); err != nil {
			t.Fatal(err)
		}
		if err := server.SetWriteBuffer(24 << 10); err != nil {
			t.Fatal(err)
		}
		want := sockInts(t, server, unix.SO_BUF_LOCK, unix.SO_RCVBUF, unix.SO_SNDBUF)
		_, moved := migrateInPlace(t, "", server)
		got := sockInts(t, moved, unix.SO_BUF_LOCK, unix.SO_RCVBUF, unix.SO_SNDBUF)
		if got[0] != bufLockRcv|bufLockSnd || got[1] != want[1] || got[2] != want[2] {
			t.Fatalf("restored lock, rcvbuf, sndbuf %v, want %v", got, want)
		}
		echo(t, client, moved)
	})
	t.Run("set by the application to the default size", func(t *testing.T) {
		// Sized before connect, the restored socket has that size
		// already: it must be pinned all the same.
		client, server := pair(t, pairOpts{network: "tcp4"})
		def, err := getDefaultRcvBuf()
		if err != nil {
			t.Fatal(err)
		}
		if err := server.SetReadBuffer(def / 2); err != nil {
			t.Fatal(err)
		}
		want := sockInts(t, server, unix.SO_BUF_LOCK, unix.SO_RCVBUF)
		if want[1] != def {
			t.Skipf("SO_RCVBUF %d after asking for %d; the default is %d", want[1], def/2, def)
		}
		_, moved := migrateInPlace(t, "", server)
		if got := sockInts(t, moved, unix.SO_BUF_LOCK, unix.SO_RCVBUF); got[0] != want[0] || got[1] != want[1] {
			t.Fatalf("restored lock, rcvbuf %v, want %v", got, want)
		}
		echo(t, client, moved)
	})
	t.Run("beyond the target's limits", func(t *testing.T) {
		client, server := pair(t, pairOpts{network: "tcp4"})
		if _, err := io.WriteString(client, "x"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the server to receive it", func() bool { return tcpInfo(t, server).Bytes_received >= 1 })
		f, err := Freeze(server)
		if err != nil {
			t.Fatal(err)
		}
		st, err := f.Capture()
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Discard(); err != nil {
			t.Fatal(err)
		}
		st.Sockopts.RcvBuf, st.Sockopts.SndBuf = 1<<31-1, 1<<31-1
		st.Sockopts.RcvBufLock, st.Sockopts.SndBufLock = true, true
		r, err := Restore(st, RestoreOptions{})
		if err != nil {
			t.Fatal(err)
		}
		moved := commitConn(t, "", r)
		rcvMax, sndMax := bufLimits()
		got := sockInts(t, moved, unix.SO_RCVBUF, unix.SO_SNDBUF)
		if int64(got[0]) > rcvMax || int64(got[1]) > sndMax {
			t.Fatalf("restored rcvbuf %d, sndbuf %d; the host allows %d and %d", got[0], got[1], rcvMax, sndMax)
		}
		if _, err := io.ReadFull(moved, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		echo(t, client, moved)
	})
}

//go:build linux

package repair

import (
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestUrgentRefused: a connection whose receive queue holds urgent
// (MSG_OOB) data the application has not read past cannot be captured
// (the bytes from the mark on would be lost), before or at the mark, and
// thawed it goes on with every byte, whether or not the application
// reads urgent data in line (SO_OOBINLINE). Once the application has read
// past the mark it migrates with the rest of its bytes.
func TestUrgentRefused(t *testing.T) {
	skipUnlessRoot(t)
	a, b := strings.Repeat("A", 1000), strings.Repeat("B", 500)
	// send writes a, then "U" as urgent data, then b, and waits until
	// the server has it all.
	send := func(t *testing.T, client, server *net.TCPConn) {
		t.Helper()
		if _, err := io.WriteString(client, a); err != nil {
			t.Fatal(err)
		}
		rc, err := client.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.Sendto(int(fd), []byte("U"), unix.MSG_OOB, nil) }); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		if _, err := io.WriteString(client, b); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the server to receive 1501 bytes", func() bool { return tcpInfo(t, server).Bytes_received >= 1501 })
	}
	readN := func(t *testing.T, c *net.TCPConn, n int) string {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, n)
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		return string(buf)
	}
	refused := func(t *testing.T, server *net.TCPConn) {
		t.Helper()
		f, err := Freeze(server)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Capture(); !errors.Is(err, ErrUrgent) {
			t.Fatalf("Capture = %v, want ErrUrgent", err)
		}
		if err := f.Thaw(); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("before the mark", func(t *testing.T) {
		client, server := pair(t, pairOpts{network: "tcp4"})
		send(t, client, server)
		refused(t, server)
		// Thawed, the application reads on: up to the mark, then past
		// the urgent byte, which is not in line.
		if got := readN(t, server, 1000) + readN(t, server, 500); got != a+b {
			t.Fatalf("after thaw the server read %q...", got[:20])
		}
	})
	t.Run("at the mark", func(t *testing.T) {
		client, server := pair(t, pairOpts{network: "tcp4"})
		send(t, client, server)
		if got := readN(t, server, 1000); got != a {
			t.Fatal("the server did not read up to the mark")
		}
		refused(t, server)
		if got := readN(t, server, 500); got != b {
			t.Fatalf("after thaw the server read %q", got)
		}
	})
	t.Run("past the mark", func(t *testing.T) {
		client, server := pair(t, pairOpts{network: "tcp4"})
		send(t, client, server)
		if got := readN(t, server, 1000) + readN(t, server, 100); got != a+b[:100] {
			t.Fatal("the server did not read past the mark")
		}
		_, moved := migrateInPlace(t, "", server)
		if got := readN(t, moved, 400); got != b[100:] {
			t.Fatalf("after the migration the server read %q", got)
		}
		echo(t, client, moved)
	})
	t.Run("inline", func(t *testing.T) {
		// With SO_OOBINLINE the urgent byte is in line, but reads and
		// peeks still stop at its mark: refused as well, and the option
		// is as the application set it after the attempt.
		client, server := pair(t, pairOpts{network: "tcp4"})
		rc, err := server.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		if err := control(rc, func(fd int) error { return setInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE, 1) }); err != nil {
			t.Fatal(err)
		}
		send(t, client, server)
		refused(t, server)
		if got := readN(t, server, 1000) + readN(t, server, 501); got != a+"U"+b {
			t.Fatalf("after thaw the server read %q...", got[:20])
		}
		_, moved := migrateInPlace(t, "", server)
		echo(t, client, moved)
	})
}

// echo checks that client and server still talk both ways.
func echo(t *testing.T, client, server *net.TCPConn) {
	t.Helper()
	client.SetDeadline(time.Now().Add(10 * time.Second))
	server.SetDeadline(time.Now().Add(10 * time.Second))
	for _, p := range []struct{ from, to *net.TCPConn }{{client, server}, {server, client}} {
		if _, err := io.WriteString(p.from, "ping"); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(p.to, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("%q, %v", buf, err)
		}
	}
}

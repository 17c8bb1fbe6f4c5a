package app

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// jsonDaemon accepts one application on sock, registers it at protocol
// version 2 (JSON frames) and hands over its link.
func jsonDaemon(t *testing.T, sock string) chan *msgConn {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan *msgConn, 1)
	go func() {
		uc, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		mc := newMsgConn(uc)
		if _, _, err := mc.read(); err != nil {
			return
		}
		mc.write(&message{Type: msgRegistered, Version: 2})
		ch <- mc
	}()
	return ch
}

// TestShutdownWhileAnswering: Serve's context ends while the answer to an
// export is being sent (its socket lent to the send), and the send then
// fails. Serve returns: shutdown closing the sockets under the server's
// lock waited for the send, which waited for the lock.
func TestShutdownWhileAnswering(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "d.sock")
	daemon := jsonDaemon(t, sock)
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := tl.Addr().String()
	tl.Close()
	h := HandlerFunc(func(ctx context.Context, c net.Conn, snap []byte) ([]byte, error) {
		_, err := io.Copy(io.Discard, c)
		return make([]byte, MaxSnapshot), err // an answer larger than the link's buffers
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, Config{Service: svc, Daemon: sock, Handler: h}) }()
	mc := <-daemon
	nc, err := net.Dial("tcp", svc)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if m, _, err := mc.read(); err != nil || m.Type != msgOpened {
		t.Fatalf("want %s, got %+v, %v", msgOpened, m, err)
	}
	tu := tupleOf(nc)
	tu = Tuple{Local: tu.Remote, Remote: tu.Local}
	mc.write(&message{Type: msgExportMany, ID: 1, Service: svc, Items: []item{{ID: 7, Tuple: &tu}}})
	time.Sleep(300 * time.Millisecond) // the answer fills the link; the daemon does not read
	cancel()
	time.Sleep(300 * time.Millisecond) // shutdown closes the sockets
	mc.close()                         // the send fails
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
}

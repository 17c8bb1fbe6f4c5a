package admin

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"
)

// TestSilentClientDropped: a client that connects to the admin socket and
// sends nothing is disconnected once the header timeout has passed.
func TestSilentClientDropped(t *testing.T) {
	old := headerTimeout
	headerTimeout = 200 * time.Millisecond
	defer func() { headerTimeout = old }()
	path := filepath.Join(t.TempDir(), "run", "admin.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hs := NewServer(ctx, http.NotFoundHandler())
	go hs.Serve(ln)
	defer hs.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	t0 := time.Now()
	_, err = c.Read(make([]byte, 1))
	if err == nil {
		t.Fatal("the server sent something to a client that sent nothing")
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("a silent client was still connected after %v", time.Since(t0))
	}
}

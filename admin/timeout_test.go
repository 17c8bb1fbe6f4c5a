package admin

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"strings"
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

// TestStuckDaemon: status and conns give up on an admin socket that
// accepts but never answers, and say so.
func TestStuckDaemon(t *testing.T) {
	old := QueryTimeout
	QueryTimeout = 300 * time.Millisecond
	defer func() { QueryTimeout = old }()
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accepted, never answered
		}
	}()
	c := NewClient(path)
	for name, call := range map[string]func() error{
		"status": func() error { _, err := c.Status(context.Background()); return err },
		"conns":  func() error { _, err := c.Conns(context.Background()); return err },
	} {
		done := make(chan error, 1)
		go func() { done <- call() }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "did not answer within 300ms") {
				t.Errorf("%s: %v, want it to say mtcpd did not answer", name, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: still waiting after 10s", name)
		}
	}
}

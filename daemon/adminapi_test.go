package daemon

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStreamStalledClient: a client that stops reading a progress stream
// does not hold up what sends the lines (a drain, which closes its
// frozen sockets after its last line): once a line waits longer than
// streamWriteTimeout the rest are dropped.
func TestStreamStalledClient(t *testing.T) {
	defer func(d time.Duration) { streamWriteTimeout = d }(streamWriteTimeout)
	streamWriteTimeout = 200 * time.Millisecond
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(done)
		send := streamLines(w)
		line := strings.Repeat("x", 1<<20)
		for range 64 { // far more than the sockets' buffers take
			send(line)
		}
	}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close() // read nothing
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler is still writing to a client that stopped reading")
	}
}

// TestDeferMax: a drain keeps at most half of the descriptor limit
// open for later (this machine's is 20,000 by default, less than the
// 50,000 of the constant).
func TestDeferMax(t *testing.T) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	want := min(50000, int(rl.Cur/2))
	if got := deferMax(50000); got != want {
		t.Fatalf("deferMax(50000) = %d with a limit of %d open files, want %d", got, rl.Cur, want)
	}
	if got := deferMax(10); got != min(10, want) {
		t.Fatalf("deferMax(10) = %d", got)
	}
}

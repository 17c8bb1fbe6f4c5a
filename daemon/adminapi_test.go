package daemon

import (
	"net/http"
	"net/http/httptest"
	"strings"
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

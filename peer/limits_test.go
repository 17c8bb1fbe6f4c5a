package peer

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestLengthAloneAllocatesLittle: a frame's length, sent without its
// bytes, does not make the reader allocate the length.
func TestLengthAloneAllocatesLittle(t *testing.T) {
	const claimed = 512 << 20
	raw := cat(header(claimed, msgTransfer, 1), make([]byte, 100))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := readFrame(bytes.NewReader(raw), claimed)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "stream ended inside") {
		t.Fatalf("readFrame: %v", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 2*readChunk {
		t.Fatalf("a %d-byte length with 100 bytes behind it allocated %d bytes", claimed, got)
	}
}

// TestReadPayloadGrows: payloads of every size around the chunk
// boundaries arrive whole, also when the reader hands them over a few
// bytes at a time.
func TestReadPayloadGrows(t *testing.T) {
	for _, n := range []int{0, 1, readChunk - 1, readChunk, readChunk + 1, 4*readChunk + 7, 21*readChunk + 3} {
		want := randomBytes(n)
		for _, r := range []io.Reader{bytes.NewReader(want), &dribble{r: bytes.NewReader(want), n: 4093}} {
			got, err := readPayload(r, n)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%d bytes from %T: %d bytes back, equal %v, %v", n, r, len(got), bytes.Equal(got, want), err)
			}
		}
		if n > 0 {
			if _, err := readPayload(bytes.NewReader(want[:n-1]), n); err != io.ErrUnexpectedEOF {
				t.Fatalf("%d bytes of %d: %v, want io.ErrUnexpectedEOF", n-1, n, err)
			}
		}
	}
}

// dribble reads at most n bytes at a time.
type dribble struct {
	r io.Reader
	n int
}

func (d *dribble) Read(p []byte) (int, error) { return d.r.Read(p[:min(len(p), d.n)]) }

// transferOf returns a Transfer carrying one item of n bytes of state.
func transferOf(n int) *TransferRequest {
	return &TransferRequest{TxID: 1, Items: []Item{{Service: ":7000", State: make([]byte, n)}}}
}

// TestFrameMemoryBounded: large frames wait for the server's frame
// memory; requests on other connections go on meanwhile, and the waiting
// frame is read once memory is given back.
func TestFrameMemoryBounded(t *testing.T) {
	ca := testCA(t, "test-pool")
	entered := make(chan struct{}, 10)
	release := make(chan struct{})
	h := &testHandler{transfer: func(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error) {
		entered <- struct{}{}
		<-release
		return &TransferReply{Results: []ItemResult{{OK: true}}}, nil
	}}
	scfg := memberConfig(t, ca, "s1")
	scfg.MaxFrame = 1 << 20
	scfg.FrameMemory = 2 << 20
	s := startServer(t, scfg, h)
	clients := make([]*Client, 3)
	for i := range clients {
		c, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c1"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients[i] = c
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(clients))
	for _, c := range clients {
		wg.Go(func() {
			_, err := c.Transfer(context.Background(), transferOf(900<<10))
			errs <- err
		})
	}
	for range 2 {
		select {
		case <-entered:
		case <-time.After(10 * time.Second):
			t.Fatal("two 900 KiB Transfers within 2 MiB of frame memory did not both reach the handler")
		}
	}
	select {
	case <-entered:
		t.Fatal("a third 900 KiB Transfer reached the handler while two held 1.8 MiB of 2 MiB")
	case <-time.After(300 * time.Millisecond):
	}
	// Small requests on other connections are not held up. (Those
	// behind the waiting frame, on its connection, wait with it.)
	other, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c2"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Status(context.Background()); err != nil {
		t.Fatalf("Status while a large frame waits: %v", err)
	}
	release <- struct{}{}
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the third Transfer did not reach the handler once memory was given back")
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("Transfer: %v", err)
		}
	}
}

// TestFrameStall: a connection whose large frame stops arriving is closed
// with an error saying so.
func TestFrameStall(t *testing.T) {
	old := frameStall
	frameStall = 200 * time.Millisecond
	defer func() { frameStall = old }()
	ca := testCA(t, "test-pool")
	h := &testHandler{}
	s := startServer(t, memberConfig(t, ca, "s1"), h)
	ccfg := memberConfig(t, ca, "c1")
	conn, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: ccfg.Roots, ServerName: "s1", NextProtos: []string{alpn},
		Certificates: []tls.Certificate{ccfg.Certificate}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	hdr := header(1<<20, msgTransfer, 1)
	if _, err := conn.Write(cat(encodeFrame(msgHello, 0, &hello{version: protoVersion, maxFrame: defaultMaxFrame}), hdr, make([]byte, 2*readChunk))); err != nil {
		t.Fatal(err)
	}
	var sent []string
	for {
		f, err := readFrame(conn, defaultMaxFrame)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("the server did not close the connection: %v", err)
			}
			break
		}
		if f.typ == msgError {
			var e errorBody
			decodeBody(f.payload, &e)
			sent = append(sent, e.msg)
		}
	}
	if len(sent) != 1 || !strings.Contains(sent[0], "stalled") {
		t.Fatalf("server sent errors %q, want one saying the frame stalled", sent)
	}
	if n := h.calls.Load(); n != 0 {
		t.Fatalf("handler called %d times", n)
	}
}

// TestConnsPerMemberBounded: a member cannot open more than
// maxConnsPerMember connections at once; another member still can, and
// so can the first once one of its connections closes.
func TestConnsPerMemberBounded(t *testing.T) {
	ca := testCA(t, "test-pool")
	s := startServer(t, memberConfig(t, ca, "s1"), &testHandler{})
	c1 := memberConfig(t, ca, "c1")
	var conns []*Client
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range maxConnsPerMember {
		c, err := Dial(context.Background(), s.addr, "s1", c1)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	_, err := Dial(context.Background(), s.addr, "s1", c1)
	if err == nil || !strings.Contains(err.Error(), "connections open") {
		t.Fatalf("connection %d of one member: %v, want a refusal", maxConnsPerMember+1, err)
	}
	c2, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c2"))
	if err != nil {
		t.Fatalf("another member: %v", err)
	}
	c2.Close()
	conns[0].Close()
	conns = conns[1:]
	waitFor(t, "a connection of c1 to be admitted again", func() bool {
		c, err := Dial(context.Background(), s.addr, "s1", c1)
		if err != nil {
			return false
		}
		conns = append(conns, c)
		return true
	})
}

// TestRequestTimeBounded: a handler's context always has a deadline, the
// server's MaxRequestTime when the caller sets none or a later one.
func TestRequestTimeBounded(t *testing.T) {
	got := make(chan time.Time, 1)
	h := &testHandler{status: func(ctx context.Context, from string) (*StatusReply, error) {
		dl, ok := ctx.Deadline()
		if !ok {
			dl = time.Time{}
		}
		got <- dl
		return &StatusReply{}, nil
	}}
	ca := testCA(t, "test-pool")
	scfg := memberConfig(t, ca, "s1")
	scfg.MaxRequestTime = 3 * time.Second
	s := startServer(t, scfg, h)
	c, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	long, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		max  time.Duration
	}{{"no deadline", context.Background(), 3 * time.Second}, {"an hour", long, 3 * time.Second}, {"a second", short, time.Second}} {
		t0 := time.Now()
		if _, err := c.Status(tc.ctx); err != nil {
			t.Fatal(err)
		}
		took := time.Since(t0)
		dl := <-got
		if dl.IsZero() || dl.Sub(t0) > tc.max+took || dl.Sub(t0) < tc.max-time.Second/2 {
			t.Errorf("caller with %s: handler's deadline %v after the call (zero: none), want about %v", tc.name, dl.Sub(t0), tc.max)
		}
	}
}

// TestCredentialsReplaced: a server whose Credentials move it to a new
// pool CA refuses from then on the members of the old CA and accepts
// those of the new one, while a connection made before goes on; a client
// whose Credentials change dials with the new ones.
func TestCredentialsReplaced(t *testing.T) {
	oldCA, newCA := testCA(t, "old-pool"), testCA(t, "new-pool")
	s1old, s1new := memberConfig(t, oldCA, "s1"), memberConfig(t, newCA, "s1")
	scfg := &Config{Name: "s1", Credentials: NewCredentials(s1old.Certificate, s1old.Roots)}
	s := startServer(t, scfg, &testHandler{})
	dial := func(cfg *Config) (*Client, error) { return Dial(context.Background(), s.addr, "s1", cfg) }
	before, err := dial(memberConfig(t, oldCA, "c1"))
	if err != nil {
		t.Fatalf("a member of the old CA before the change: %v", err)
	}
	defer before.Close()

	scfg.Credentials.Set(s1new.Certificate, s1new.Roots)
	if c, err := dial(memberConfig(t, oldCA, "c1")); err == nil {
		c.Close()
		t.Fatal("a member of the old CA dialled in after the server moved to the new one")
	}
	c2new := memberConfig(t, newCA, "c2")
	after, err := dial(c2new)
	if err != nil {
		t.Fatalf("a member of the new CA after the change: %v", err)
	}
	after.Close()
	if _, err := before.Status(context.Background()); err != nil {
		t.Fatalf("the connection made before the change: %v", err)
	}

	// A client moved to the new CA the same way.
	c3 := memberConfig(t, oldCA, "c3")
	c3new := memberConfig(t, newCA, "c3")
	ccfg := &Config{Name: "c3", Credentials: NewCredentials(c3.Certificate, c3.Roots)}
	if c, err := dial(ccfg); err == nil {
		c.Close()
		t.Fatal("a client of the old CA got through to a server of the new one")
	}
	ccfg.Credentials.Set(c3new.Certificate, c3new.Roots)
	c, err := dial(ccfg)
	if err != nil {
		t.Fatalf("the client once moved to the new CA: %v", err)
	}
	c.Close()
}

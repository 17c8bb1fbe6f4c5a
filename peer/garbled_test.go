package peer

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// header returns a frame header.
func header(length uint32, t msgType, id uint64) []byte {
	h := make([]byte, headerLen)
	binary.BigEndian.PutUint32(h, length)
	h[4] = byte(t)
	binary.BigEndian.PutUint64(h[5:], id)
	return h
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestGarbledFrames: an authenticated peer that breaks the protocol loses
// its connection, the handler never sees its requests, and the server
// goes on serving the others.
func TestGarbledFrames(t *testing.T) {
	ca := testCA(t, "test-pool")
	h := &testHandler{}
	scfg := memberConfig(t, ca, "s1")
	scfg.MaxFrame = 1 << 20
	s := startServer(t, scfg, h)
	ccfg := memberConfig(t, ca, "c1")
	good, err := Dial(context.Background(), s.addr, "s1", ccfg)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()

	helloFrame := encodeFrame(msgHello, 0, &hello{version: protoVersion, maxFrame: defaultMaxFrame})
	prepare := encodeRequest(msgPrepare, 1, &PrepareRequest{TxID: 1, Service: ":7000", Count: 1})

	// A Transfer whose item count claims far more items than its
	// payload holds.
	hugeCount := cat(header(8+8+4+10, msgTransfer, 1), make([]byte, 16), []byte{0xff, 0xff, 0xff, 0xff}, make([]byte, 10))
	// A Prepare whose service string runs past the payload.
	longString := cat(header(8+8+4, msgPrepare, 1), make([]byte, 16), []byte{0, 0x10, 0, 0})
	// An address of 7 bytes (neither 0, 4 nor 16+).
	badAddr := cat(header(8+4+1+4+7+2+1+2+4+4+4, msgTransfer, 1), make([]byte, 8+8), []byte{0, 0, 0, 1}, []byte{7}, make([]byte, 7+2+1+2+4+4+4))
	trailing := cat(header(8+3, msgStatus, 1), make([]byte, 11))

	for _, tc := range []struct {
		name     string
		send     []byte
		closeW   bool   // close the writing side afterwards
		wantLog  string // in the server's log
		wantSent string // in the error frame the server sends, if any
	}{
		{name: "random bytes instead of the hello", send: randomBytes(4096), wantLog: "closing connection"},
		{name: "hello with a wrong magic", send: cat(header(10, msgHello, 0), []byte("HTTP"), make([]byte, 6)), wantLog: "not an mtcp peer hello", wantSent: "not an mtcp peer hello"},
		{name: "hello of version 0", send: encodeFrame(msgHello, 0, &hello{version: 0, maxFrame: defaultMaxFrame}), wantLog: "protocol version 0", wantSent: "run the same mtcp release"},
		{name: "request before the hello", send: prepare, wantLog: "expected a hello", wantSent: "expected a hello"},
		{name: "random bytes after the hello", send: cat(helloFrame, randomBytes(4096)), wantLog: "closing connection"},
		{name: "huge length", send: cat(helloFrame, header(0xffffffff, msgTransfer, 1)), wantLog: "exceeds the limit", wantSent: "4294967295 bytes exceeds the limit of 1048576"},
		{name: "length just over MaxFrame", send: cat(helloFrame, header(1<<20+1, msgTransfer, 1), make([]byte, 1000)), wantLog: "exceeds the limit", wantSent: "exceeds the limit"},
		{name: "truncated frame", send: cat(helloFrame, header(100, msgPrepare, 1), make([]byte, 10)), closeW: true, wantLog: "stream ended inside a Prepare frame of 100 bytes"},
		{name: "truncated header", send: cat(helloFrame, header(100, msgPrepare, 1)[:7]), closeW: true, wantLog: "stream ended inside a frame header"},
		{name: "unknown message type", send: cat(helloFrame, header(8, 0x55, 1), make([]byte, 8)), wantLog: "unknown message type 0x55", wantSent: "unknown message type 0x55"},
		{name: "reply sent as a request", send: cat(helloFrame, header(8, msgStatus|replyBit, 1), make([]byte, 8)), wantLog: "unknown", wantSent: "unknown"},
		{name: "request without timeout", send: cat(helloFrame, header(3, msgPrepare, 1), make([]byte, 3)), wantLog: "has no timeout"},
		{name: "item count beyond the payload", send: cat(helloFrame, hugeCount), wantLog: "items do not fit", wantSent: "items do not fit"},
		{name: "string beyond the payload", send: cat(helloFrame, longString), wantLog: "string: need 1048576 bytes", wantSent: "Prepare request"},
		{name: "bad address", send: cat(helloFrame, badAddr), wantLog: "address of 7 bytes"},
		{name: "trailing bytes", send: cat(helloFrame, trailing), wantLog: "3 bytes left over"},
		{name: "request id 0", send: cat(helloFrame, encodeRequest(msgStatus, 0, &StatusRequest{})), wantLog: "request with id 0"},
		{name: "cancel with a payload", send: cat(helloFrame, header(1, msgCancel, 1), []byte{1}), wantLog: "cancel frame with a payload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(s.log.String())
			conn, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: ccfg.Roots, ServerName: "s1", NextProtos: []string{alpn},
				Certificates: []tls.Certificate{ccfg.Certificate}})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write(tc.send); err != nil {
				t.Logf("write: %v", err) // the server may close first
			}
			if tc.closeW {
				conn.CloseWrite()
			}
			// The server answers at most a hello and an error frame,
			// then closes.
			var sent []string
			for {
				f, err := readFrame(conn, defaultMaxFrame)
				if err != nil {
					var ne interface{ Timeout() bool }
					if errors.As(err, &ne) && ne.Timeout() {
						t.Fatalf("the server did not close the connection: %v", err)
					}
					if !errors.Is(err, io.EOF) {
						t.Logf("read: %v", err)
					}
					break
				}
				switch f.typ {
				case msgHello:
				case msgError:
					var e errorBody
					if err := decodeBody(f.payload, &e); err != nil {
						t.Errorf("error frame: %v", err)
					}
					sent = append(sent, e.msg)
				default:
					t.Errorf("server sent a %v frame", f.typ)
				}
			}
			if tc.wantSent != "" {
				if len(sent) != 1 || !strings.Contains(sent[0], tc.wantSent) {
					t.Errorf("server sent errors %q, want one containing %q", sent, tc.wantSent)
				}
			}
			waitFor(t, "server log to contain "+tc.wantLog, func() bool { return strings.Contains(s.log.String()[before:], tc.wantLog) })
			if n := h.calls.Load(); n != 0 {
				t.Fatalf("handler called %d times", n)
			}
			// Other connections are unaffected.
			if _, err := good.Prepare(context.Background(), &PrepareRequest{}); err != nil {
				t.Fatalf("good client: %v", err)
			}
			h.calls.Store(0)
		})
	}
	t.Logf("server log:\n%s", s.log.String())
}

// TestOversizedReplyIsAnError: a reply larger than the client's MaxFrame
// arrives as an error, not as a broken connection.
func TestOversizedReplyIsAnError(t *testing.T) {
	h := &testHandler{}
	h.status = func(ctx context.Context, from string) (*StatusReply, error) {
		return &StatusReply{Name: strings.Repeat("x", 100<<10)}, nil
	}
	p := newPool(t, h)
	p.client.MaxFrame = 64 << 10
	c := p.dial(t)
	_, err := c.Status(context.Background())
	var re *RemoteError
	if !errors.As(err, &re) || !strings.Contains(re.Msg, "exceeds the peer's limit") {
		t.Fatalf("Status with a reply too large: %v", err)
	}
	if _, err := c.Prepare(context.Background(), &PrepareRequest{}); err != nil {
		t.Errorf("Prepare afterwards: %v", err)
	}
}

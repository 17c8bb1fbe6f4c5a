package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/internal/stream"
)

// headerLen is the client's request: seed and length, 8 bytes each,
// big-endian.
const headerLen = 16

// checkUpload is the length's top bit: the client's upload is the pattern
// of seed^uploadSalt, and the server checks it.
const (
	checkUpload = 1 << 63
	uploadSalt  = 0xfeed
)

// errBadUpload is the session's error when a checked upload is wrong.
var errBadUpload = errors.New("mtcp-bulk: the client's upload is not the pattern it asked to be checked against")

// httpMethod starts an HTTP request ("GET /SEED/LENGTH HTTP/1.1"), which
// a binary request whose seed spells it in its first bytes cannot be
// told from.
const httpMethod = "GET "

// maxHTTPHead bounds an HTTP request's head.
const maxHTTPHead = 8 << 10

// httpRequest parses an HTTP request head: GET /SEED/LENGTH, both
// decimal. ok is false for anything else.
func httpRequest(head []byte) (seed uint64, length int64, ok bool) {
	line, _, _ := strings.Cut(string(head), "\r\n")
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "GET" || !strings.HasPrefix(f[2], "HTTP/1.") {
		return 0, 0, false
	}
	parts := strings.Split(strings.TrimPrefix(f[1], "/"), "/")
	if len(parts) != 2 {
		return 0, 0, false
	}
	seed, err1 := strconv.ParseUint(parts[0], 10, 64)
	length, err2 := strconv.ParseInt(parts[1], 10, 64)
	if err1 != nil || err2 != nil || length < 0 {
		return 0, 0, false
	}
	return seed, length, true
}

// httpHead is the head of the response to an HTTP request for length
// bytes (0: endless, until the client closes).
func httpHead(length int64) string {
	h := "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n"
	if length > 0 {
		h += "Content-Length: " + strconv.FormatInt(length, 10) + "\r\n"
	}
	return h + "\r\n"
}

// httpBadRequest answers an HTTP request mtcp-bulk does not understand.
var httpBadRequest = func() string {
	const body = "mtcp-bulk: ask for GET /SEED/LENGTH (decimal; LENGTH 0 is endless)\n"
	return fmt.Sprintf("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}()

// state is the per-connection state, and its JSON is the snapshot.
type state struct {
	// Header holds the part of the request received so far.
	Header []byte `json:"header,omitempty"`
	// Started is set once the request is complete.
	Started bool `json:"started,omitempty"`
	// Seed names the pattern streamed.
	Seed uint64 `json:"seed"`
	// Length is how many bytes to stream; 0 means endless.
	Length int64 `json:"length"`
	// Sent is the stream offset: bytes written so far.
	Sent int64 `json:"sent"`
	// Received counts the bytes the client sent after its request.
	Received int64 `json:"received"`
	// Check is set when the client asked for its upload to be checked
	// against the pattern of Seed^uploadSalt.
	Check bool `json:"check,omitempty"`
	// HTTP is set when the request is HTTP: the stream is the body of
	// a response whose head goes first, HeadSent bytes of it so far.
	HTTP     bool `json:"http,omitempty"`
	HeadSent int  `json:"head_sent,omitempty"`
}

// check reports what is inconsistent in a state from a snapshot.
func (st *state) check() error {
	switch {
	case st.Started && len(st.Header) > 0:
		return errors.New("a request both complete and partial")
	case !st.HTTP && len(st.Header) >= headerLen:
		return fmt.Errorf("a partial request of %d bytes, the whole is %d", len(st.Header), headerLen)
	case st.HTTP && len(st.Header) > maxHTTPHead:
		return fmt.Errorf("a partial HTTP request of %d bytes, the limit is %d", len(st.Header), maxHTTPHead)
	case st.HeadSent < 0 || st.HeadSent > len(httpHead(st.Length)) || st.HeadSent > 0 && !st.HTTP:
		return fmt.Errorf("%d bytes of the response head sent", st.HeadSent)
	case st.HeadSent < len(httpHead(st.Length)) && st.Sent > 0 && st.HTTP:
		return errors.New("body bytes sent before the whole head")
	case st.Length < 0 || st.Sent < 0 || st.Received < 0:
		return errors.New("negative counts")
	case st.Length > 0 && st.Sent > st.Length:
		return fmt.Errorf("%d bytes sent of %d", st.Sent, st.Length)
	case !st.Started && (st.Sent > 0 || st.Received > 0):
		return errors.New("bytes counted before the request is complete")
	}
	return nil
}

// bulk is the mtcp-bulk handler.
type bulk struct {
	// rate paces each stream at this many bytes per second, in
	// pacedChunk writes; 0 streams as fast as the connection takes it.
	rate int64
}

// pacedChunk is the write size of a paced stream.
const pacedChunk = 4 << 10

// Serve reads the request, then streams the pattern from the offset the
// snapshot says while a goroutine consumes and counts what the client
// sends. The session ends when the client closes its end.
func (h bulk) Serve(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
	var st state
	if snap != nil {
		if err := json.Unmarshal(snap, &st); err != nil {
			return nil, fmt.Errorf("mtcp-bulk: bad snapshot: %w", err)
		}
		if err := st.check(); err != nil {
			return nil, fmt.Errorf("mtcp-bulk: bad snapshot: %w", err)
		}
	}
	for !st.Started {
		// Read no further than the request: what follows it is counted.
		// An HTTP request's head is read a byte at a time, to stop at its
		// end.
		want := headerLen - len(st.Header)
		if st.HTTP {
			want = 1
		}
		b := make([]byte, want)
		n, err := conn.Read(b)
		st.Header = append(st.Header, b[:n]...)
		if !st.HTTP && len(st.Header) >= len(httpMethod) && string(st.Header[:len(httpMethod)]) == httpMethod {
			st.HTTP = true
		}
		switch {
		case st.HTTP && bytes.HasSuffix(st.Header, []byte("\r\n\r\n")):
			seed, length, ok := httpRequest(st.Header)
			if !ok {
				io.WriteString(conn, httpBadRequest)
				return nil, nil
			}
			st.Seed, st.Length, st.Started, st.Header = seed, length, true, nil
		case st.HTTP && len(st.Header) >= maxHTTPHead:
			io.WriteString(conn, httpBadRequest)
			return nil, nil
		case !st.HTTP && len(st.Header) == headerLen:
			st.Seed = binary.BigEndian.Uint64(st.Header)
			l := binary.BigEndian.Uint64(st.Header[8:])
			st.Check, l = l&checkUpload != 0, l&^checkUpload
			st.Length, st.Started, st.Header = int64(l), true, nil
		}
		if err != nil {
			if errors.Is(err, app.ErrMigrating) {
				return json.Marshal(&st)
			}
			if errors.Is(err, io.EOF) {
				return nil, nil
			}
			return nil, err
		}
	}

	var received atomic.Int64
	received.Store(st.Received)
	recvDone := make(chan error, 1)
	go func() {
		var check *stream.Verifier
		if st.Check {
			check = &stream.Verifier{Pattern: stream.Pattern(st.Seed ^ uploadSalt), N: st.Received}
		}
		b := make([]byte, 32<<10)
		for {
			n, err := conn.Read(b)
			received.Add(int64(n))
			if check != nil && n > 0 {
				if _, verr := check.Write(b[:n]); verr != nil {
					// Not what the client sent: end the session,
					// which the client sees as its stream ending
					// too early.
					conn.Close()
					recvDone <- fmt.Errorf("%w: %w", errBadUpload, verr)
					return
				}
			}
			if err != nil {
				recvDone <- err
				return
			}
		}
	}()

	pat := stream.Pattern(st.Seed)
	buf := make([]byte, 64<<10)
	if h.rate > 0 {
		buf = buf[:pacedChunk]
	}
	var werr, rerr error
	readerDone := false
	if head := httpHead(st.Length); st.HTTP && st.HeadSent < len(head) {
		n, err := io.WriteString(conn, head[st.HeadSent:])
		st.HeadSent += n
		werr = err
	}
	start, sent0 := time.Now(), st.Sent
	for werr == nil && (st.Length == 0 || st.Sent < st.Length) {
		if h.rate > 0 {
			due := start.Add(time.Duration(float64(st.Sent-sent0) / float64(h.rate) * float64(time.Second)))
			if werr = pace(ctx, due); werr != nil {
				break
			}
		}
		if !readerDone {
			select {
			case rerr = <-recvDone:
				readerDone = true
			default:
			}
		}
		// A client that has sent all it had (EOF: it shut down its
		// sending side) still gets the rest of the length it asked
		// for; an endless stream ends with it, and any stream with
		// another end of the client's side.
		if readerDone && (st.Length == 0 || !errors.Is(rerr, io.EOF)) {
			break
		}
		k := int64(len(buf))
		if st.Length > 0 {
			k = min(k, st.Length-st.Sent)
		}
		pat.Fill(buf[:k], st.Sent)
		n, err := conn.Write(buf[:k])
		st.Sent += int64(n) // what Write took is in the socket, even when interrupted
		if err != nil {
			werr = err
			break
		}
	}
	migrating := errors.Is(werr, app.ErrMigrating)
	complete := st.Length > 0 && st.Sent == st.Length
	if werr != nil && !migrating || st.HTTP && complete {
		// The client is gone, or an HTTP response is complete (and
		// said Connection: close): stop the reader too.
		conn.Close()
	}
	if !readerDone {
		// Stream complete, or interrupted: the reader ends when the
		// client closes, or is interrupted alike.
		rerr = <-recvDone
	}
	st.Received = received.Load()
	switch {
	case errors.Is(rerr, errBadUpload):
		slog.Error("session ended: bad upload", "conn", conn.RemoteAddr(), "err", rerr)
		return nil, rerr
	case migrating || errors.Is(rerr, app.ErrMigrating):
		return json.Marshal(&st)
	case werr != nil:
		return nil, werr
	case errors.Is(rerr, io.EOF), st.HTTP && complete:
		return nil, nil
	default:
		return nil, rerr
	}
}

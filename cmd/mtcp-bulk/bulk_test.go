package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
	"github.com/mtcp-dev/mtcp/internal/stream"
)

func request(seed uint64, n int64) []byte {
	b := binary.BigEndian.AppendUint64(nil, seed)
	return binary.BigEndian.AppendUint64(b, uint64(n))
}

// receive reads exactly n bytes from c into v.
func receive(t *testing.T, c net.Conn, v *stream.Verifier, n int64) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.CopyN(v, c, n); err != nil {
		t.Fatalf("after %d bytes: %v", v.N, err)
	}
}

// exportState exports tup from s and decodes the snapshot.
func exportState(t *testing.T, s *apptest.Server, tup app.Tuple) (*app.Exported, state) {
	t.Helper()
	e := apptest.Export(t, s, tup)
	var st state
	if err := json.Unmarshal(e.Snapshot, &st); err != nil {
		t.Fatalf("snapshot %q: %v", e.Snapshot, err)
	}
	return e, st
}

// TestStreamMigratesMidStream moves a session while the server is blocked
// writing (the client stops reading), first aborting an export, then for
// real to B, and back to A at the end: the client sees every byte of the
// pattern exactly once, in order, and the bytes it sent are counted
// across servers.
func TestStreamMigratesMidStream(t *testing.T) {
	const (
		seed  = 0x5eed
		total = 48 << 20
		up1   = 1000
		up2   = 500
	)
	a := apptest.Start(t, "A", bulk{})
	b := apptest.Start(t, "B", bulk{})
	c := a.Dial(t)
	v := &stream.Verifier{Pattern: seed}
	c.Write(request(seed, total))
	c.Write(make([]byte, up1))
	receive(t, c, v, 1<<20)
	tup := a.WaitConn(t, c)

	// The client reads nothing now, so A ends up blocked in Write. Abort
	// an export until A has consumed what the client sent and written
	// past what the client read (an export can catch A between two
	// writes, at exactly what the client read).
	var e *app.Exported
	apptest.Eventually(t, apptest.Timeout, "A to count the client's bytes and write on", func() (bool, string) {
		var st state
		e, st = exportState(t, a, tup)
		if st.Received == up1 && st.Sent > v.N {
			return true, ""
		}
		if err := e.Finish(context.Background(), false); err != nil {
			t.Fatal(err)
		}
		e.Socket.Close()
		return false, string(e.Snapshot)
	})
	var st state
	json.Unmarshal(e.Snapshot, &st)
	if st.Sent <= v.N || st.Sent >= total || st.Seed != seed || st.Length != total {
		t.Fatalf("snapshot %+v: want a stream in progress, past the %d bytes read", st, v.N)
	}
	apptest.Import(t, b, e)
	if err := e.Finish(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close()
	c.Write(make([]byte, up2))
	receive(t, c, v, total-v.N)

	// Stream complete; B waits for the client to close. Its count
	// includes A's.
	apptest.Eventually(t, apptest.Timeout, "B to count the client's bytes", func() (bool, string) {
		var st state
		e, st = exportState(t, b, tup)
		if st.Received == up1+up2 {
			return true, ""
		}
		e.Finish(context.Background(), false)
		e.Socket.Close()
		return false, string(e.Snapshot)
	})
	json.Unmarshal(e.Snapshot, &st)
	if st.Sent != total {
		t.Fatalf("B's snapshot %+v: want the stream complete", st)
	}
	apptest.Import(t, a, e)
	if err := e.Finish(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close()

	// Nothing more comes; closing ends the session on A.
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if n, err := io.Copy(v, c); n != 0 || err != nil {
		t.Fatalf("after the stream: %d more bytes, %v", n, err)
	}
	apptest.Eventually(t, apptest.Timeout, "A to end the session", func() (bool, string) {
		return len(a.Registry.Conns(a.Service)) == 0, ""
	})
}

// TestStreamMigratesRepeatedly moves an endless stream back and forth
// while the client reads in small steps, so that exports interrupt Writes
// part-way (a Write blocked on a full socket, as in the test above,
// returns having written nothing): it fails if the handler loses count
// of a partial write (checked by breaking that on purpose).
func TestStreamMigratesRepeatedly(t *testing.T) {
	a := apptest.Start(t, "A", bulk{})
	b := apptest.Start(t, "B", bulk{})
	c := a.Dial(t)
	v := &stream.Verifier{Pattern: 42}
	c.Write(request(42, 0))
	tup := a.WaitConn(t, c)
	from, to := a, b
	for range 20 {
		receive(t, c, v, 100_001)
		apptest.Migrate(t, from, to, tup)
		from, to = to, from
	}
	receive(t, c, v, 8<<20)
}

// TestPacedStreamMigrates moves a paced stream back and forth: the pacing
// restarts on each server and is interrupted by the export like a Write,
// and every byte arrives once, in order, at about the rate asked for.
func TestPacedStreamMigrates(t *testing.T) {
	const rate = 4 << 20 // bytes per second
	a := apptest.Start(t, "A", bulk{rate: rate})
	b := apptest.Start(t, "B", bulk{rate: rate})
	c := a.Dial(t)
	v := &stream.Verifier{Pattern: 9}
	start := time.Now()
	c.Write(request(9, 0))
	tup := a.WaitConn(t, c)
	from, to := a, b
	for range 10 {
		receive(t, c, v, 50_001)
		apptest.Migrate(t, from, to, tup)
		from, to = to, from
	}
	receive(t, c, v, 100_000)
	// 600,010 bytes at 4 MiB/s take at least 136 ms; unpaced, they
	// arrive in a few milliseconds.
	if took, least := time.Since(start), time.Duration(float64(v.N)/rate*float64(time.Second)); took < least*9/10 {
		t.Fatalf("%d bytes in %v: faster than the pace allows (%v)", v.N, took, least)
	}
}

// TestRequestSplitAcrossMigration moves a session before its request is
// complete.
func TestRequestSplitAcrossMigration(t *testing.T) {
	a := apptest.Start(t, "A", bulk{})
	b := apptest.Start(t, "B", bulk{})
	c := a.Dial(t)
	req := request(7, 1<<20)
	c.Write(req[:5])
	tup := a.WaitConn(t, c)
	var e *app.Exported
	apptest.Eventually(t, apptest.Timeout, "A to read the first bytes", func() (bool, string) {
		var st state
		e, st = exportState(t, a, tup)
		if len(st.Header) == 5 {
			return true, ""
		}
		e.Finish(context.Background(), false)
		e.Socket.Close()
		return false, string(e.Snapshot)
	})
	apptest.Import(t, b, e)
	if err := e.Finish(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close()
	c.Write(req[5:])
	v := &stream.Verifier{Pattern: 7}
	receive(t, c, v, 1<<20)
}

func TestFlags(t *testing.T) {
	if code := run([]string{"--help"}, io.Discard); code != 0 {
		t.Errorf("--help: exit %d", code)
	}
	if code := run([]string{"--rate", "-1"}, io.Discard); code != 2 {
		t.Errorf("negative rate: exit %d, want 2", code)
	}
	if code := run([]string{"extra"}, io.Discard); code != 2 {
		t.Errorf("extra argument: exit %d, want 2", code)
	}
}

// TestCheckedUpload: with the length's top bit set, the server checks the
// client's upload against the pattern of seed^0xfeed across migrations,
// and ends the session at the first wrong byte.
func TestCheckedUpload(t *testing.T) {
	const seed = 0xc0ffee
	up := stream.Pattern(seed ^ 0xfeed)
	a := apptest.Start(t, "A", bulk{})
	b := apptest.Start(t, "B", bulk{})
	c := a.Dial(t)
	v := &stream.Verifier{Pattern: seed}
	c.Write(request(seed, -1<<63)) // endless, upload checked
	tup := a.WaitConn(t, c)
	from, to := a, b
	var sent int64
	for range 6 {
		if _, err := io.Copy(c, up.Reader(sent, 10_007)); err != nil {
			t.Fatal(err)
		}
		sent += 10_007
		receive(t, c, v, 100_001)
		apptest.Migrate(t, from, to, tup)
		from, to = to, from
	}
	_, st := exportStateAfter(t, from, tup, sent)
	if !st.Check || st.Length != 0 {
		t.Fatalf("snapshot %+v: want an endless stream with its upload checked", st)
	}
	// One wrong byte: the server ends the session.
	if _, err := c.Write([]byte{^byte(0) ^ pick(up, sent)}); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Fatalf("the session did not end cleanly after a wrong upload byte: %v", err)
	}
}

// pick returns the pattern's byte at off.
func pick(p stream.Pattern, off int64) byte {
	var b [1]byte
	p.Fill(b[:], off)
	return b[0]
}

// exportStateAfter waits until from has counted n uploaded bytes of tup,
// then exports and puts it back, returning its state.
func exportStateAfter(t *testing.T, from *apptest.Server, tup app.Tuple, n int64) (*app.Exported, state) {
	t.Helper()
	var st state
	var e *app.Exported
	apptest.Eventually(t, apptest.Timeout, "the server to count the upload", func() (bool, string) {
		e, st = exportState(t, from, tup)
		if err := e.Finish(context.Background(), false); err != nil {
			t.Fatal(err)
		}
		e.Socket.Close()
		return st.Received == n, fmt.Sprintf("%d of %d", st.Received, n)
	})
	return e, st
}

// TestHalfClosedClient: a client that shuts down its sending side after
// its request still receives every byte it asked for, in order.
func TestHalfClosedClient(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		sc, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer sc.Close()
		_, err = bulk{}.Serve(context.Background(), sc, nil)
		done <- err
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const want = 8 << 20
	if _, err := c.Write(request(7, want)); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	v := &stream.Verifier{Pattern: stream.Pattern(7)}
	if _, err := io.Copy(v, c); err != nil || v.N != want {
		t.Fatalf("received %d of %d bytes: %v", v.N, want, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("handler: %v", err)
	}
}

// TestBadSnapshots: a snapshot that makes no sense is refused with an
// error, never a panic, and nothing is written.
func TestBadSnapshots(t *testing.T) {
	for _, snap := range []string{
		`{"header":"AAAAAAAAAAAAAAAAAAAAAAAA"}`, // 18 bytes of a 16-byte request
		`{"started":true,"header":"AAAA"}`,
		`{"started":true,"seed":1,"length":10,"sent":11}`,
		`{"started":true,"seed":1,"length":-1}`,
		`{"started":true,"seed":1,"sent":-5}`,
		`{"header":"AAAA","sent":3}`,
		`not json`,
	} {
		client, server := net.Pipe()
		_, err := bulk{}.Serve(context.Background(), server, []byte(snap))
		client.Close()
		server.Close()
		if err == nil {
			t.Errorf("snapshot %s: accepted", snap)
		}
	}
}

// TestHTTPStream: an HTTP client (GET /SEED/LENGTH) gets one response
// head and then exactly LENGTH bytes of the pattern, across a migration
// in the middle of its request's head and another in the middle of the
// body; then the server closes. A request it does not understand gets a
// 400 response.
func TestHTTPStream(t *testing.T) {
	const seed, total = 77, 8 << 20
	a := apptest.Start(t, "A", bulk{})
	b := apptest.Start(t, "B", bulk{})
	c := a.Dial(t)
	c.Write([]byte("GET /77/8388608 HT"))
	tup := a.WaitConn(t, c)
	apptest.Eventually(t, apptest.Timeout, "A to read the first part of the request", func() (bool, string) {
		e, st := exportState(t, a, tup)
		if st.HTTP && len(st.Header) == len("GET /77/8388608 HT") {
			apptest.Import(t, b, e)
			if err := e.Finish(context.Background(), true); err != nil {
				t.Fatal(err)
			}
			e.Socket.Close()
			return true, ""
		}
		e.Finish(context.Background(), false)
		e.Socket.Close()
		return false, string(e.Snapshot)
	})
	c.Write([]byte("TP/1.1\r\nHost: s1\r\nUser-Agent: test\r\n\r\n"))
	head := httpHead(total)
	got := make([]byte, len(head))
	c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != head {
		t.Fatalf("response head %q, %v; want %q", got, err, head)
	}
	v := &stream.Verifier{Pattern: seed}
	receive(t, c, v, 1<<20)
	e, st := exportState(t, b, tup)
	if !st.HTTP || st.HeadSent != len(head) || st.Sent < v.N {
		t.Fatalf("snapshot mid-body %+v", st)
	}
	apptest.Import(t, a, e)
	if err := e.Finish(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close()
	receive(t, c, v, total-v.N)
	c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if n, err := io.Copy(v, c); n != 0 || err != nil {
		t.Fatalf("after the body: %d more bytes, %v; want the server to close", n, err)
	}

	bad := a.Dial(t)
	bad.Write([]byte("GET /seventy-seven HTTP/1.1\r\n\r\n"))
	bad.SetReadDeadline(time.Now().Add(apptest.Timeout))
	resp, err := io.ReadAll(bad)
	if err != nil || !bytes.HasPrefix(resp, []byte("HTTP/1.1 400 Bad Request\r\n")) {
		t.Fatalf("bad request: %q, %v", resp, err)
	}
}

// TestHTTPMigratesRepeatedly moves an HTTP download back and forth, paced
// and not: exports interrupt the handler's writes, its pacing and its
// reads of the (silent) client, in whichever order they come, and the
// body arrives whole, once, in order, before the server closes. It fails
// if the handler takes an interrupted read for the end of the response
// (checked by breaking that on purpose).
func TestHTTPMigratesRepeatedly(t *testing.T) {
	for _, rate := range []int64{0, 8 << 20} {
		t.Run(fmt.Sprintf("rate=%d", rate), func(t *testing.T) {
			const total = 2_000_000
			a := apptest.Start(t, "A", bulk{rate: rate})
			b := apptest.Start(t, "B", bulk{rate: rate})
			c := a.Dial(t)
			c.Write([]byte("GET /5/2000000 HTTP/1.1\r\n\r\n"))
			head := make([]byte, len(httpHead(total)))
			c.SetReadDeadline(time.Now().Add(apptest.Timeout))
			if _, err := io.ReadFull(c, head); err != nil {
				t.Fatal(err)
			}
			tup := a.WaitConn(t, c)
			v := &stream.Verifier{Pattern: 5}
			from, to := a, b
			for range 15 {
				receive(t, c, v, 50_001)
				apptest.Migrate(t, from, to, tup)
				from, to = to, from
			}
			receive(t, c, v, total-v.N)
			if n, err := io.Copy(v, c); n != 0 || err != nil {
				t.Fatalf("after the body: %d more bytes, %v", n, err)
			}
		})
	}
}

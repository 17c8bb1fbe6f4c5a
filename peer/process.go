package peer

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// Process mode: a whole process (CRIU checkpoint) moves to the peer. The
// messages, in order:
//
//	ProcessPrepare   the target makes room for the checkpoint
//	[pages stream]   a second authenticated connection (DialPages) carries
//	                 the memory pages while the source dumps
//	ProcessRestore   the other images and the connections; the target
//	                 restores and installs its reply rewrites
//	ProcessFinish    commit (the switch happened) or abort
//
// A [Handler] that serves them implements [ProcessHandler].

// ProcessPrepareRequest announces a process migration to the target.
type ProcessPrepareRequest struct {
	TxID uint64 // the transaction, chosen by the source
	Name string // the process's command name, for the target's log
	// Lazy announces a post-copy migration: the pages stream carries
	// CRIU's page-server protocol both ways, between the source's lazy
	// dump and a lazy-pages daemon on the target, and the restore runs
	// before the memory has arrived. Otherwise the stream carries the
	// page images, source to target, before the restore.
	Lazy bool
}

// ImageFile is one file of a checkpoint.
type ImageFile struct {
	Name string // a plain file name, no directory
	Data []byte
}

// ProcessFlow is one connection of the migrating process.
type ProcessFlow struct {
	Flow  FlowID         // the connection as its client sees it
	Local netip.AddrPort // the socket's local address on the source
}

// ProcessRestoreRequest carries the checkpoint's images (all but the
// memory pages, which came through the pages stream) and the process's
// connections.
type ProcessRestoreRequest struct {
	TxID  uint64
	Files []ImageFile
	Flows []ProcessFlow
	// Rewrite are the source's own addresses: sockets bound to one of
	// them are restored on the target's address of the same family.
	Rewrite []netip.Addr
	// Age is how long ago, as the request leaves the source, the dump
	// began: the target moves the connections' timestamp clocks forward
	// by at least that much (see criu.AdvanceClocks).
	Age time.Duration
}

// ProcessRestoreReply reports a restore that succeeded.
type ProcessRestoreReply struct {
	PID       int           // the restored process, as the target sees it
	Restore   time.Duration // how long CRIU's restore took
	Wait      time.Duration // how long the target waited for the last pages
	Rewritten int           // sockets whose local address was rewritten
}

// ProcessFinishRequest ends a process migration on the target: Commit
// after the switch (the target owns the connections), else abort (the
// target kills what it restored and removes its rules).
type ProcessFinishRequest struct {
	TxID   uint64
	Commit bool
	Reason string // why the source aborts, for the target's log
}

// ProcessHandler is implemented by a [Handler] whose server can receive
// whole processes. Requests to a Handler without it fail with a
// [RemoteError].
type ProcessHandler interface {
	ProcessPrepare(ctx context.Context, from string, r *ProcessPrepareRequest) error
	// ProcessPages serves the pages stream of transaction txID: conn is
	// the raw authenticated connection, read and written by the handler
	// until the stream ends; the server closes it when the handler
	// returns.
	ProcessPages(ctx context.Context, from string, txID uint64, conn net.Conn) error
	ProcessRestore(ctx context.Context, from string, r *ProcessRestoreRequest) (*ProcessRestoreReply, error)
	ProcessFinish(ctx context.Context, from string, r *ProcessFinishRequest) error
}

// ProcessPrepare tells the peer a process is coming.
func (c *Client) ProcessPrepare(ctx context.Context, r *ProcessPrepareRequest) error {
	return c.call(ctx, msgProcPrepare, nonNil(r), &empty{})
}

// ProcessRestore sends the checkpoint's images and connections; the peer
// restores the process before answering.
func (c *Client) ProcessRestore(ctx context.Context, r *ProcessRestoreRequest) (*ProcessRestoreReply, error) {
	rep := new(ProcessRestoreReply)
	if err := c.call(ctx, msgProcRestore, nonNil(r), rep); err != nil {
		return nil, err
	}
	return rep, nil
}

// ProcessFinish commits or aborts a process migration on the peer.
func (c *Client) ProcessFinish(ctx context.Context, r *ProcessFinishRequest) error {
	return c.call(ctx, msgProcFinish, nonNil(r), &empty{})
}

// DialPages opens the pages stream of transaction txID to the peer: a new
// connection, authenticated like [Dial]'s (mutual TLS 1.3, the pool CA,
// the peer's name), that after its first frame carries raw bytes in both
// directions. The returned connection has CloseWrite; the caller closes
// it.
func DialPages(ctx context.Context, addr, peerName string, cfg *Config, txID uint64) (net.Conn, error) {
	opErr := func(err error) error { return &OpError{Peer: peerName, Op: "pages stream", Err: err} }
	if peerName == "" {
		return nil, opErr(errors.New("no peer name to verify the server's certificate against"))
	}
	if err := cfg.check(); err != nil {
		return nil, opErr(err)
	}
	hctx, cancel := context.WithTimeout(ctx, cfg.handshakeTimeout())
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(hctx, "tcp", addr)
	if err != nil {
		return nil, opErr(err)
	}
	conn := tls.Client(raw, cfg.clientTLS(peerName))
	if err := conn.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, opErr(explainHandshake(peerName, err))
	}
	stop := context.AfterFunc(hctx, func() { raw.SetDeadline(aLongTimeAgo) })
	// A Client without its reply reader: only the hello is exchanged as
	// frames, then the connection is the caller's.
	c := &Client{peer: peerName, w: newWire(conn), localMax: cfg.maxFrame(), done: make(chan struct{}),
		pending: map[uint64]chan frame{}}
	_, err = c.hello(hctx)
	if err == nil {
		e := newEncoder(msgProcPages, 1)
		e.u64(0) // no timeout: the stream lasts as long as the dump
		(&pagesBody{txID: txID}).encode(e)
		var segs [][]byte
		if segs, _, err = e.finish(); err == nil {
			err = c.w.send(hctx, segs, nil)
		}
	}
	if !stop() {
		err = errors.Join(err, hctx.Err())
	}
	if err != nil {
		raw.Close()
		return nil, opErr(err)
	}
	return conn, nil
}

// servePages runs the pages stream that frame f opened on conn.
func (sc *serverConn) servePages(ctx context.Context, f frame, conn net.Conn) error {
	if len(f.payload) < 8 {
		return fmt.Errorf("%w: pages request without a timeout", ErrProtocol)
	}
	var b pagesBody
	if err := decodeBody(f.payload[8:], &b); err != nil {
		return fmt.Errorf("%w: pages request: %v", ErrProtocol, err)
	}
	h, ok := sc.s.h.(ProcessHandler)
	if !ok {
		return fmt.Errorf("%s does not receive processes", sc.s.cfg.name())
	}
	return h.ProcessPages(ctx, sc.from, b.txID, conn)
}

// pagesBody opens a pages stream.
type pagesBody struct{ txID uint64 }

func (b *pagesBody) encode(e *encoder) { e.u64(b.txID) }
func (b *pagesBody) decode(d *decoder) { b.txID = d.u64() }

func (r *ProcessPrepareRequest) encode(e *encoder) {
	e.u64(r.TxID)
	e.str(r.Name)
	e.boolean(r.Lazy)
}

func (r *ProcessPrepareRequest) decode(d *decoder) {
	r.TxID = d.u64()
	r.Name = d.str()
	r.Lazy = d.boolean()
}

const minImageFile = 4 + 4
const minProcessFlow = minFlow + 1 + 2

func (r *ProcessRestoreRequest) encode(e *encoder) {
	e.u64(r.TxID)
	e.length(len(r.Files), "file list")
	for _, f := range r.Files {
		e.str(f.Name)
		e.blob(f.Data)
	}
	e.length(len(r.Flows), "flow list")
	for _, f := range r.Flows {
		e.flow(f.Flow)
		e.addrPort(f.Local)
	}
	e.length(len(r.Rewrite), "address list")
	for _, a := range r.Rewrite {
		e.addr(a)
	}
	e.i64(int64(r.Age))
}

func (r *ProcessRestoreRequest) decode(d *decoder) {
	r.TxID = d.u64()
	if n := d.count(minImageFile, unsafe.Sizeof(ImageFile{}), "files"); n > 0 {
		r.Files = make([]ImageFile, n)
		for i := range r.Files {
			r.Files[i].Name = d.str()
			r.Files[i].Data = d.blob()
		}
	}
	if n := d.count(minProcessFlow, unsafe.Sizeof(ProcessFlow{}), "flows"); n > 0 {
		r.Flows = make([]ProcessFlow, n)
		for i := range r.Flows {
			r.Flows[i].Flow = d.flow()
			r.Flows[i].Local = d.addrPort()
		}
	}
	if n := d.count(1, unsafe.Sizeof(netip.Addr{}), "addresses"); n > 0 {
		r.Rewrite = make([]netip.Addr, n)
		for i := range r.Rewrite {
			r.Rewrite[i] = d.addr()
		}
	}
	r.Age = time.Duration(d.i64())
}

func (r *ProcessRestoreReply) encode(e *encoder) {
	e.i64(int64(r.PID))
	e.i64(int64(r.Restore))
	e.i64(int64(r.Wait))
	e.i64(int64(r.Rewritten))
}

func (r *ProcessRestoreReply) decode(d *decoder) {
	r.PID = d.integer()
	r.Restore = time.Duration(d.i64())
	r.Wait = time.Duration(d.i64())
	r.Rewritten = d.integer()
}

func (r *ProcessFinishRequest) encode(e *encoder) {
	e.u64(r.TxID)
	e.boolean(r.Commit)
	e.str(r.Reason)
}

func (r *ProcessFinishRequest) decode(d *decoder) {
	r.TxID = d.u64()
	r.Commit = d.boolean()
	r.Reason = d.str()
}

// processBody returns an empty process-mode request of type t, nil if t is
// not one.
func processBody(t msgType) body {
	switch t {
	case msgProcPrepare:
		return new(ProcessPrepareRequest)
	case msgProcRestore:
		return new(ProcessRestoreRequest)
	case msgProcFinish:
		return new(ProcessFinishRequest)
	}
	return nil
}

// callProcess runs a process-mode request's handler.
func (sc *serverConn) callProcess(ctx context.Context, req body) (body, bool, error) {
	var h ProcessHandler
	switch req.(type) {
	case *ProcessPrepareRequest, *ProcessRestoreRequest, *ProcessFinishRequest:
		var ok bool
		if h, ok = sc.s.h.(ProcessHandler); !ok {
			return nil, true, fmt.Errorf("%s does not receive processes", sc.s.cfg.name())
		}
	default:
		return nil, false, nil
	}
	switch r := req.(type) {
	case *ProcessPrepareRequest:
		return &empty{}, true, h.ProcessPrepare(ctx, sc.from, r)
	case *ProcessRestoreRequest:
		rep, err := h.ProcessRestore(ctx, sc.from, r)
		b, err := orZero(rep, err)
		return b, true, err
	case *ProcessFinishRequest:
		return &empty{}, true, h.ProcessFinish(ctx, sc.from, r)
	}
	return nil, false, nil
}

// SendFiles writes the named files of dir to w, the source's end of a
// pages stream, each as its name, its size and its bytes, then an empty
// name, and waits for the receiver's one-byte acknowledgement that every
// file is written (r, usually the same connection). It returns the bytes
// sent.
func SendFiles(w io.Writer, r io.Reader, dir string, names []string) (int64, error) {
	var total int64
	hdr := make([]byte, 0, 2+255+8)
	for _, n := range names {
		if n == "" || len(n) > 255 {
			return total, fmt.Errorf("file name %q cannot be sent", n)
		}
		f, err := os.Open(filepath.Join(dir, n))
		if err != nil {
			return total, err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return total, err
		}
		hdr = binary.BigEndian.AppendUint16(hdr[:0], uint16(len(n)))
		hdr = append(hdr, n...)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(fi.Size()))
		if _, err := w.Write(hdr); err != nil {
			f.Close()
			return total, err
		}
		c, err := io.CopyBuffer(onlyWriter{w}, io.LimitReader(f, fi.Size()), make([]byte, 1<<20))
		f.Close()
		total += c
		if err == nil && c != fi.Size() {
			err = fmt.Errorf("%s shrank while being sent", n)
		}
		if err != nil {
			return total, err
		}
	}
	if _, err := w.Write([]byte{0, 0}); err != nil {
		return total, err
	}
	ack := make([]byte, 1)
	if _, err := io.ReadFull(r, ack); err != nil {
		return total, fmt.Errorf("no acknowledgement of the files: %w", err)
	}
	if ack[0] != 1 {
		return total, errors.New("the receiver refused the files")
	}
	return total, nil
}

// ReceiveFiles reads what [SendFiles] writes into new files of dir, and
// acknowledges on w once every file is written. Each file is first put
// to accept, with its name and size: an error from it refuses the file
// (and ends the transfer), as does a name that exists. It returns the
// names received.
func ReceiveFiles(r io.Reader, w io.Writer, dir string, accept func(name string, size uint64) error) ([]string, error) {
	var names []string
	br := bufio.NewReaderSize(r, 1<<20)
	buf := make([]byte, 1<<20)
	for {
		var l [2]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return names, fmt.Errorf("file header: %w", err)
		}
		n := int(binary.BigEndian.Uint16(l[:]))
		if n == 0 {
			break
		}
		nb := make([]byte, n+8)
		if _, err := io.ReadFull(br, nb); err != nil {
			return names, fmt.Errorf("file header: %w", err)
		}
		name, size := string(nb[:n]), binary.BigEndian.Uint64(nb[n:])
		if !filepath.IsLocal(name) || strings.ContainsAny(name, "/\x00") {
			return names, fmt.Errorf("refusing file %q: not a plain file name", name)
		}
		if err := accept(name, size); err != nil {
			return names, fmt.Errorf("refusing file %q (%d bytes): %w", name, size, err)
		}
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return names, err
		}
		c, err := io.CopyBuffer(onlyWriter{f}, io.LimitReader(br, int64(size)), buf)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil && uint64(c) != size {
			err = fmt.Errorf("%s: %d of %d bytes: %w", name, c, size, io.ErrUnexpectedEOF)
		}
		if err != nil {
			return names, err
		}
		names = append(names, name)
	}
	_, err := w.Write([]byte{1})
	return names, err
}

// onlyWriter hides a writer's ReadFrom, so that io.CopyBuffer uses the
// buffer it is given.
type onlyWriter struct{ io.Writer }

package app

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The application protocol: a unix stream socket carrying frames of a
// 4-byte big-endian length followed by that many bytes of one JSON
// message. A message that carries file descriptors says how many in its
// "fds" field; they travel as one SCM_RIGHTS on the sendmsg(2) of the
// frame's first bytes. The kernel ends a recvmsg(2) right after the data
// that carried descriptors, so a frame's descriptors arrive with the read
// that returns the frame's first byte: descriptors are matched to frames
// in order, a frame may only claim descriptors that arrived with its first
// byte, and one that arrived before the start of a frame that does not
// claim it was sent with no frame claiming it, a protocol error.
//
// Version 1, one connection per request:
//
//	app → daemon   register{version, max_version, service, pid}  daemon → registered{version} or error{code}
//	daemon → app   export{id, service, tuple}            app → exported{id, snapshot} + fd, or exported{id, error, code}
//	daemon → app   verdict{id, verdict: gone|resume}     app → finished{id} or finished{id, error}
//	daemon → app   import{id, service, snapshot} + fd    app → imported{id} or imported{id, error}
//	app → daemon   opened{service, tuple}, closed{service, tuple}
//
// Version 2 adds batches. Each item of a batch has its own id (an export's
// id is what its verdict names); a request holds at most maxBatch items
// and its frame at most maxFrame bytes, so the sender splits a large batch
// into several requests:
//
//	daemon → app   export-many{id, service, items[{id, tuple}]}
//	               app → exported-many{id, items[{id, snapshot, fd: true} | {id, error, code}]} + fds
//	daemon → app   verdict-many{id, verdict, items[{id}]}
//	               app → finished-many{id, items[{id} | {id, error}]}
//	daemon → app   import-many{id, service, items[{id, snapshot, fd: true}]} + fds
//	               app → imported-many{id, items[{id} | {id, error}]}
//	app → daemon   opened{service, tuples}, closed{service, tuples}
//
// An answer to a batch may come in several frames (the application sends
// the connections that are ready without waiting for the slowest), each
// with at least one item and each item exactly once; an item with
// "fd": true has a descriptor, the frame's descriptors belong to those
// items in order. The answers to import-many and verdict-many come once
// every item is done, as one frame each.
//
// Version 3 has the messages of version 2 in binary frames once the
// registration is answered; binwire.go describes them.
//
// Version 4 adds to an import-many's items the connection's TCP_NODELAY
// and keepalive settings where they are not Go's defaults:
// "tcp": {nodelay, keepalive, idle, intvl, count} (seconds, probes).
// net.FileConn, with which the application adopts the socket, imposes
// Go's defaults; the application puts these back.
//
// Version negotiation: the application registers with the lowest and
// highest versions it speaks ("version", "max_version"; a version-1
// application sends only "version": 1); the daemon answers registered
// with the highest version both speak, which a version-1 daemon leaves
// out (meaning 1). The daemon then sends only that version's requests: a
// version-1 application gets one request per connection. An application
// that speaks version 2 answers version-1 requests too.
//
// Anything else, an oversized frame, undecodable JSON, a batch with too
// many items, an answer whose items are unknown or repeated, or a frame
// whose descriptors do not match its items is a protocol error: the
// receiver closes the socket (and every descriptor it received on it).
const (
	protocolVersion    = 4 // the highest version this package speaks
	minProtocolVersion = 1
)

// Message types.
const (
	msgRegister     = "register"
	msgRegistered   = "registered"
	msgError        = "error"
	msgExport       = "export"
	msgExported     = "exported"
	msgVerdict      = "verdict"
	msgFinished     = "finished"
	msgImport       = "import"
	msgImported     = "imported"
	msgOpened       = "opened"
	msgClosed       = "closed"
	msgExportMany   = "export-many"
	msgExportedMany = "exported-many"
	msgVerdictMany  = "verdict-many"
	msgFinishedMany = "finished-many"
	msgImportMany   = "import-many"
	msgImportedMany = "imported-many"
)

// Verdicts.
const (
	verdictGone   = "gone"
	verdictResume = "resume"
)

// Error codes, so that the other side can wrap the right sentinel.
const (
	codeNoConn  = "no-conn"
	codeTaken   = "taken"
	codeNoSvc   = "no-service"
	codeRefused = "refused"
	codeGeneric = ""
)

// MaxSnapshot is the largest application snapshot, in bytes, the library
// moves. Snapshots are per-connection state and meant to be small; a
// handler that returns a larger one keeps its connection (the export
// fails and the connection resumes where it is).
const MaxSnapshot = 1 << 20

const (
	maxFrame      = 2 << 20 // a MaxSnapshot in base64 plus the envelope
	maxServiceLen = 256
	maxErrorLen   = 4096
	writeTimeout  = 10 * time.Second
	readChunk     = 64 << 10

	// scmMaxFD is the most descriptors one sendmsg(2) can pass
	// (SCM_MAX_FD in include/net/scm.h); a recvmsg(2) returns those of
	// one sendmsg at the most.
	scmMaxFD = 253
	// maxBatch is the most items (and so descriptors) in one frame.
	maxBatch = 250
	// maxQueuedFDs bounds the descriptors received but not yet claimed:
	// those of the frame being read and of the next one, which may start
	// in the same read.
	maxQueuedFDs = 2 * scmMaxFD
	// frameBudget is what the items of one frame may take, leaving room
	// for the envelope.
	frameBudget = maxFrame - 16<<10
)

// message is every message of the protocol; each type uses some fields.
type message struct {
	Type       string  `json:"type"`
	ID         uint64  `json:"id,omitempty"`
	Version    int     `json:"version,omitempty"`
	MaxVersion int     `json:"max_version,omitempty"`
	Service    string  `json:"service,omitempty"`
	PID        int     `json:"pid,omitempty"`
	Tuple      *Tuple  `json:"tuple,omitempty"`
	Tuples     []Tuple `json:"tuples,omitempty"`
	Snapshot   []byte  `json:"snapshot"` // no omitempty: an empty snapshot is not a nil one
	Verdict    string  `json:"verdict,omitempty"`
	Items      []item  `json:"items,omitempty"`
	FDs        int     `json:"fds,omitempty"`
	Error      string  `json:"error,omitempty"`
	Code       string  `json:"code,omitempty"`
}

// item is one connection of a batch.
type item struct {
	ID       uint64   `json:"id"`
	Tuple    *Tuple   `json:"tuple,omitempty"`
	Snapshot []byte   `json:"snapshot,omitzero"` // omitzero keeps nil and empty apart
	FD       bool     `json:"fd,omitempty"`
	TCP      *tcpOpts `json:"tcp,omitempty"` // version 4, imports
	Error    string   `json:"error,omitempty"`
	Code     string   `json:"code,omitempty"`
}

// tcpVersion is the first protocol version whose imports carry the
// connections' TCP options.
const tcpVersion = 4

// tcpOpts are an imported connection's TCP_NODELAY and keepalive
// settings (TCPOptions on the wire).
type tcpOpts struct {
	NoDelay   bool   `json:"nodelay"`
	KeepAlive bool   `json:"keepalive"`
	Idle      uint32 `json:"idle,omitempty"`  // seconds
	Intvl     uint32 `json:"intvl,omitempty"` // seconds
	Count     uint32 `json:"count,omitempty"` // probes
}

// The kernel's limits for the keepalive settings (MAX_TCP_KEEPIDLE,
// MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT).
const (
	maxKeepSecs  = 32767
	maxKeepCount = 127
)

// valid reports whether o is within the kernel's limits.
func (o *tcpOpts) valid() bool {
	return o.Idle <= maxKeepSecs && o.Intvl <= maxKeepSecs && o.Count <= maxKeepCount
}

// size bounds the bytes it takes in a frame: JSON escapes a byte of
// text into at most 6, base64 encodes 3 bytes into 4.
func (it *item) size() int {
	n := 128 + 4*((len(it.Snapshot)+2)/3) + 6*(len(it.Error)+len(it.Code))
	if it.TCP != nil {
		n += 96
	}
	if it.Tuple != nil {
		n += 6 * len(it.Tuple.String())
	}
	return n
}

// fdCount is how many of items carry a descriptor.
func fdCount(items []item) int {
	n := 0
	for i := range items {
		if items[i].FD {
			n++
		}
	}
	return n
}

// chunks splits n items into consecutive ranges [lo, hi) that each fit
// one frame: at most maxBatch items, at most frameBudget bytes by size
// (a single item is always a chunk of its own, whatever its size).
func chunks(n int, size func(i int) int) [][2]int {
	var out [][2]int
	lo, bytes := 0, 0
	for i := range n {
		s := size(i)
		if i > lo && (i-lo >= maxBatch || bytes+s > frameBudget) {
			out = append(out, [2]int{lo, i})
			lo, bytes = i, 0
		}
		bytes += s
	}
	if n > lo {
		out = append(out, [2]int{lo, n})
	}
	return out
}

// msgConn frames messages on a unix stream socket. Writes are safe for
// concurrent use; reads are not (one reader goroutine per connection).
type msgConn struct {
	uc *net.UnixConn

	wmu sync.Mutex

	buf   []byte // received; buf[off:] not yet parsed
	off   int    // frames before it are parsed: moved out once more is read
	pos   int64  // stream offset of buf[off]
	recvd int64  // bytes received so far
	chunk []byte
	oob   []byte
	fds   []queuedFD // received descriptors not yet claimed by a frame

	frames *frameCount // if not nil, counts the frames

	// bin is set once protocol version 3 or later is agreed: frames are
	// written binary from then on, and binary frames are accepted.
	bin atomic.Bool
}

// frameCount counts frames by direction and type ("<-exported-many",
// "->export-many"), for tests and debugging.
type frameCount struct {
	mu sync.Mutex
	n  map[string]int
}

func (f *frameCount) add(dir, typ string) {
	if f != nil {
		f.mu.Lock()
		f.n[dir+typ]++
		f.mu.Unlock()
	}
}

// queuedFD is a received descriptor and the stream offsets at which the
// read that delivered it started and ended.
type queuedFD struct {
	fd         int
	start, end int64
}

func newMsgConn(uc *net.UnixConn) *msgConn {
	return &msgConn{uc: uc}
}

// write sends m; fds, at most maxBatch, travel with it as SCM_RIGHTS.
func (c *msgConn) write(m *message, fds ...int) error {
	frame, oob, err := c.encode(m, fds)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.sendLocked(m.Type, frame, oob)
}

// writeFirst writes m as write does, once publish has run with the
// connection's writes held: no message written after publish returns can
// go out ahead of m.
func (c *msgConn) writeFirst(m *message, publish func()) error {
	frame, oob, err := c.encode(m, nil)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	publish()
	return c.sendLocked(m.Type, frame, oob)
}

// encode makes m's frame, and the control message of the fds it carries.
func (c *msgConn) encode(m *message, fds []int) (frame, oob []byte, err error) {
	if len(fds) > maxBatch {
		return nil, nil, fmt.Errorf("%s message with %d descriptors, the limit is %d", m.Type, len(fds), maxBatch)
	}
	m.FDs = len(fds)
	if c.bin.Load() {
		frame = encodeBinary(make([]byte, 4, 256), m)
	} else {
		body, err := json.Marshal(m)
		if err != nil {
			return nil, nil, fmt.Errorf("encode %s message: %w", m.Type, err)
		}
		frame = append(make([]byte, 4, 4+len(body)), body...)
	}
	if len(frame)-4 > maxFrame {
		return nil, nil, fmt.Errorf("%s message is %d bytes, more than the limit of %d", m.Type, len(frame)-4, maxFrame)
	}
	binary.BigEndian.PutUint32(frame, uint32(len(frame)-4))
	if len(fds) > 0 {
		oob = syscall.UnixRights(fds...)
	}
	return frame, oob, nil
}

// sendLocked sends one encoded frame; c.wmu is held.
func (c *msgConn) sendLocked(typ string, frame, oob []byte) error {
	c.uc.SetWriteDeadline(time.Now().Add(writeTimeout))
	// A stream socket may take part of a large frame; the descriptors are
	// attached to the first part, the rest follows as plain data.
	n, _, err := c.uc.WriteMsgUnix(frame, oob, nil)
	if err == nil && n < len(frame) {
		_, err = c.uc.Write(frame[n:])
	}
	if err != nil {
		return fmt.Errorf("send %s message: %w", typ, err)
	}
	c.frames.add("->", typ)
	return nil
}

// read returns the next message and the descriptors it carries (the
// caller owns them). Any error leaves the connection unusable.
func (c *msgConn) read() (*message, []int, error) {
	if c.chunk == nil {
		c.chunk = make([]byte, readChunk)
		// Room for the most one sendmsg can pass: more would be
		// truncated (MSG_CTRUNC, the kernel closes the rest).
		c.oob = make([]byte, syscall.CmsgSpace(4*scmMaxFD))
	}
	for {
		if un := c.buf[c.off:]; len(un) >= 4 {
			n := binary.BigEndian.Uint32(un)
			if n > maxFrame {
				return nil, nil, fmt.Errorf("%w: frame of %d bytes announced, the limit is %d", ErrProtocol, n, maxFrame)
			}
			if uint32(len(un)-4) >= n {
				// parse copies what it keeps: the frame's bytes may be
				// overwritten by the next read.
				m, fds, err := c.parse(un[4 : 4+n])
				c.off += int(4 + n)
				c.pos += int64(4 + n)
				return m, fds, err
			}
		}
		// Move the unparsed bytes to the front once per read, not once
		// per frame (a read of many small frames would copy its rest
		// again for each).
		rest := copy(c.buf, c.buf[c.off:])
		c.buf, c.off = c.buf[:rest], 0
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.chunk, c.oob)
		n, oobn = max(n, 0), max(oobn, 0) // -1 on some errors
		c.recvd += int64(n)
		if oobn > 0 {
			if perr := c.takeFDs(c.oob[:oobn], c.recvd-int64(n)); perr != nil {
				return nil, nil, perr
			}
		}
		if flags&syscall.MSG_CTRUNC != 0 {
			return nil, nil, fmt.Errorf("%w: too many descriptors in one message (control data truncated)", ErrProtocol)
		}
		c.buf = append(c.buf, c.chunk[:n]...)
		if err != nil {
			if n > 0 {
				continue // parse what arrived before the error first
			}
			return nil, nil, err
		}
	}
}

// takeFDs queues the descriptors of a read that started at stream offset
// start.
func (c *msgConn) takeFDs(oob []byte, start int64) error {
	scms, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("%w: bad control message: %v", ErrProtocol, err)
	}
	var bad error
	for i := range scms {
		fds, err := syscall.ParseUnixRights(&scms[i])
		if err != nil {
			bad = fmt.Errorf("%w: unexpected control message: %v", ErrProtocol, err)
			continue
		}
		for _, fd := range fds {
			c.fds = append(c.fds, queuedFD{fd: fd, start: start, end: c.recvd})
		}
	}
	if bad == nil && len(c.fds) > maxQueuedFDs {
		bad = fmt.Errorf("%w: %d descriptors received without a message claiming them", ErrProtocol, len(c.fds))
	}
	return bad
}

func (c *msgConn) parse(body []byte) (*message, []int, error) {
	m := new(message)
	if len(body) > 0 && body[0] == binFrame {
		if !c.bin.Load() {
			return nil, nil, fmt.Errorf("%w: a binary message before protocol version %d was agreed", ErrProtocol, binVersion)
		}
		if err := decodeBinary(body, m); err != nil {
			return nil, nil, fmt.Errorf("%w: %v", ErrProtocol, err)
		}
	} else if err := json.Unmarshal(body, m); err != nil {
		return nil, nil, fmt.Errorf("%w: undecodable message: %v", ErrProtocol, err)
	}
	switch {
	case m.Type == "":
		return nil, nil, fmt.Errorf("%w: message without a type", ErrProtocol)
	case m.FDs < 0 || m.FDs > maxBatch:
		return nil, nil, fmt.Errorf("%w: %s message claims %d descriptors", ErrProtocol, m.Type, m.FDs)
	case len(c.fds) > 0 && c.fds[0].end <= c.pos:
		return nil, nil, fmt.Errorf("%w: a descriptor arrived that no message claimed", ErrProtocol)
	case m.FDs > len(c.fds) || m.FDs > 0 && c.fds[m.FDs-1].start > c.pos:
		return nil, nil, fmt.Errorf("%w: %s message claims %d descriptors, fewer arrived with it", ErrProtocol, m.Type, m.FDs)
	case len(m.Service) > maxServiceLen:
		return nil, nil, fmt.Errorf("%w: service name of %d bytes", ErrProtocol, len(m.Service))
	case len(m.Snapshot) > MaxSnapshot:
		return nil, nil, fmt.Errorf("%w: snapshot of %d bytes, the limit is %d", ErrProtocol, len(m.Snapshot), MaxSnapshot)
	case len(m.Items) > maxBatch || len(m.Tuples) > maxBatch:
		return nil, nil, fmt.Errorf("%w: %s message with %d items, the limit is %d", ErrProtocol, m.Type, max(len(m.Items), len(m.Tuples)), maxBatch)
	}
	m.Error = truncate(m.Error)
	c.frames.add("<-", m.Type)
	if m.Tuple != nil {
		t := m.Tuple.norm()
		m.Tuple = &t
	}
	for i := range m.Tuples {
		m.Tuples[i] = m.Tuples[i].norm()
	}
	for i := range m.Items {
		it := &m.Items[i]
		if len(it.Snapshot) > MaxSnapshot {
			return nil, nil, fmt.Errorf("%w: snapshot of %d bytes, the limit is %d", ErrProtocol, len(it.Snapshot), MaxSnapshot)
		}
		if it.TCP != nil && !it.TCP.valid() {
			return nil, nil, fmt.Errorf("%w: keepalive settings %+v beyond the kernel's limits", ErrProtocol, *it.TCP)
		}
		it.Error = truncate(it.Error)
		if it.Tuple != nil {
			t := it.Tuple.norm()
			it.Tuple = &t
		}
	}
	var fds []int
	for _, q := range c.fds[:m.FDs] {
		fds = append(fds, q.fd)
	}
	c.fds = c.fds[m.FDs:]
	return m, fds, nil
}

func truncate(s string) string {
	if len(s) > maxErrorLen {
		return s[:maxErrorLen]
	}
	return s
}

// close closes the socket; safe to call from any goroutine, any number
// of times. It unblocks a pending read.
func (c *msgConn) close() error { return c.uc.Close() }

// dropFDs closes the descriptors received but not claimed by a message.
// Only the reading goroutine may call it, after its last read.
func (c *msgConn) dropFDs() {
	for _, q := range c.fds {
		syscall.Close(q.fd)
	}
	c.fds = nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// remoteError turns an error answer, its text and code, into an error
// wrapping the sentinel the code names.
func remoteError(text, code string) error {
	var s error
	switch code {
	case codeNoConn:
		s = ErrNoConn
	case codeTaken:
		s = ErrServiceTaken
	case codeNoSvc:
		s = ErrNoService
	case codeRefused:
		s = ErrPeerRefused
	default:
		return errors.New(text)
	}
	// The text usually starts with the sentinel's own: do not repeat it.
	return fmt.Errorf("%w%s", s, strings.TrimPrefix(": "+text, ": "+s.Error()))
}

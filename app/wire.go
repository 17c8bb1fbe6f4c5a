package app

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The application protocol: a unix stream socket carrying frames of a
// 4-byte big-endian length followed by that many bytes of one JSON
// message. A message that carries a file descriptor says so in its "fds"
// field; the descriptor travels as SCM_RIGHTS on the sendmsg(2) of the
// frame's first bytes. The kernel ends a recvmsg(2) right after the data
// that carried descriptors, so a frame's descriptor arrives with the read
// that returns the frame's first byte: descriptors are matched to frames
// in order, and one that arrived before the start of a frame that does
// not claim it was sent with no frame claiming it, a protocol error.
//
//	app → daemon   register{version, service, pid}       daemon → registered{} or error{code}
//	daemon → app   export{id, service, tuple}            app → exported{id, snapshot} + fd, or exported{id, error, code}
//	daemon → app   verdict{id, verdict: gone|resume}     app → finished{id}
//	daemon → app   import{id, service, snapshot} + fd    app → imported{id} or imported{id, error}
//	app → daemon   opened{service, tuple}, closed{service, tuple}
//
// Anything else, an oversized frame, undecodable JSON or a descriptor
// where none belongs is a protocol error: the receiver closes the socket.
const protocolVersion = 1

// Message types.
const (
	msgRegister   = "register"
	msgRegistered = "registered"
	msgError      = "error"
	msgExport     = "export"
	msgExported   = "exported"
	msgVerdict    = "verdict"
	msgFinished   = "finished"
	msgImport     = "import"
	msgImported   = "imported"
	msgOpened     = "opened"
	msgClosed     = "closed"
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
	maxQueuedFDs  = 16
	writeTimeout  = 10 * time.Second
	readChunk     = 64 << 10
)

// message is every message of the protocol; each type uses some fields.
type message struct {
	Type     string `json:"type"`
	ID       uint64 `json:"id,omitempty"`
	Version  int    `json:"version,omitempty"`
	Service  string `json:"service,omitempty"`
	PID      int    `json:"pid,omitempty"`
	Tuple    *Tuple `json:"tuple,omitempty"`
	Snapshot []byte `json:"snapshot"` // no omitempty: an empty snapshot is not a nil one
	Verdict  string `json:"verdict,omitempty"`
	FDs      int    `json:"fds,omitempty"`
	Error    string `json:"error,omitempty"`
	Code     string `json:"code,omitempty"`
}

// msgConn frames messages on a unix stream socket. Writes are safe for
// concurrent use; reads are not (one reader goroutine per connection).
type msgConn struct {
	uc *net.UnixConn

	wmu sync.Mutex

	buf   []byte // received, not yet parsed
	pos   int64  // stream offset of buf[0]
	recvd int64  // bytes received so far
	chunk []byte
	oob   []byte
	fds   []queuedFD // received descriptors not yet claimed by a frame
}

// queuedFD is a received descriptor and the stream offset at which the
// read that delivered it ended.
type queuedFD struct {
	fd  int
	end int64
}

func newMsgConn(uc *net.UnixConn) *msgConn {
	return &msgConn{uc: uc}
}

// write sends m; fd, if not negative, travels with it as SCM_RIGHTS.
func (c *msgConn) write(m *message, fd int) error {
	if fd >= 0 {
		m.FDs = 1
	} else {
		m.FDs = 0
	}
	body, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode %s message: %w", m.Type, err)
	}
	if len(body) > maxFrame {
		return fmt.Errorf("%s message is %d bytes, more than the limit of %d", m.Type, len(body), maxFrame)
	}
	frame := make([]byte, 4+len(body))
	binary.BigEndian.PutUint32(frame, uint32(len(body)))
	copy(frame[4:], body)
	var oob []byte
	if fd >= 0 {
		oob = syscall.UnixRights(fd)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.uc.SetWriteDeadline(time.Now().Add(writeTimeout))
	// A stream socket may take part of a large frame; the descriptor is
	// attached to the first part, the rest follows as plain data.
	n, _, err := c.uc.WriteMsgUnix(frame, oob, nil)
	if err == nil && n < len(frame) {
		_, err = c.uc.Write(frame[n:])
	}
	if err != nil {
		return fmt.Errorf("send %s message: %w", m.Type, err)
	}
	return nil
}

// read returns the next message and the descriptors it carries (the
// caller owns them). Any error leaves the connection unusable.
func (c *msgConn) read() (*message, []int, error) {
	if c.chunk == nil {
		c.chunk = make([]byte, readChunk)
		c.oob = make([]byte, syscall.CmsgSpace(4*4))
	}
	for {
		if len(c.buf) >= 4 {
			n := binary.BigEndian.Uint32(c.buf)
			if n > maxFrame {
				return nil, nil, fmt.Errorf("%w: frame of %d bytes announced, the limit is %d", ErrProtocol, n, maxFrame)
			}
			if uint32(len(c.buf)-4) >= n {
				m, fds, err := c.parse(c.buf[4 : 4+n])
				rest := copy(c.buf, c.buf[4+n:])
				c.buf = c.buf[:rest]
				c.pos += int64(4 + n)
				return m, fds, err
			}
		}
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.chunk, c.oob)
		n, oobn = max(n, 0), max(oobn, 0) // -1 on some errors
		c.recvd += int64(n)
		if oobn > 0 {
			if perr := c.takeFDs(c.oob[:oobn]); perr != nil {
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

func (c *msgConn) takeFDs(oob []byte) error {
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
			c.fds = append(c.fds, queuedFD{fd: fd, end: c.recvd})
		}
	}
	if bad == nil && len(c.fds) > maxQueuedFDs {
		bad = fmt.Errorf("%w: %d descriptors received without a message claiming them", ErrProtocol, len(c.fds))
	}
	return bad
}

func (c *msgConn) parse(body []byte) (*message, []int, error) {
	m := new(message)
	if err := json.Unmarshal(body, m); err != nil {
		return nil, nil, fmt.Errorf("%w: undecodable message: %v", ErrProtocol, err)
	}
	switch {
	case m.Type == "":
		return nil, nil, fmt.Errorf("%w: message without a type", ErrProtocol)
	case m.FDs < 0 || m.FDs > 1:
		return nil, nil, fmt.Errorf("%w: %s message claims %d descriptors", ErrProtocol, m.Type, m.FDs)
	case len(c.fds) > 0 && c.fds[0].end <= c.pos:
		return nil, nil, fmt.Errorf("%w: a descriptor arrived that no message claimed", ErrProtocol)
	case m.FDs > len(c.fds):
		return nil, nil, fmt.Errorf("%w: %s message claims a descriptor that did not arrive", ErrProtocol, m.Type)
	case len(m.Service) > maxServiceLen:
		return nil, nil, fmt.Errorf("%w: service name of %d bytes", ErrProtocol, len(m.Service))
	case len(m.Snapshot) > MaxSnapshot:
		return nil, nil, fmt.Errorf("%w: snapshot of %d bytes, the limit is %d", ErrProtocol, len(m.Snapshot), MaxSnapshot)
	}
	if len(m.Error) > maxErrorLen {
		m.Error = m.Error[:maxErrorLen]
	}
	if m.Tuple != nil {
		t := m.Tuple.norm()
		m.Tuple = &t
	}
	var fds []int
	for _, q := range c.fds[:m.FDs] {
		fds = append(fds, q.fd)
	}
	c.fds = c.fds[m.FDs:]
	return m, fds, nil
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

// remoteError turns an error reply into an error wrapping the sentinel its
// code names.
func remoteError(m *message) error {
	var s error
	switch m.Code {
	case codeNoConn:
		s = ErrNoConn
	case codeTaken:
		s = ErrServiceTaken
	case codeNoSvc:
		s = ErrNoService
	case codeRefused:
		s = ErrPeerRefused
	default:
		return errors.New(m.Error)
	}
	// The text usually starts with the sentinel's own: do not repeat it.
	return fmt.Errorf("%w%s", s, strings.TrimPrefix(": "+m.Error, ": "+s.Error()))
}

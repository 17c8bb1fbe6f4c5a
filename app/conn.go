package app

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// aLongTimeAgo is a deadline in the past: it fails pending and future
// Reads and Writes at once without touching the socket's data.
var aLongTimeAgo = time.Unix(1, 0)

// conn is the net.Conn a Handler gets. It passes everything through to
// the TCP connection until the library stops it for an export: then
// pending and later Reads and Writes fail with an error wrapping
// ErrMigrating, and the handler can no longer move the deadlines.
//
// It deliberately hides the *net.TCPConn (no File, SyscallConn, ReadFrom):
// while a connection is exported nothing in the application may touch the
// socket, and the library can only guarantee that for I/O it mediates.
type conn struct {
	tc *net.TCPConn

	mu      sync.Mutex // orders stop against SetDeadline and retire
	stopped atomic.Bool
	closed  atomic.Bool
	retired bool // its handler has returned: the socket may serve a new one
}

func newConn(tc *net.TCPConn) *conn { return &conn{tc: tc} }

// stop makes every pending and future Read and Write fail with
// ErrMigrating.
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopped.Store(true)
	if !c.retired {
		c.tc.SetDeadline(aLongTimeAgo)
	}
}

// retire marks c's handler as returned: a stop that comes later (an
// export that raced the return) leaves the socket's deadlines alone, which
// belong to the connection's next handler by then.
func (c *conn) retire() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.retired = true
}

func (c *conn) migratingErr(op string) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.tc.LocalAddr(), Addr: c.tc.RemoteAddr(), Err: ErrMigrating}
}

// Read reads from the connection. Once the connection is being exported
// it returns an error wrapping ErrMigrating without consuming any more
// data from the socket (data it returned earlier is the handler's to keep
// in its snapshot).
func (c *conn) Read(p []byte) (int, error) {
	if c.stopped.Load() {
		return 0, c.migratingErr("read")
	}
	n, err := c.tc.Read(p)
	if err != nil && c.stopped.Load() {
		err = c.migratingErr("read")
	}
	return n, err
}

// Write writes to the connection. Interrupted by an export it returns the
// number of bytes written before the interruption (they are in the socket
// and move with it: count them in the snapshot) and an error wrapping
// ErrMigrating.
func (c *conn) Write(p []byte) (int, error) {
	if c.stopped.Load() {
		return 0, c.migratingErr("write")
	}
	n, err := c.tc.Write(p)
	if err != nil && c.stopped.Load() {
		err = c.migratingErr("write")
	}
	return n, err
}

// Close closes the connection: the handler is done with it and it will
// not be exported. Once its handler has returned it does nothing: the
// socket may be another's by then (a timer the handler left behind must
// not end a connection resumed or migrated away).
func (c *conn) Close() error {
	c.mu.Lock()
	retired := c.retired
	if !retired {
		// Under the lock: a handler returning meanwhile (retire) is
		// then seen closed, and its connection is not exported.
		c.closed.Store(true)
	}
	c.mu.Unlock()
	if retired {
		return nil
	}
	return c.tc.Close()
}

// LocalAddr returns the server's address of the connection.
func (c *conn) LocalAddr() net.Addr { return c.tc.LocalAddr() }

// RemoteAddr returns the client's address.
func (c *conn) RemoteAddr() net.Addr { return c.tc.RemoteAddr() }

// SetDeadline sets the read and write deadlines, unless the connection is
// being exported.
func (c *conn) SetDeadline(t time.Time) error {
	return c.setDeadline("set deadline", t, c.tc.SetDeadline)
}

// SetReadDeadline sets the read deadline, unless the connection is being
// exported.
func (c *conn) SetReadDeadline(t time.Time) error {
	return c.setDeadline("set read deadline", t, c.tc.SetReadDeadline)
}

// SetWriteDeadline sets the write deadline, unless the connection is
// being exported.
func (c *conn) SetWriteDeadline(t time.Time) error {
	return c.setDeadline("set write deadline", t, c.tc.SetWriteDeadline)
}

func (c *conn) setDeadline(op string, t time.Time, set func(time.Time) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped.Load() {
		return c.migratingErr(op)
	}
	return set(t)
}

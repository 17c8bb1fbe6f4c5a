package peer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client is an authenticated connection to one peer. It is safe for
// concurrent use: requests on one Client run concurrently (each has its
// own id), so a daemon keeps one Client per peer. Frames are written one
// at a time, so a large Transfer delays the requests sent after it.
//
// Once the connection fails, every call returns an error wrapping
// [ErrClosed]: close the Client and Dial again.
type Client struct {
	peer     string
	w        *wire
	peerMax  int
	localMax int
	done     chan struct{} // closed when the connection is lost or closed

	mu      sync.Mutex
	pending map[uint64]chan frame
	lastID  uint64
	err     error // why done was closed
}

// Dial connects to the pool member peerName at addr ("host:port") and
// authenticates both sides: the server must present a certificate of the
// pool CA (cfg.Roots) that names peerName, as a DNS name or, if peerName
// is an IP address, as an IP address; this side presents
// cfg.Certificate. ctx bounds the connection setup only (as does
// cfg.HandshakeTimeout), not the life of the Client.
func Dial(ctx context.Context, addr string, peerName string, cfg *Config) (*Client, error) {
	if peerName == "" {
		return nil, &OpError{Peer: addr, Op: "dial", Err: errors.New("no peer name to verify the server's certificate against")}
	}
	opErr := func(op string, err error) error { return &OpError{Peer: peerName, Op: op, Err: err} }
	if err := cfg.check(); err != nil {
		return nil, opErr("dial", err)
	}
	hctx, cancel := context.WithTimeout(ctx, cfg.handshakeTimeout())
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(hctx, "tcp", addr)
	if err != nil {
		return nil, opErr("dial", err)
	}
	conn := tls.Client(raw, cfg.clientTLS(peerName))
	if err := conn.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, opErr("TLS handshake", explainHandshake(peerName, err))
	}

	// In TLS 1.3 the server checks this side's certificate after the
	// client has finished its handshake: a refusal arrives as an alert
	// on the first read, which is the hello's answer.
	stop := context.AfterFunc(hctx, func() { raw.SetDeadline(aLongTimeAgo) })
	c := &Client{peer: peerName, w: newWire(conn), localMax: cfg.maxFrame(), done: make(chan struct{}),
		pending: map[uint64]chan frame{}}
	h, err := c.hello(hctx)
	if !stop() {
		err = errors.Join(err, hctx.Err())
	}
	if err != nil {
		raw.Close()
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op == "remote error" {
			// Say what is wrong with our certificate, if we can tell.
			if _, verr := verifyOwn(cfg.current()); verr != nil {
				return nil, opErr("TLS handshake", fmt.Errorf("%s refused this server's certificate: %w: this server's certificate is not valid for the pool: %v", peerName, err, verr))
			}
			return nil, opErr("TLS handshake", fmt.Errorf("%s refused this server's certificate: %w (is %s a member of the same pool, with the same CA? See its log)", peerName, err, peerName))
		}
		if hctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("no hello within %v: %w", cfg.handshakeTimeout(), err)
		}
		return nil, opErr("hello", err)
	}
	c.peerMax = int(h.maxFrame)
	go c.readLoop(conn)
	return c, nil
}

// explainHandshake adds what to check to a failed handshake's error.
func explainHandshake(peerName string, err error) error {
	var (
		host    x509.HostnameError
		unknown x509.UnknownAuthorityError
		invalid x509.CertificateInvalidError
		oe      *net.OpError
	)
	switch {
	case errors.As(err, &host):
		return fmt.Errorf("the server at this address is not %s: %w (check the address configured for %s)", peerName, err, peerName)
	case errors.As(err, &unknown):
		return fmt.Errorf("%s's certificate is not issued by the pool CA: %w (is it a member of this pool?)", peerName, err)
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return fmt.Errorf("%s's certificate is expired or not yet valid: %w (issue it a new one: mtcpctl certs issue; check both clocks)", peerName, err)
	case errors.As(err, &invalid):
		return fmt.Errorf("%s's certificate is not valid for the pool: %w", peerName, err)
	case errors.As(err, &oe) && oe.Op == "remote error":
		return fmt.Errorf("%s refused the connection: %w (does it speak TLS 1.3 and mtcp's peer protocol? See its log)", peerName, err)
	}
	return err
}

func (c *Client) hello(ctx context.Context) (*hello, error) {
	if err := c.w.sendBody(ctx, msgHello, 0, &hello{version: protoVersion, maxFrame: uint32(c.localMax)}, helloMax); err != nil {
		return nil, err
	}
	f, err := readFrame(c.w.conn, helloMax)
	if err != nil {
		return nil, err
	}
	var h hello
	switch {
	case f.typ == msgError && f.id == 0:
		var e errorBody
		if err := decodeBody(f.payload, &e); err != nil {
			return nil, fmt.Errorf("%w: error frame: %v", ErrProtocol, err)
		}
		return nil, fmt.Errorf("%s refused the connection: %s", c.peer, e.msg)
	case f.typ != msgHello || f.id != 0:
		return nil, fmt.Errorf("%w: expected a hello, got %v id %d", ErrProtocol, f.typ, f.id)
	}
	if err := decodeBody(f.payload, &h); err != nil {
		return nil, fmt.Errorf("%w: hello: %v", ErrProtocol, err)
	}
	if h.version != protoVersion {
		return nil, fmt.Errorf("%s answered with protocol version %d; this side speaks %d: run the same mtcp release on every member", c.peer, h.version, protoVersion)
	}
	if h.maxFrame < helloMax {
		return nil, fmt.Errorf("%w: %s accepts frames of only %d bytes", ErrProtocol, c.peer, h.maxFrame)
	}
	return &h, nil
}

// Peer returns the name of the peer, as verified in its certificate.
func (c *Client) Peer() string { return c.peer }

// MaxFrame returns the largest frame payload the peer accepts. A
// [TransferRequest] whose WireSize exceeds it is refused without being
// sent.
func (c *Client) MaxFrame() int { return c.peerMax }

// Close closes the connection. Calls in progress return errors wrapping
// [ErrClosed]; the peer cancels the contexts of its handlers.
func (c *Client) Close() error {
	c.fail(errors.New("closed by this side"))
	return nil
}

// Err returns why the connection ended (wrapping [ErrClosed]), or nil
// while it is open. A connection the peer closed (it restarted, say)
// ends as soon as this side reads the end, not at the next call.
func (c *Client) Err() error { return c.closedErr() }

// fail ends the connection with cause, once.
func (c *Client) fail(cause error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = fmt.Errorf("%w: %w", ErrClosed, cause)
	close(c.done)
	c.w.close()
}

func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// readLoop hands replies to their callers until the connection ends.
func (c *Client) readLoop(conn net.Conn) {
	for {
		f, err := readFrame(conn, c.localMax)
		if err != nil {
			c.fail(err)
			return
		}
		if f.id == 0 {
			if f.typ == msgError {
				var e errorBody
				if decodeBody(f.payload, &e) == nil {
					c.fail(fmt.Errorf("%s closed the connection: %s", c.peer, e.msg))
					return
				}
			}
			c.fail(fmt.Errorf("%w: unexpected %v frame with id 0", ErrProtocol, f.typ))
			return
		}
		c.mu.Lock()
		ch := c.pending[f.id]
		delete(c.pending, f.id)
		c.mu.Unlock()
		if ch != nil {
			ch <- f // buffered
		}
		// else: a reply to a request the caller gave up on.
	}
}

// Pending returns how many requests wait for their answers.
func (c *Client) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// call sends request req of type t and decodes the reply into rep.
func (c *Client) call(ctx context.Context, t msgType, req, rep body) error {
	op := t.String()
	opErr := func(err error) error { return &OpError{Peer: c.peer, Op: op, Err: err} }
	if err := ctx.Err(); err != nil {
		return opErr(err)
	}
	deadline, hasDeadline := ctx.Deadline()

	ch := make(chan frame, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return opErr(c.err)
	}
	c.lastID++
	id := c.lastID
	c.pending[id] = ch
	c.mu.Unlock()

	e := newEncoder(t, id)
	e.u64(0) // timeout, set just before the frame is written
	req.encode(e)
	segs, n, err := e.finish()
	if err == nil && n > c.peerMax {
		err = fmt.Errorf("%w: request of %d bytes exceeds the %d bytes %s accepts in one frame (MaxFrame): split it", ErrFrameTooLarge, n, c.peerMax, c.peer)
	}
	if err != nil {
		c.forget(id)
		return opErr(err)
	}
	err = c.w.send(ctx, segs, func() {
		if hasDeadline {
			// Send the time left, not the deadline: the two
			// hosts' clocks may differ.
			binary.BigEndian.PutUint64(segs[0][timeoutOff:], uint64(max(time.Until(deadline), 1)))
		}
	})
	if err != nil {
		c.forget(id)
		if ctx.Err() != nil {
			return opErr(c.gaveUp(ctx, "not sent", err))
		}
		if cerr := c.closedErr(); cerr != nil {
			return opErr(cerr)
		}
		c.fail(err)
		return opErr(fmt.Errorf("%w: %w", ErrClosed, err))
	}

	var f frame
	select {
	case f = <-ch:
	case <-ctx.Done():
		c.forget(id)
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			// The peer's handler has the same deadline and ends on
			// its own; a cancellation it must be told about.
			c.cancel(id)
		}
		return opErr(c.gaveUp(ctx, "no answer", ctx.Err()))
	case <-c.done:
		select {
		case f = <-ch:
		default:
			c.forget(id)
			return opErr(c.closedErr())
		}
	}
	switch f.typ {
	case t | replyBit:
		if err := decodeBody(f.payload, rep); err != nil {
			err = fmt.Errorf("%w: %v reply: %v", ErrProtocol, t, err)
			c.fail(err)
			return opErr(err)
		}
		return nil
	case msgError:
		var eb errorBody
		if err := decodeBody(f.payload, &eb); err != nil {
			err = fmt.Errorf("%w: error reply: %v", ErrProtocol, err)
			c.fail(err)
			return opErr(err)
		}
		return &RemoteError{Peer: c.peer, Op: op, Msg: eb.msg}
	}
	err = fmt.Errorf("%w: %v reply to a %v request", ErrProtocol, f.typ, t)
	c.fail(err)
	return opErr(err)
}

// gaveUp describes a request abandoned because ctx ended; err wraps
// ctx.Err().
func (c *Client) gaveUp(ctx context.Context, what string, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%s before the deadline: %w", what, err)
	}
	return fmt.Errorf("%s before the caller gave up: %w", what, err)
}

// cancel tells the server that the caller gave up on request id, so that
// its handler's context is cancelled. Best effort, in the background:
// the caller does not wait for a busy connection.
func (c *Client) cancel(id uint64) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c.w.sendBody(ctx, msgCancel, id, &empty{}, c.peerMax)
	}()
}

// Prepare asks the peer whether it can take the connections described by
// r. ctx's deadline is the phase's deadline, for both sides.
func (c *Client) Prepare(ctx context.Context, r *PrepareRequest) (*PrepareReply, error) {
	rep := new(PrepareReply)
	if err := c.call(ctx, msgPrepare, nonNil(r), rep); err != nil {
		return nil, err
	}
	return rep, nil
}

// Transfer sends captured connections to the peer, which restores them in
// repair mode. Check every item's result. A request larger than
// [Client.MaxFrame] is refused with an error wrapping [ErrFrameTooLarge].
// The items' byte slices are written from the caller's memory: do not
// change them before Transfer returns.
func (c *Client) Transfer(ctx context.Context, r *TransferRequest) (*TransferReply, error) {
	rep := new(TransferReply)
	if err := c.call(ctx, msgTransfer, nonNil(r), rep); err != nil {
		return nil, err
	}
	return rep, nil
}

// Commit tells the peer that the transaction's flows are switched to it.
func (c *Client) Commit(ctx context.Context, r *CommitRequest) (*CommitReply, error) {
	rep := new(CommitReply)
	if err := c.call(ctx, msgCommit, nonNil(r), rep); err != nil {
		return nil, err
	}
	return rep, nil
}

// Abort tells the peer to discard what it restored for a transaction.
func (c *Client) Abort(ctx context.Context, r *AbortRequest) error {
	return c.call(ctx, msgAbort, nonNil(r), &empty{})
}

// Status asks the peer for its status (heartbeats, mtcpctl status).
func (c *Client) Status(ctx context.Context) (*StatusReply, error) {
	rep := new(StatusReply)
	if err := c.call(ctx, msgStatus, &StatusRequest{}, rep); err != nil {
		return nil, err
	}
	return rep, nil
}

// Steer asks the peer, the steering point of r.Flows, to hold or switch
// them in one batch. The peer's Handler must implement [Steerer].
func (c *Client) Steer(ctx context.Context, r *SteerRequest) error {
	return c.call(ctx, msgSteer, nonNil(r), &empty{})
}

// nonNil turns a nil request into an empty one.
func nonNil[T any](r *T) *T {
	if r == nil {
		return new(T)
	}
	return r
}

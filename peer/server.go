package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
)

// Handler serves the requests of authenticated peers. from is the
// requesting peer's name, taken from its verified certificate. Each
// context carries the caller's deadline for the phase and is cancelled
// when the caller gives up or the connection closes. Requests run
// concurrently, also on one connection.
//
// Requests own their arguments: byte slices (Item.State, Item.App) stay
// valid after the call returns. An error is sent back as a [RemoteError]
// with the error's text.
type Handler interface {
	Prepare(ctx context.Context, from string, r *PrepareRequest) (*PrepareReply, error)
	Transfer(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error)
	Commit(ctx context.Context, from string, r *CommitRequest) (*CommitReply, error)
	Abort(ctx context.Context, from string, r *AbortRequest) error
	Status(ctx context.Context, from string) (*StatusReply, error)
}

// Steerer is implemented by a [Handler] whose server can hold and switch
// flows for other members (it owns service addresses or is the gateway).
// Steer requests to a Handler without it fail with a [RemoteError].
type Steerer interface {
	Steer(ctx context.Context, from string, r *SteerRequest) error
}

// Server accepts connections from pool members and serves their requests.
type Server struct {
	cfg *Config
	h   Handler
	mem *semaphore.Weighted // Config.FrameMemory

	mu    sync.Mutex
	conns map[string]int // authenticated connections by member
}

// NewServer returns a server of h with identity and trust cfg. cfg must
// not change afterwards.
func NewServer(cfg *Config, h Handler) *Server {
	return &Server{cfg: cfg, h: h, mem: semaphore.NewWeighted(cfg.frameMemory()), conns: map[string]int{}}
}

// maxConnsPerMember bounds the connections one member keeps open to a
// server at once. A member's daemon keeps one, plus one per process
// migration under way.
const maxConnsPerMember = 64

// admit counts a connection of member from, or refuses it when that
// member has too many; leave, once, ends it.
func (s *Server) admit(from string) (leave func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns[from] >= maxConnsPerMember {
		return nil, fmt.Errorf("%s already has %d connections open to %s, the most a member may", from, maxConnsPerMember, s.cfg.name())
	}
	s.conns[from]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.conns[from]--; s.conns[from] == 0 {
				delete(s.conns, from)
			}
		})
	}, nil
}

// charge takes n bytes of the server's frame memory for a frame being
// read, waiting until they are free or ctx is done.
func (s *Server) charge(ctx context.Context, n int) (release func(), err error) {
	if err := s.mem.Acquire(ctx, int64(n)); err != nil {
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(func() { s.mem.Release(int64(n)) }) }, nil
}

// Serve accepts connections on ln until ctx is done or ln fails. Every
// connection must complete a mutual TLS 1.3 handshake with a certificate
// of the pool CA before anything it sends is read. On return, Serve has
// closed ln and every connection, cancelled the contexts of running
// handlers and waited for them. It returns nil when ctx ended it.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if err := s.cfg.check(); err != nil {
		ln.Close()
		return fmt.Errorf("peer server: %w", err)
	}
	if s.h == nil {
		ln.Close()
		return errors.New("peer server: no handler")
	}
	tlsCfg := s.cfg.serverTLS()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		ln.Close()
		wg.Wait()
	}()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var backoff time.Duration
	gate := newHandshakeGate(s.cfg.log())
	for {
		raw, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if retryAccept(err) {
				// Out of file descriptors or memory: wait rather
				// than give up serving the pool.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.cfg.log().Warn("peer server: accept", "err", err, "retry_in", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			return fmt.Errorf("peer server: accept: %w", err)
		}
		backoff = 0
		release, ok := gate.enter(raw.RemoteAddr())
		if !ok {
			raw.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, raw, tlsCfg, release)
		}()
	}
}

// Connections not authenticated yet are bounded, in all and per source
// address (IPv6: per /64, see gateKey): each holds a descriptor for up to
// the handshake timeout, and anyone who can reach the port can open
// them. Beyond the bounds a new connection is closed at once; the
// members' own connections, already authenticated, do not count.
const (
	maxHandshakes        = 256
	maxHandshakesPerAddr = 16
)

// handshakeGate counts the connections in their handshake.
type handshakeGate struct {
	log *slog.Logger

	mu      sync.Mutex
	total   int
	by      map[netip.Addr]int
	refused int       // since the last warning
	warned  time.Time // the last warning
}

func newHandshakeGate(log *slog.Logger) *handshakeGate {
	return &handshakeGate{log: log, by: map[netip.Addr]int{}}
}

// enter admits a connection from addr into its handshake, or refuses it;
// release, once, ends its handshake.
func (g *handshakeGate) enter(addr net.Addr) (release func(), ok bool) {
	ip := gateKey(addr)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.total >= maxHandshakes || g.by[ip] >= maxHandshakesPerAddr {
		g.refused++
		if time.Since(g.warned) >= time.Second {
			g.log.Warn("peer server: refused connections: too many handshakes under way", "refused", g.refused, "from", ip.String(), "under_way", g.total)
			g.refused, g.warned = 0, time.Now()
		}
		return nil, false
	}
	g.total++
	g.by[ip]++
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.total--
			if g.by[ip]--; g.by[ip] == 0 {
				delete(g.by, ip)
			}
		})
	}, true
}

// gateKey is what the handshake bound per source counts by: the IPv4
// address, or the IPv6 /64 (a host is commonly given a whole /64, and
// would otherwise have as many slots as it cares to use addresses).
func gateKey(addr net.Addr) netip.Addr {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return netip.Addr{}
	}
	ip := ta.AddrPort().Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.WithZone("").Prefix(64)
		ip = p.Addr()
	}
	return ip
}

func retryAccept(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// serverConn is one authenticated connection.
type serverConn struct {
	s        *Server
	w        *wire
	from     string
	log      *slog.Logger
	peerMax  int
	localMax int

	mu       sync.Mutex
	inflight map[uint64]context.CancelFunc
}

func (s *Server) serveConn(ctx context.Context, raw net.Conn, tlsCfg *tls.Config, release func()) {
	defer release()
	log := s.cfg.log().With("remote", raw.RemoteAddr().String())
	conn := tls.Server(raw, tlsCfg)
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	timeout := s.cfg.handshakeTimeout()
	hctx, cancel := context.WithTimeout(ctx, timeout)
	err := conn.HandshakeContext(hctx)
	cancel()
	release()
	if err != nil {
		if ctx.Err() == nil {
			log.Warn("peer server: refused connection: TLS handshake failed", "err", err)
		}
		return
	}
	from := identity(conn.ConnectionState().PeerCertificates[0])
	log = log.With("peer", from)

	// The hello: protocol version and frame limits.
	raw.SetDeadline(time.Now().Add(timeout))
	w := newWire(conn)
	localMax := s.cfg.maxFrame()
	leave, err := s.admit(from)
	if err == nil {
		defer leave()
	}
	var f frame
	if err == nil {
		f, err = readFrame(conn, helloMax)
	}
	var h hello
	if err == nil {
		switch {
		case f.typ != msgHello || f.id != 0:
			err = fmt.Errorf("%w: expected a hello frame, got %v id %d", ErrProtocol, f.typ, f.id)
		default:
			if derr := decodeBody(f.payload, &h); derr != nil {
				err = fmt.Errorf("%w: hello: %v", ErrProtocol, derr)
			} else if h.version < protoVersion {
				err = fmt.Errorf("%w: client speaks protocol version %d, this server only %d: run the same mtcp release on every member", ErrProtocol, h.version, protoVersion)
			} else if h.maxFrame < helloMax {
				err = fmt.Errorf("%w: client accepts frames of only %d bytes", ErrProtocol, h.maxFrame)
			}
		}
	}
	if err != nil {
		if !isClosedErr(err) {
			log.Warn("peer server: closing connection", "err", err)
			w.sendBody(context.Background(), msgError, 0, &errorBody{err.Error()}, helloMax)
		}
		return
	}
	if err := w.sendBody(ctx, msgHello, 0, &hello{version: protoVersion, maxFrame: uint32(localMax)}, helloMax); err != nil {
		return
	}
	raw.SetDeadline(time.Time{})
	log.Debug("peer server: connection ready")

	sc := &serverConn{s: s, w: w, from: from, log: log, peerMax: int(h.maxFrame), localMax: localMax,
		inflight: map[uint64]context.CancelFunc{}}
	sc.serve(ctx, conn)
}

// serve reads requests until the connection ends, running each in its own
// goroutine.
func (sc *serverConn) serve(ctx context.Context, conn net.Conn) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		sc.w.close()
		wg.Wait()
	}()
	slots := make(chan struct{}, maxInflight)
	charge := func(n int) (func(), error) { return sc.s.charge(ctx, n) }
	for {
		f, err := readFrameCharged(conn, sc.localMax, charge)
		if err != nil {
			if ctx.Err() == nil && !isClosedErr(err) {
				sc.protocolError(err)
			}
			return
		}
		if f.typ == msgCancel || f.typ == msgProcPages {
			f.done() // small frames: no charge to give back
		}
		if f.typ == msgCancel {
			if len(f.payload) != 0 {
				sc.protocolError(fmt.Errorf("%w: cancel frame with a payload", ErrProtocol))
				return
			}
			sc.mu.Lock()
			if c := sc.inflight[f.id]; c != nil {
				c()
			}
			sc.mu.Unlock()
			continue
		}
		if f.typ == msgProcPages {
			// The connection becomes a raw pages stream; it ends with
			// the handler.
			if err := sc.servePages(ctx, f, conn); err != nil && ctx.Err() == nil {
				sc.log.Warn("peer server: pages stream", "err", err)
			}
			return
		}
		timeout, req, err := decodeRequest(f)
		if err == nil && f.id == 0 {
			err = fmt.Errorf("%w: %v request with id 0", ErrProtocol, f.typ)
		}
		if err != nil {
			f.done()
			sc.protocolError(err)
			return
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			f.done()
			return
		}
		// Every request ends: the caller's deadline, or the server's
		// own bound on requests if that comes first (or the caller has
		// none).
		if limit := sc.s.cfg.maxRequestTime(); timeout <= 0 || timeout > limit {
			timeout = limit
		}
		rctx, rcancel := context.WithDeadline(ctx, f.at.Add(timeout))
		sc.mu.Lock()
		_, dup := sc.inflight[f.id]
		if !dup {
			sc.inflight[f.id] = rcancel
		}
		sc.mu.Unlock()
		if dup {
			rcancel()
			f.done()
			sc.protocolError(fmt.Errorf("%w: request id %d reused while in flight", ErrProtocol, f.id))
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			defer f.done()
			sc.handle(rctx, f.typ, f.id, req)
			sc.mu.Lock()
			delete(sc.inflight, f.id)
			sc.mu.Unlock()
			rcancel()
		}()
	}
}

// protocolError tells the peer why its connection is being closed (best
// effort) and logs it.
func (sc *serverConn) protocolError(err error) {
	sc.log.Warn("peer server: closing connection", "err", err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	sc.w.sendBody(ctx, msgError, 0, &errorBody{err.Error()}, sc.peerMax)
}

// handle runs one request and sends its reply, unless the caller has
// given up on it.
func (sc *serverConn) handle(ctx context.Context, t msgType, id uint64, req body) {
	rep, err := sc.call(ctx, t, req)
	if ctx.Err() != nil {
		return // the caller no longer waits for an answer
	}
	if err != nil {
		rep, t = &errorBody{err.Error()}, msgError
	} else {
		t |= replyBit
	}
	if err := sc.w.sendBody(ctx, t, id, rep, sc.peerMax); err != nil {
		if errors.Is(err, ErrFrameTooLarge) {
			sc.w.sendBody(ctx, msgError, id, &errorBody{err.Error()}, sc.peerMax)
			return
		}
		if ctx.Err() == nil && !isClosedErr(err) {
			sc.log.Warn("peer server: sending reply", "op", t&^replyBit, "err", err)
		}
	}
}

// call runs the handler for one request, turning a panic into an error:
// a bad request must not take the daemon, and every connection it
// serves, down.
func (sc *serverConn) call(ctx context.Context, t msgType, req body) (rep body, err error) {
	defer func() {
		if p := recover(); p != nil {
			sc.log.Error("peer server: handler panicked", "op", t, "panic", p, "stack", string(debug.Stack()))
			rep, err = nil, fmt.Errorf("internal error in %s's %v handler (see its log)", sc.s.cfg.name(), t)
		}
	}()
	h, from := sc.s.h, sc.from
	if rep, ok, err := sc.callProcess(ctx, req); ok {
		return rep, err
	}
	switch r := req.(type) {
	case *PrepareRequest:
		rep, err := h.Prepare(ctx, from, r)
		return orZero(rep, err)
	case *TransferRequest:
		rep, err := h.Transfer(ctx, from, r)
		return orZero(rep, err)
	case *CommitRequest:
		rep, err := h.Commit(ctx, from, r)
		return orZero(rep, err)
	case *AbortRequest:
		return &empty{}, h.Abort(ctx, from, r)
	case *StatusRequest:
		rep, err := h.Status(ctx, from)
		return orZero(rep, err)
	case *SteerRequest:
		st, ok := h.(Steerer)
		if !ok {
			return nil, fmt.Errorf("%s does not steer flows for other members", sc.s.cfg.name())
		}
		return &empty{}, st.Steer(ctx, from, r)
	}
	return nil, fmt.Errorf("unhandled %v", t)
}

// orZero returns rep as a body, a zero reply if the handler returned a nil
// one.
func orZero[T any, P interface {
	*T
	body
}](rep P, err error) (body, error) {
	if err != nil {
		return nil, err
	}
	if rep == nil {
		rep = new(T)
	}
	return rep, nil
}

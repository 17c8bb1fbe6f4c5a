package app

import (
	"context"
	"errors"
	"fmt"
	"github.com/mtcp-dev/mtcp/repair"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"time"
)

// DefaultDaemonSocket is where mtcpd listens for applications unless its
// configuration says otherwise.
const DefaultDaemonSocket = "/run/mtcp/app.sock"

// Handler serves one connection.
//
// Serve returns when the connection is done (next == nil, err says why,
// nil for an orderly end) or when ctx is cancelled because the connection
// is being migrated. Then it returns its per-connection state as next,
// including any bytes it already read from conn but did not process (what
// a bufio.Reader buffers, a partial request), and any bytes it meant to
// write but Write did not take.
//
// snapshot is nil for a fresh connection, or what an earlier Serve of the
// same connection (on this server or another) returned: the handler
// carries on from there.
//
// When a migration starts, context.Cause(ctx) is ErrMigrating and pending
// and later Reads and Writes on conn fail with an error wrapping
// ErrMigrating (a Write reports how many bytes it wrote before that: they
// are sent, count them). The library exports the connection if Serve then
// returns a non-nil next, or an error wrapping ErrMigrating or
// context.Canceled; a handler without state returns []byte{} or the error
// it got. Any other return (nil, nil or an unrelated error) ends the
// connection, and the migration fails.
//
// Serve must not use conn after it returns, nor keep goroutines that do:
// an exported connection belongs to the daemon until its verdict, and
// then to another server or to a new call of Serve.
type Handler interface {
	Serve(ctx context.Context, conn net.Conn, snapshot []byte) (next []byte, err error)
}

// HandlerFunc adapts a function to the Handler interface.
type HandlerFunc func(ctx context.Context, conn net.Conn, snapshot []byte) ([]byte, error)

// Serve calls f(ctx, conn, snapshot).
func (f HandlerFunc) Serve(ctx context.Context, conn net.Conn, snapshot []byte) ([]byte, error) {
	return f(ctx, conn, snapshot)
}

// Config configures Serve. Service and Handler are required.
type Config struct {
	// Service is the TCP address to listen on, such as ":7000" or
	// "10.77.2.11:7000". It is also the name the service is registered
	// under with mtcpd, which allows one application per service.
	Service string

	// Daemon is the path of mtcpd's application socket. Empty means
	// DefaultDaemonSocket.
	Daemon string

	// Handler serves each connection, fresh or migrated in.
	Handler Handler

	// Logger receives the library's log records. Nil discards them.
	Logger *slog.Logger

	// UnsentLimit caps the bytes an accepted connection keeps queued but
	// not yet sent (TCP_NOTSENT_LOWAT): writes wait until the backlog is
	// below it. Everything queued moves with the connection, so a small
	// backlog keeps migrations short; the kernel's default lets a bulk
	// sender queue megabytes. 0 means DefaultUnsentLimit; a negative value
	// leaves the kernel's default. Migrated connections keep their setting.
	UnsentLimit int
}

// DefaultUnsentLimit is Config.UnsentLimit's default: enough to keep a
// fast link busy, small enough to move in well under a millisecond.
const DefaultUnsentLimit = 128 << 10

// Serve listens on cfg.Service (plain TCP, never Multipath TCP, which
// TCP_REPAIR cannot migrate), registers the service with mtcpd at
// cfg.Daemon, and serves every connection with cfg.Handler: those it
// accepts and those mtcpd migrates in from other servers. It gives a
// connection away when mtcpd asks for it (see Handler) and keeps serving
// it if that migration is aborted.
//
// Serve returns nil once ctx is cancelled, after closing the listener and
// the connections and waiting for the handlers to return. It returns an
// error at once if it cannot listen, reach mtcpd or register the service
// (wrapping ErrServiceTaken if another process has it). If the connection
// to mtcpd breaks later, Serve keeps serving and reconnects in the
// background.
func Serve(ctx context.Context, cfg Config) error {
	if cfg.Handler == nil {
		return errors.New("mtcp app: Config.Handler is nil: set it to the handler that serves connections")
	}
	if cfg.Service == "" {
		return errors.New("mtcp app: Config.Service is empty: set it to the address to listen on, such as \":7000\"")
	}
	if len(cfg.Service) > maxServiceLen {
		return fmt.Errorf("mtcp app: Config.Service is %d bytes long, the limit is %d", len(cfg.Service), maxServiceLen)
	}
	if cfg.Daemon == "" {
		cfg.Daemon = DefaultDaemonSocket
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Go listens with Multipath TCP by default where the kernel has it.
	// An MPTCP socket stays an MPTCP socket even when its client falls
	// back to plain TCP, and TCP_REPAIR cannot freeze or restore it, so a
	// migratory service must use plain TCP.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(ctx, "tcp", cfg.Service)
	if err != nil {
		return fmt.Errorf("mtcp app: listen on %s: %w", cfg.Service, err)
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	s := &server{
		cfg:     cfg,
		log:     log.With("service", cfg.Service),
		ctx:     sctx,
		conns:   map[Tuple]*served{},
		exports: map[uint64]*served{},
	}
	if err := s.connect(sctx); err != nil {
		ln.Close()
		return fmt.Errorf("mtcp app: %w", err)
	}
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		s.keepLink(sctx)
	}()
	s.log.Info("serving", "listen", ln.Addr().String(), "daemon", cfg.Daemon)

	go func() {
		<-sctx.Done()
		ln.Close()
	}()
	err = s.accept(ln)
	stop()
	s.shutdown()
	return err
}

// server is one running Serve.
type server struct {
	cfg Config
	log *slog.Logger
	ctx context.Context // cancelled at shutdown

	wg sync.WaitGroup // connection goroutines
	bg sync.WaitGroup // daemon link goroutines

	mu      sync.Mutex
	link    *link // nil while disconnected from mtcpd
	conns   map[Tuple]*served
	exports map[uint64]*served // by export id
	closing bool
}

// link is one connection to mtcpd.
type link struct {
	mc   *msgConn
	done chan struct{} // closed once the connection is lost
}

func (l *link) send(m *message, fd int) error {
	err := l.mc.write(m, fd)
	if err != nil {
		l.mc.close() // a half-written frame leaves the stream unusable
	}
	return err
}

// served is one connection this server serves. Fields after tc are
// guarded by server.mu.
type served struct {
	tuple Tuple
	tc    *net.TCPConn

	cancel context.CancelCauseFunc // of the running handler
	w      *conn                   // of the running handler
	export *exportReq              // non-nil while being exported
}

// exportReq is mtcpd's request to export a connection.
type exportReq struct {
	id      uint64
	link    *link
	verdict chan string // buffered; receives exactly one verdict
	decided bool        // a verdict was delivered (guarded by server.mu)
}

// connect dials mtcpd, registers the service, reports the connections
// served here and makes the new link current.
func (s *server) connect(ctx context.Context) error {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", s.cfg.Daemon)
	if err != nil {
		return fmt.Errorf("connect to mtcpd's application socket %s (is mtcpd running, and does this process run as root?): %w", s.cfg.Daemon, err)
	}
	uc := nc.(*net.UnixConn)
	// The daemon gets this process's connections: make sure it is root
	// (or ourselves), not whoever managed to create a socket there.
	if _, uid, err := peerCred(uc); err == nil && uid != 0 && int(uid) != os.Geteuid() {
		uc.Close()
		return fmt.Errorf("refusing the daemon at %s: it runs as uid %d, not root: %w", s.cfg.Daemon, uid, ErrPeerRefused)
	}
	mc := newMsgConn(uc)
	fail := func(err error) error {
		mc.close()
		mc.dropFDs()
		return err
	}
	// If the daemon refused this process, it may have said why and closed
	// before the registration is written: read its answer even then.
	werr := mc.write(&message{Type: msgRegister, Version: protocolVersion, Service: s.cfg.Service, PID: os.Getpid()}, -1)
	uc.SetReadDeadline(time.Now().Add(writeTimeout))
	m, fds, err := mc.read()
	closeFDs(fds)
	uc.SetReadDeadline(time.Time{})
	switch {
	case err != nil:
		return fail(fmt.Errorf("register service %s with mtcpd: no answer: %w", s.cfg.Service, errors.Join(werr, err)))
	case m.Type == msgError:
		return fail(fmt.Errorf("mtcpd refused to register service %s: %w", s.cfg.Service, remoteError(m)))
	case m.Type != msgRegistered:
		return fail(fmt.Errorf("register service %s with mtcpd: %w: answer %q", s.cfg.Service, ErrProtocol, m.Type))
	case werr != nil:
		return fail(fmt.Errorf("register service %s with mtcpd: %w", s.cfg.Service, werr))
	}
	l := &link{mc: mc, done: make(chan struct{})}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return fail(errors.New("shutting down"))
	}
	for t := range s.conns {
		if err := l.send(&message{Type: msgOpened, Service: s.cfg.Service, Tuple: &t}, -1); err != nil {
			break // the reader below notices and we reconnect
		}
	}
	s.link = l
	s.mu.Unlock()
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		s.readLink(l)
	}()
	s.log.Info("registered with mtcpd", "daemon", s.cfg.Daemon)
	return nil
}

// keepLink reconnects to mtcpd whenever the connection is lost, until
// ctx is cancelled.
func (s *server) keepLink(ctx context.Context) {
	for {
		s.mu.Lock()
		l := s.link
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-l.done:
		}
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		if s.link == l {
			s.link = nil
		}
		s.mu.Unlock()
		s.log.Warn("lost the connection to mtcpd; serving on and reconnecting")
		for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
			err := s.connect(ctx)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("reconnect to mtcpd failed", "err", err, "retry_in", wait)
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// readLink handles mtcpd's requests until the link breaks.
func (s *server) readLink(l *link) {
	defer close(l.done)
	defer l.mc.close()
	defer l.mc.dropFDs()
	for {
		m, fds, err := l.mc.read()
		if err != nil {
			if s.ctx.Err() == nil {
				s.log.Warn("connection to mtcpd failed", "err", err)
			}
			return
		}
		if len(fds) > 0 && m.Type != msgImport {
			closeFDs(fds)
			s.log.Error("mtcpd sent a descriptor with a message that takes none; disconnecting", "type", m.Type)
			return
		}
		switch m.Type {
		case msgExport:
			s.onExport(l, m)
		case msgVerdict:
			if err := s.onVerdict(l, m); err != nil {
				s.log.Error("bad verdict from mtcpd; disconnecting", "err", err)
				return
			}
		case msgImport:
			s.onImport(l, m, fds)
		default:
			s.log.Error("unexpected message from mtcpd; disconnecting", "type", m.Type)
			return
		}
	}
}

// onExport starts exporting a connection: its handler is told to stop;
// run does the rest once the handler returns.
func (s *server) onExport(l *link, m *message) {
	fail := func(code, text string) {
		l.send(&message{Type: msgExported, ID: m.ID, Error: text, Code: code}, -1)
	}
	switch {
	case m.Tuple == nil || !m.Tuple.valid():
		fail(codeGeneric, "export request without a valid tuple")
		return
	case m.Service != s.cfg.Service:
		fail(codeNoSvc, fmt.Sprintf("process %d serves %s, not %s", os.Getpid(), s.cfg.Service, m.Service))
		return
	}
	s.mu.Lock()
	c := s.conns[*m.Tuple]
	switch {
	case c == nil:
		s.mu.Unlock()
		fail(codeNoConn, fmt.Sprintf("service %s (pid %d) has no connection %s; it may have closed or moved", s.cfg.Service, os.Getpid(), m.Tuple))
		return
	case c.export != nil:
		s.mu.Unlock()
		fail(codeGeneric, fmt.Sprintf("connection %s is already being exported (request %d)", m.Tuple, c.export.id))
		return
	case s.exports[m.ID] != nil:
		s.mu.Unlock()
		fail(codeGeneric, fmt.Sprintf("export id %d is already in use", m.ID))
		return
	}
	c.export = &exportReq{id: m.ID, link: l, verdict: make(chan string, 1)}
	s.exports[m.ID] = c
	cancel, w := c.cancel, c.w
	s.mu.Unlock()
	s.log.Debug("exporting", "conn", c.tuple, "id", m.ID)
	if cancel != nil {
		cancel(ErrMigrating)
	}
	if w != nil {
		w.stop()
	}
}

// onVerdict passes mtcpd's verdict to the exported connection.
func (s *server) onVerdict(l *link, m *message) error {
	if m.Verdict != verdictGone && m.Verdict != verdictResume {
		return fmt.Errorf("%w: verdict %q", ErrProtocol, m.Verdict)
	}
	s.mu.Lock()
	c := s.exports[m.ID]
	var ex *exportReq
	if c != nil && c.export != nil && c.export.link == l && !c.export.decided {
		ex = c.export
		ex.decided = true
	}
	s.mu.Unlock()
	if ex == nil {
		l.send(&message{Type: msgFinished, ID: m.ID, Error: fmt.Sprintf("no export %d is waiting for a verdict in pid %d", m.ID, os.Getpid())}, -1)
		return nil
	}
	ex.verdict <- m.Verdict
	return nil
}

// onImport adopts a connection migrated in.
func (s *server) onImport(l *link, m *message, fds []int) {
	fail := func(err error) {
		closeFDs(fds)
		s.log.Warn("import failed", "err", err)
		l.send(&message{Type: msgImported, ID: m.ID, Error: err.Error()}, -1)
	}
	if len(fds) != 1 {
		fail(fmt.Errorf("import request carries %d descriptors, want 1", len(fds)))
		return
	}
	if m.Service != s.cfg.Service {
		fail(fmt.Errorf("process %d serves %s, not %s", os.Getpid(), s.cfg.Service, m.Service))
		return
	}
	f := os.NewFile(uintptr(fds[0]), "mtcp-import")
	nc, err := net.FileConn(f) // a dup: f is ours to close
	f.Close()
	if err != nil {
		fail(fmt.Errorf("adopt imported socket: %w", err))
		return
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		nc.Close()
		fail(fmt.Errorf("imported socket is a %T, not a TCP connection", nc))
		return
	}
	if err := s.adopt(tc, m.Snapshot); err != nil {
		tc.Close()
		fail(err)
		return
	}
	s.log.Debug("connection migrated in", "conn", tupleOf(tc), "snapshot_bytes", len(m.Snapshot))
	l.send(&message{Type: msgImported, ID: m.ID}, -1)
}

// accept accepts connections until the listener is closed.
func (s *server) accept(ln net.Listener) error {
	var wait time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("mtcp app: listener on %s closed: %w", s.cfg.Service, err)
			}
			// Out of descriptors and the like: back off, as net/http does.
			wait = min(max(2*wait, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", "err", err, "retry_in", wait)
			t := time.NewTimer(wait)
			select {
			case <-s.ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		wait = 0
		if lim := s.cfg.UnsentLimit; lim >= 0 {
			if lim == 0 {
				lim = DefaultUnsentLimit
			}
			if err := repair.LimitUnsent(nc.(*net.TCPConn), lim); err != nil {
				s.log.Warn("cannot limit the unsent backlog", "err", err)
			}
		}
		if err := s.adopt(nc.(*net.TCPConn), nil); err != nil {
			nc.Close()
			s.log.Warn("dropped accepted connection", "err", err)
		}
	}
}

// adopt starts serving tc with snapshot.
func (s *server) adopt(tc *net.TCPConn, snapshot []byte) error {
	c := &served{tuple: tupleOf(tc), tc: tc}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return errors.New("the server is shutting down")
	}
	if _, dup := s.conns[c.tuple]; dup {
		return fmt.Errorf("already serving a connection %s", c.tuple)
	}
	s.conns[c.tuple] = c
	s.notifyLocked(msgOpened, c.tuple)
	s.wg.Add(1)
	go s.run(c, snapshot)
	return nil
}

// notifyLocked tells mtcpd about a connection opening or closing. Done
// under s.mu so that mtcpd sees the events in the order they happened,
// also across a reconnection.
func (s *server) notifyLocked(typ string, t Tuple) {
	if s.link != nil {
		s.link.send(&message{Type: typ, Service: s.cfg.Service, Tuple: &t}, -1)
	}
}

// run serves c until it ends or moves to another server.
func (s *server) run(c *served, snapshot []byte) {
	defer s.wg.Done()
	for {
		ctx, cancel := context.WithCancelCause(s.ctx)
		w := newConn(c.tc)
		s.mu.Lock()
		c.cancel, c.w = cancel, w
		ex := c.export
		s.mu.Unlock()

		var next []byte
		var err error
		if ex == nil {
			next, err = s.serveOne(ctx, w, snapshot)
		} else {
			// Asked again while resuming: the snapshot is still current.
			next, err = snapshot, ErrMigrating
		}
		cancel(nil)

		s.mu.Lock()
		ex = c.export
		c.cancel, c.w = nil, nil
		exporting := ex != nil && !w.closed.Load() && exportable(next, err) && s.ctx.Err() == nil
		if !exporting {
			delete(s.conns, c.tuple)
			if ex != nil {
				delete(s.exports, ex.id)
				c.export = nil
			}
			s.notifyLocked(msgClosed, c.tuple)
		}
		s.mu.Unlock()

		if !exporting {
			c.tc.Close()
			if ex != nil {
				why := "the handler ended the connection"
				if err != nil {
					why += ": " + err.Error()
				}
				ex.link.send(&message{Type: msgExported, ID: ex.id, Error: why}, -1)
			}
			if err != nil && s.ctx.Err() == nil {
				s.log.Debug("connection ended", "conn", c.tuple, "err", err)
			}
			return
		}
		if len(next) > MaxSnapshot {
			s.log.Error("handler returned an oversized snapshot; the connection stays here", "conn", c.tuple, "bytes", len(next), "limit", MaxSnapshot)
			s.endExport(c, ex)
			ex.link.send(&message{Type: msgExported, ID: ex.id, Error: fmt.Sprintf("the handler's snapshot is %d bytes, more than the limit of %d", len(next), MaxSnapshot)}, -1)
			snapshot = next
			continue
		}
		if s.handOver(c, ex, next) {
			return
		}
		snapshot = next
	}
}

// serveOne runs the handler once; a panic ends the connection, not the
// process.
func (s *server) serveOne(ctx context.Context, w *conn, snapshot []byte) (next []byte, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("handler panicked", "panic", p, "stack", string(debug.Stack()))
			next, err = nil, fmt.Errorf("handler panicked: %v", p)
		}
	}()
	return s.cfg.Handler.Serve(ctx, w, snapshot)
}

// exportable reports whether a handler's return means "here is my
// snapshot" rather than "the connection is done".
func exportable(next []byte, err error) bool {
	if err == nil {
		return next != nil
	}
	return errors.Is(err, ErrMigrating) || errors.Is(err, context.Canceled)
}

// endExport forgets c's export and lets c be read and written again.
func (s *server) endExport(c *served, ex *exportReq) {
	c.tc.SetDeadline(time.Time{})
	s.mu.Lock()
	delete(s.exports, ex.id)
	c.export = nil
	s.mu.Unlock()
}

// handOver gives c's socket and snapshot to mtcpd and waits for the
// verdict. It reports whether the connection is gone from this server.
func (s *server) handOver(c *served, ex *exportReq, snapshot []byte) (gone bool) {
	// Control lends the descriptor without dup(2)ing it or switching it
	// to blocking mode (which File would do), and keeps it open during
	// the send.
	rc, err := c.tc.SyscallConn()
	if err == nil {
		var werr error
		err = rc.Control(func(fd uintptr) {
			werr = ex.link.send(&message{Type: msgExported, ID: ex.id, Snapshot: snapshot}, int(fd))
		})
		err = errors.Join(err, werr)
	}
	if err != nil {
		s.log.Warn("could not hand the connection to mtcpd; it stays here", "conn", c.tuple, "err", err)
		s.endExport(c, ex)
		return false
	}
	s.log.Debug("exported, waiting for the verdict", "conn", c.tuple, "id", ex.id)

	var v string
	select {
	case v = <-ex.verdict:
	case <-ex.link.done:
		// The daemon is gone; no verdict will come. Resuming is safe
		// either way: if the socket was frozen, it stays in repair mode
		// and cannot put a byte on the wire, so it cannot compete with
		// a copy restored elsewhere; if it was not, the connection
		// simply carries on here.
		s.log.Warn("lost mtcpd while the connection was exported; resuming it here", "conn", c.tuple)
		v = verdictResume
	case <-s.ctx.Done():
		v = "shutdown"
	}
	if v == verdictResume {
		s.endExport(c, ex)
		ex.link.send(&message{Type: msgFinished, ID: ex.id}, -1)
		s.log.Info("migration aborted; connection resumes here", "conn", c.tuple)
		return false
	}
	s.mu.Lock()
	delete(s.exports, ex.id)
	delete(s.conns, c.tuple)
	c.export = nil
	if v != verdictGone {
		s.notifyLocked(msgClosed, c.tuple)
	}
	s.mu.Unlock()
	// When gone, mtcpd froze the socket in repair mode: closing it sends
	// nothing, and another server owns the connection now.
	c.tc.Close()
	if v == verdictGone {
		ex.link.send(&message{Type: msgFinished, ID: ex.id}, -1)
		s.log.Debug("connection migrated away", "conn", c.tuple)
	}
	return true
}

// shutdown closes every connection and waits for the goroutines.
func (s *server) shutdown() {
	s.mu.Lock()
	s.closing = true
	for _, c := range s.conns {
		c.tc.Close() // unblocks the handlers
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.mu.Lock()
	l := s.link
	s.link = nil
	s.mu.Unlock()
	if l != nil {
		l.mc.close()
	}
	s.bg.Wait()
	s.log.Info("stopped")
}

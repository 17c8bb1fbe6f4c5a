package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mtcp-dev/mtcp/internal/ucred"
	"github.com/mtcp-dev/mtcp/repair"
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
// returns a non-nil next with a nil error, or an error wrapping
// ErrMigrating or context.Canceled (with next or without); a handler
// without state returns []byte{} or the error it got (either way, its next
// Serve gets an empty, non-nil snapshot). Any other return (nil, nil, or
// an unrelated error, whatever next is) ends the connection, and the
// migration fails.
//
// conn is not a *net.TCPConn. Closing it ends the connection (the client
// sees it end) and fails a migration under way: do not defer
// conn.Close(); the library closes the connection when Serve returns
// without exporting it. Deadlines set on conn are cleared when a
// connection resumes here after a failed migration, and a connection
// migrated in starts with none.
//
// Serve must not use conn after it returns, nor keep goroutines that do:
// an exported connection belongs to the daemon until its verdict, and
// then to another server or to a new call of Serve. (A Close after Serve
// returned does nothing.)
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

	// VerdictWait bounds how long a connection given to mtcpd waits for
	// mtcpd's verdict (moved away, or resume here) while the link to
	// mtcpd stays up. Past it the library disconnects from mtcpd (and
	// connects again), which makes mtcpd let go of the socket, and
	// decides as when the link is lost: a socket mtcpd did not freeze,
	// or thawed, is served on here; one still frozen is given a while
	// longer, then let go. 0 means
	// DefaultVerdictWait, well past any migration's deadlines: only a
	// stuck mtcpd makes it expire.
	VerdictWait time.Duration
}

// DefaultUnsentLimit is Config.UnsentLimit's default: enough to keep a
// fast link busy, small enough to move in well under a millisecond.
const DefaultUnsentLimit = 128 << 10

// DefaultVerdictWait is Config.VerdictWait's default.
const DefaultVerdictWait = 5 * time.Minute

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
	if cfg.VerdictWait <= 0 {
		cfg.VerdictWait = DefaultVerdictWait
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
		exports: map[exportKey]*served{},
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
	exports map[exportKey]*served // by link and export id
	closing bool
}

// link is one connection to mtcpd.
type link struct {
	mc      *msgConn
	version int           // of the protocol, negotiated at registration
	done    chan struct{} // closed once the connection is lost
	hungUp  sync.Once
}

func (l *link) send(m *message, fds ...int) error {
	err := l.mc.write(m, fds...)
	if err != nil {
		l.hangUp() // a half-written frame leaves the stream unusable
	}
	return err
}

// hangUpWait bounds how long a link hung up waits for mtcpd to close its
// end before it is closed outright.
const hangUpWait = 5 * time.Second

// hangUp ends the link from this side: it stops writing, and mtcpd, seeing
// the end, lets go of this process once no freeze of one of its sockets is
// under way (app.Exported.Claim) and only then closes its end, which the
// link's reader sees (done). So once done, a socket mtcpd did not freeze
// will not be frozen. If mtcpd does not close its end within hangUpWait,
// the link is closed outright.
func (l *link) hangUp() {
	l.hungUp.Do(func() {
		if err := l.mc.uc.CloseWrite(); err != nil {
			l.mc.close()
			return
		}
		go func() {
			t := time.NewTimer(hangUpWait)
			defer t.Stop()
			select {
			case <-l.done:
			case <-t.C:
				l.mc.close()
			}
		}()
	})
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

// exportReq is mtcpd's request to export a connection. Fields after
// verdict are guarded by server.mu.
type exportReq struct {
	id      uint64
	link    *link
	out     *answerer       // of the export request
	verdict chan verdictMsg // buffered; receives exactly one verdict

	sent    bool // the connection was handed over to mtcpd
	decided bool // a verdict was delivered
}

// exportKey names an export: its id is its daemon's, so unique only on
// the link it came by (a daemon that restarted counts from 1 again while
// exports of its previous run may still wait).
type exportKey struct {
	l  *link
	id uint64
}

// verdictMsg is the outcome of an export: verdictGone, verdictResume, or
// verdictUnsent if the connection could not be handed over. ack, if not
// nil, takes the acknowledgement.
type verdictMsg struct {
	v   string
	ack *answerer
}

// verdictUnsent is the outcome of an export whose connection could not be
// handed over to mtcpd; it is no verdict of the protocol.
const verdictUnsent = "unsent"

// verdictLetGo is the outcome of an export whose verdict never came and
// whose socket stayed frozen: this server lets it go, and tells mtcpd it
// is closed (no verdict will make mtcpd forget it). It is no verdict of
// the protocol.
const verdictLetGo = "let-go"

// offeredVersion is the highest protocol version Serve offers (tests
// lower it to exercise version 1).
var offeredVersion atomic.Int32

func init() { offeredVersion.Store(protocolVersion) }

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
	if _, uid, err := ucred.Peer(uc); err == nil && uid != 0 && int(uid) != os.Geteuid() {
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
	werr := mc.write(&message{Type: msgRegister, Version: minProtocolVersion, MaxVersion: int(offeredVersion.Load()), Service: s.cfg.Service, PID: os.Getpid()})
	uc.SetReadDeadline(time.Now().Add(writeTimeout))
	m, fds, err := mc.read()
	closeFDs(fds)
	uc.SetReadDeadline(time.Time{})
	switch {
	case err != nil:
		return fail(fmt.Errorf("register service %s with mtcpd: no answer: %w", s.cfg.Service, errors.Join(werr, err)))
	case m.Type == msgError:
		return fail(fmt.Errorf("mtcpd refused to register service %s: %w", s.cfg.Service, remoteError(m.Error, m.Code)))
	case m.Type != msgRegistered:
		return fail(fmt.Errorf("register service %s with mtcpd: %w: answer %q", s.cfg.Service, ErrProtocol, m.Type))
	case werr != nil:
		return fail(fmt.Errorf("register service %s with mtcpd: %w", s.cfg.Service, werr))
	}
	// A version-1 daemon does not say its version.
	l := &link{mc: mc, version: min(max(m.Version, minProtocolVersion), int(offeredVersion.Load())), done: make(chan struct{})}
	mc.bin.Store(l.version >= binVersion)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return fail(errors.New("shutting down"))
	}
	ts := make([]Tuple, 0, len(s.conns))
	for t := range s.conns {
		ts = append(ts, t)
	}
	s.notify(l, msgOpened, ts) // an error breaks l: the reader below notices and we reconnect
	s.link = l
	s.mu.Unlock()
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		s.readLink(l)
	}()
	s.log.Info("registered with mtcpd", "daemon", s.cfg.Daemon, "protocol", l.version)
	return nil
}

// keepLink reconnects to mtcpd whenever the connection is lost, until
// ctx is cancelled.
func (s *server) keepLink(ctx context.Context) {
	for {
		s.mu.Lock()
		l := s.link
		s.mu.Unlock()
		if l == nil {
			return // shutdown took the link before this loop first looked
		}
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
		if len(fds) > 0 && m.Type != msgImport && m.Type != msgImportMany {
			closeFDs(fds)
			s.log.Error("mtcpd sent a descriptor with a message that takes none; disconnecting", "type", m.Type)
			return
		}
		switch m.Type {
		case msgExport, msgExportMany:
			s.onExport(l, m)
		case msgVerdict, msgVerdictMany:
			err = s.onVerdict(l, m)
		case msgImport, msgImportMany:
			err = s.onImport(l, m, fds)
			fds = nil
		default:
			err = fmt.Errorf("%w: unexpected %q message from mtcpd", ErrProtocol, m.Type)
		}
		if err != nil {
			s.log.Error("bad request from mtcpd; disconnecting", "err", err)
			return
		}
	}
}

// requestItems returns the items of a request, a version-1 one as one
// item whose id is the request's.
func requestItems(m *message) (items []item, v1 bool) {
	switch m.Type {
	case msgExport, msgVerdict, msgImport:
		return []item{{ID: m.ID, Tuple: m.Tuple, Snapshot: m.Snapshot, FD: m.Type == msgImport}}, true
	}
	return m.Items, false
}

// onExport starts exporting connections: their handlers are told to stop
// at once; run does the rest for each once its handler returns, and the
// answerer sends them to mtcpd as they become ready.
func (s *server) onExport(l *link, m *message) {
	items, v1 := requestItems(m)
	typ := msgExportedMany
	if v1 {
		typ = msgExported
	}
	out := s.newAnswerer(l, m.ID, typ, v1, true)
	var refused []item
	var stop []*served
	s.mu.Lock()
	for _, it := range items {
		fail := func(code, text string) {
			refused = append(refused, item{ID: it.ID, Error: text, Code: code})
		}
		if it.Tuple == nil || !it.Tuple.valid() {
			fail(codeGeneric, "export request without a valid tuple")
			continue
		}
		if m.Service != s.cfg.Service {
			fail(codeNoSvc, fmt.Sprintf("process %d serves %s, not %s", os.Getpid(), s.cfg.Service, m.Service))
			continue
		}
		c := s.conns[*it.Tuple]
		switch {
		case c == nil:
			fail(codeNoConn, fmt.Sprintf("service %s (pid %d) has no connection %s; it may have closed or moved", s.cfg.Service, os.Getpid(), it.Tuple))
			continue
		case c.export != nil:
			fail(codeGeneric, fmt.Sprintf("connection %s is already being exported (request %d)", it.Tuple, c.export.id))
			continue
		case s.exports[exportKey{l, it.ID}] != nil:
			fail(codeGeneric, fmt.Sprintf("export id %d is already in use", it.ID))
			continue
		}
		out.expect()
		c.export = &exportReq{id: it.ID, link: l, out: out, verdict: make(chan verdictMsg, 1)}
		s.exports[exportKey{l, it.ID}] = c
		stop = append(stop, c)
	}
	// Stop the handlers outside the lock, but with the cancel functions
	// current under it: a handler resuming meanwhile sees the export.
	cancels := make([]context.CancelCauseFunc, len(stop))
	ws := make([]*conn, len(stop))
	for i, c := range stop {
		cancels[i], ws[i] = c.cancel, c.w
	}
	s.mu.Unlock()
	for _, it := range refused {
		out.add(readyItem{it: it}, false)
	}
	s.log.Debug("exporting", "conns", len(stop), "refused", len(refused), "request", m.ID)
	for i := range stop {
		if cancels[i] != nil {
			cancels[i](ErrMigrating)
		}
		if ws[i] != nil {
			ws[i].stop()
		}
	}
	out.release()
}

// onVerdict passes mtcpd's verdict to the exported connections; each
// acknowledges once it acted on it.
func (s *server) onVerdict(l *link, m *message) error {
	if m.Verdict != verdictGone && m.Verdict != verdictResume {
		return fmt.Errorf("%w: verdict %q", ErrProtocol, m.Verdict)
	}
	items, v1 := requestItems(m)
	typ := msgFinishedMany
	if v1 {
		typ = msgFinished
	}
	ack := s.newAnswerer(l, m.ID, typ, v1, false)
	for _, it := range items {
		s.mu.Lock()
		c := s.exports[exportKey{l, it.ID}]
		var ex *exportReq
		if c != nil && c.export != nil && c.export.link == l && c.export.sent && !c.export.decided {
			ex = c.export
			ex.decided = true
		}
		s.mu.Unlock()
		if ex == nil {
			ack.add(readyItem{it: item{ID: it.ID, Error: fmt.Sprintf("no export %d is waiting for a verdict in pid %d", it.ID, os.Getpid())}}, false)
			continue
		}
		ack.expect()
		ex.verdict <- verdictMsg{v: m.Verdict, ack: ack}
	}
	ack.release()
	return nil
}

// onImport checks an import request, which is a protocol error if a
// descriptor is missing or one too many, and adopts its connections: a
// few at once, on the goroutine that read the request, because their
// clients wait for them; more in the background, because adopting a
// socket takes a few system calls and the requests of a large batch, each
// in its goroutine, use every core.
func (s *server) onImport(l *link, m *message, fds []int) error {
	items, _ := requestItems(m)
	if fdCount(items) != len(items) || len(fds) != len(items) {
		closeFDs(fds)
		return fmt.Errorf("%w: %s request with %d items and %d descriptors", ErrProtocol, m.Type, len(items), len(fds))
	}
	if len(items) <= importInline {
		s.importConns(l, m, fds)
		return nil
	}
	s.bg.Go(func() { s.importConns(l, m, fds) })
	return nil
}

// importInline is the largest import request adopted on the goroutine that
// read it.
const importInline = 4

// importConns adopts the connections of an import request and answers
// once for all.
func (s *server) importConns(l *link, m *message, fds []int) {
	items, v1 := requestItems(m)
	typ := msgImportedMany
	if v1 {
		typ = msgImported
	}
	out := s.newAnswerer(l, m.ID, typ, v1, false)
	results := make([]item, len(items))
	var tcs []*net.TCPConn
	var snaps [][]byte
	var pos []int
	for i, it := range items {
		results[i].ID = it.ID
		if m.Service != s.cfg.Service {
			closeFDs(fds[i : i+1])
			results[i].Error = fmt.Sprintf("process %d serves %s, not %s", os.Getpid(), s.cfg.Service, m.Service)
			continue
		}
		f := os.NewFile(uintptr(fds[i]), "mtcp-import")
		nc, err := net.FileConn(f) // a dup: f is ours to close
		f.Close()
		if err != nil {
			results[i].Error = fmt.Sprintf("adopt imported socket: %v", err)
			continue
		}
		tc, ok := nc.(*net.TCPConn)
		if !ok {
			nc.Close()
			results[i].Error = fmt.Sprintf("imported socket is a %T, not a TCP connection", nc)
			continue
		}
		if err := setTCPOptions(tc, it.TCP); err != nil {
			tc.Close()
			results[i].Error = fmt.Sprintf("adopt imported socket: %v", err)
			continue
		}
		tcs, snaps, pos = append(tcs, tc), append(snaps, it.Snapshot), append(pos, i)
	}
	for k, err := range s.adopt(tcs, snaps) {
		if err != nil {
			tcs[k].Close()
			results[pos[k]].Error = err.Error()
		}
	}
	failed := 0
	for _, r := range results {
		if r.Error != "" {
			failed++
			s.log.Warn("import failed", "err", r.Error)
		}
		out.add(readyItem{it: r}, false)
	}
	s.log.Debug("connections migrated in", "conns", len(results)-failed, "failed", failed)
	out.release()
}

// setTCPOptions puts back an imported connection's TCP_NODELAY and
// keepalive settings (nil: Go's, which net.FileConn has set).
func setTCPOptions(tc *net.TCPConn, o *tcpOpts) error {
	if o == nil {
		return nil
	}
	if err := tc.SetNoDelay(o.NoDelay); err != nil {
		return err
	}
	if !o.KeepAlive {
		return tc.SetKeepAlive(false)
	}
	return tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: time.Duration(o.Idle) * time.Second,
		Interval: time.Duration(o.Intvl) * time.Second, Count: int(o.Count)})
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
		if err := s.adopt([]*net.TCPConn{nc.(*net.TCPConn)}, [][]byte{nil})[0]; err != nil {
			nc.Close()
			s.log.Warn("dropped accepted connection", "err", err)
		}
	}
}

// adopt starts serving each of tcs with its snapshot; it returns one
// error per connection, which the caller then closes.
func (s *server) adopt(tcs []*net.TCPConn, snaps [][]byte) []error {
	errs := make([]error, len(tcs))
	var opened []Tuple
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, tc := range tcs {
		c := &served{tuple: tupleOf(tc), tc: tc}
		if s.closing {
			errs[i] = errors.New("the server is shutting down")
			continue
		}
		if !c.tuple.valid() {
			// Reset before it got here (an imported socket's addresses
			// are read back from it): nothing left to serve.
			errs[i] = errors.New("the connection ended before it was adopted (it has no peer address)")
			continue
		}
		if _, dup := s.conns[c.tuple]; dup {
			errs[i] = fmt.Errorf("already serving a connection %s", c.tuple)
			continue
		}
		s.conns[c.tuple] = c
		opened = append(opened, c.tuple)
		s.wg.Add(1)
		go s.run(c, snaps[i])
	}
	s.notifyLocked(msgOpened, opened...)
	return errs
}

// notifyLocked tells mtcpd about connections opening or closing. Done
// under s.mu so that mtcpd sees the events in the order they happened,
// also across a reconnection.
func (s *server) notifyLocked(typ string, ts ...Tuple) {
	if s.link != nil {
		s.notify(s.link, typ, ts)
	}
}

// notify sends l the events, in batches if its protocol has them.
func (s *server) notify(l *link, typ string, ts []Tuple) {
	if l.version < 2 {
		for _, t := range ts {
			if l.send(&message{Type: typ, Service: s.cfg.Service, Tuple: &t}) != nil {
				return
			}
		}
		return
	}
	for lo := 0; lo < len(ts); lo += maxBatch {
		if l.send(&message{Type: typ, Service: s.cfg.Service, Tuples: ts[lo:min(lo+maxBatch, len(ts))]}) != nil {
			return
		}
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
		ran := ex == nil
		if ran {
			next, err = s.serveOne(ctx, w, snapshot)
		} else {
			// Asked again while resuming: the snapshot is still current.
			next, err = snapshot, ErrMigrating
		}
		w.retire()
		cancel(nil)

		s.mu.Lock()
		ex = c.export
		c.cancel, c.w = nil, nil
		exporting := ex != nil && !w.closed.Load() && exportable(next, err) && s.ctx.Err() == nil
		if exporting && next == nil && ran {
			// A handler that keeps no state returned just the error:
			// its connection is not a fresh one (nil) for the next run.
			// (One exported before its handler ever ran is, and stays.)
			next = []byte{}
		}
		if !exporting {
			delete(s.conns, c.tuple)
			if ex != nil {
				delete(s.exports, exportKey{ex.link, ex.id})
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
				// Truncated: a frame too large would cost the link to
				// mtcpd, and every export on it.
				ex.out.add(readyItem{it: item{ID: ex.id, Error: truncate(why)}}, true)
			}
			if err != nil && s.ctx.Err() == nil {
				s.log.Debug("connection ended", "conn", c.tuple, "err", err)
			}
			return
		}
		if len(next) > MaxSnapshot {
			s.log.Error("handler returned an oversized snapshot; the connection stays here", "conn", c.tuple, "bytes", len(next), "limit", MaxSnapshot)
			s.endExport(c, ex)
			ex.out.add(readyItem{it: item{ID: ex.id, Error: fmt.Sprintf("the handler's snapshot is %d bytes, more than the limit of %d", len(next), MaxSnapshot)}}, true)
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
	delete(s.exports, exportKey{ex.link, ex.id})
	c.export = nil
	s.mu.Unlock()
}

// handOver gives c's socket and snapshot to mtcpd (through the answer
// to the export request, with the other connections ready) and waits for
// the verdict. It reports whether the connection is gone from this
// server.
func (s *server) handOver(c *served, ex *exportReq, snapshot []byte) (gone bool) {
	ex.out.add(readyItem{it: item{ID: ex.id, Snapshot: snapshot}, c: c, ex: ex}, true)
	wait := time.NewTimer(s.cfg.VerdictWait)
	defer wait.Stop()
	var vm verdictMsg
	// decideHere decides as when the link is lost (afterLinkLoss), unless
	// a verdict is being delivered already: then that one counts (a
	// verdict that comes later is answered with an error, not taken and
	// left unanswered). With hangUp (the link is up, mtcpd silent) it
	// hangs up first: mtcpd still has the socket and may yet freeze it,
	// and it lets go of it (or finishes freezing it) as the link ends.
	decideHere := func(hangUp bool) verdictMsg {
		s.mu.Lock()
		claimed := !ex.decided
		ex.decided = true
		s.mu.Unlock()
		if !claimed {
			return <-ex.verdict
		}
		if hangUp {
			s.log.Warn("no verdict from mtcpd on an exported connection; disconnecting from it to decide here", "conn", c.tuple, "waited", s.cfg.VerdictWait)
			ex.link.hangUp()
			<-ex.link.done
		}
		return verdictMsg{v: s.afterLinkLoss(c)}
	}
	select {
	case vm = <-ex.verdict:
	case <-ex.link.done:
		vm = decideHere(false)
	case <-wait.C:
		vm = decideHere(true)
	case <-s.ctx.Done():
		vm.v = "shutdown"
	}
	ack := func() {
		if vm.ack != nil {
			vm.ack.add(readyItem{it: item{ID: ex.id}}, true)
		}
	}
	switch vm.v {
	case verdictUnsent:
		s.log.Warn("could not hand the connection to mtcpd; it stays here", "conn", c.tuple)
		s.endExport(c, ex)
		return false
	case verdictResume:
		s.endExport(c, ex)
		ack()
		s.log.Info("migration aborted; connection resumes here", "conn", c.tuple)
		return false
	}
	s.mu.Lock()
	delete(s.exports, exportKey{ex.link, ex.id})
	delete(s.conns, c.tuple)
	c.export = nil
	if vm.v != verdictGone {
		s.notifyLocked(msgClosed, c.tuple)
	}
	s.mu.Unlock()
	// When gone, mtcpd froze the socket in repair mode: closing it sends
	// nothing, and another server owns the connection now.
	c.tc.Close()
	if vm.v == verdictGone {
		ack()
		s.log.Debug("connection migrated away", "conn", c.tuple)
	}
	return true
}

// frozenWait is how long an exported connection whose daemon link broke
// may stay frozen before it is taken for gone: longer than a migration's
// deadlines, in which its daemon thaws it if the migration fails.
// frozenPoll is how soon it is first looked at again (then less and less
// often, up to once a second).
var frozenWait, frozenPoll = 2 * time.Minute, 50 * time.Millisecond

// linkLossGrace is how long an exported connection waits, once the link
// to mtcpd is gone, before it looks whether mtcpd froze its socket.
var linkLossGrace = 500 * time.Millisecond

// afterLinkLoss decides what becomes of exported connection c once the
// link to mtcpd is gone and no verdict will come. A socket the daemon
// did not freeze carries on here. One it froze (repair mode) cannot be
// read or written: resumed now, its handler would fail and end it, and
// with it the connection if the daemon aborts the migration and thaws
// it (the daemon may have lost only its link to this process). So it
// waits while the socket stays frozen: thawed, the connection resumes
// here; still frozen after frozenWait, it moved elsewhere or was lost
// with its daemon, and is let go (closed in repair mode, it sends
// nothing).
func (s *server) afterLinkLoss(c *served) string {
	// mtcpd closes its end only once no freeze is under way
	// (app.Exported.Claim), and the link's reader waits for that (hangUp),
	// but a link closed outright (hangUpWait passed, mtcpd stuck) may
	// leave mtcpd freezing a moment after: give it that moment.
	select {
	case <-s.ctx.Done():
		return "shutdown"
	case <-time.After(linkLossGrace):
	}
	deadline := time.Now().Add(frozenWait)
	poll := frozenPoll
	for {
		frozen, err := repair.InRepair(c.tc)
		if err != nil || !frozen {
			s.log.Warn("no verdict from mtcpd on an exported connection, which is not frozen; resuming it here", "conn", c.tuple)
			return verdictResume
		}
		if time.Now().After(deadline) {
			s.log.Warn("no verdict from mtcpd on an exported connection, which stayed frozen; letting it go", "conn", c.tuple, "waited", frozenWait)
			return verdictLetGo
		}
		select {
		case <-s.ctx.Done():
			return "shutdown"
		case <-time.After(poll):
		}
		// Thousands of connections may wait so after a daemon crash.
		poll = min(2*poll, time.Second)
	}
}

// shutdown closes every connection and waits for the goroutines.
func (s *server) shutdown() {
	s.mu.Lock()
	s.closing = true
	tcs := make([]*net.TCPConn, 0, len(s.conns))
	for _, c := range s.conns {
		tcs = append(tcs, c.tc)
	}
	s.mu.Unlock()
	// Not under s.mu: a socket lent to an answer under way (its
	// RawConn.Control open) closes only once the answer is sent, and
	// the answer takes s.mu.
	for _, tc := range tcs {
		tc.Close() // unblocks the handlers
	}
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

package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// registerTimeout bounds how long a new application connection may take
// to register.
const registerTimeout = 10 * time.Second

// Registry is the daemon's side of the application socket: applications
// connect to it and register their services, report the connections
// they serve, give connections away (Export) and adopt migrated ones
// (Import). Its methods are safe for concurrent use.
type Registry struct {
	log    *slog.Logger
	nextID atomic.Uint64

	// allowUID decides which peer uids may use the socket; Serve sets the
	// default (root and the socket's owner) unless a test replaced it.
	allowUID func(uid uint32) bool

	mu       sync.Mutex
	services map[string]*appConn
	apps     map[*appConn]struct{}
}

// NewRegistry returns a Registry that logs to logger (nil discards).
func NewRegistry(logger *slog.Logger) *Registry {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Registry{log: logger, services: map[string]*appConn{}, apps: map[*appConn]struct{}{}}
}

// appConn is one application's connection to the registry. Fields after
// done are guarded by Registry.mu.
type appConn struct {
	r    *Registry
	mc   *msgConn
	pid  int
	done chan struct{} // closed when the connection is gone

	service   string
	conns     map[Tuple]struct{}
	pending   map[uint64]chan reply // requests awaiting their answer
	abandoned map[uint64]bool       // requests whose caller gave up
}

type reply struct {
	m   *message
	fds []int
}

// Serve accepts application connections on ln until ctx is cancelled,
// then closes ln and every application connection and returns nil.
//
// Only root (uid 0) and the uid owning ln's socket file may connect: each
// peer's uid is checked with SO_PEERCRED, which the kernel records at
// connect(2). A registered application hands its TCP connections to the
// daemon, and the daemon installs connections into it, so an unprivileged
// peer must not get either. (A socket in the abstract namespace has no
// owner; then root and the daemon's own uid may connect.) The socket file
// itself should also be mode 0600 or in a root-only directory.
//
// Each connection registers one service; a service has one application:
// a second registration is refused with an error wrapping
// ErrServiceTaken. A peer that sends garbage is disconnected; the
// registry carries on.
func (r *Registry) Serve(ctx context.Context, ln *net.UnixListener) error {
	allow := r.allowUID
	if allow == nil {
		owner, ok := fileOwner(ln.Addr().String())
		if !ok {
			owner = uint32(os.Geteuid())
		}
		allow = func(uid uint32) bool { return uid == 0 || uid == owner }
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer func() {
		r.mu.Lock()
		for a := range r.apps {
			a.mc.close()
		}
		r.mu.Unlock()
		wg.Wait()
	}()
	var wait time.Duration
	for {
		uc, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("mtcp registry: application socket %s closed: %w", ln.Addr(), err)
			}
			wait = min(max(2*wait, 5*time.Millisecond), time.Second)
			r.log.Warn("accept on the application socket failed", "err", err, "retry_in", wait)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
			continue
		}
		wait = 0
		pid, uid, err := peerCred(uc)
		if err == nil && !allow(uid) {
			err = fmt.Errorf("%w: uid %d (pid %d) may not connect; only root and the socket's owner may", ErrPeerRefused, uid, pid)
		}
		if err != nil {
			r.log.Warn("refused an application connection", "err", err)
			refuseConn(uc, err)
			continue
		}
		a := &appConn{
			r: r, mc: newMsgConn(uc), pid: pid, done: make(chan struct{}),
			conns: map[Tuple]struct{}{}, pending: map[uint64]chan reply{}, abandoned: map[uint64]bool{},
		}
		r.mu.Lock()
		r.apps[a] = struct{}{}
		r.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := a.serve()
			r.drop(a)
			switch {
			case ctx.Err() != nil:
			case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
				r.log.Info("application disconnected", "pid", a.pid, "service", a.service)
			default:
				r.log.Warn("dropped an application connection", "pid", a.pid, "service", a.service, "err", err)
			}
		}()
	}
}

// drop forgets a disconnected application.
// The service is gone before the application sees its socket close.
func (r *Registry) drop(a *appConn) {
	r.mu.Lock()
	delete(r.apps, a)
	if a.service != "" && r.services[a.service] == a {
		delete(r.services, a.service)
	}
	a.conns = map[Tuple]struct{}{}
	a.pending = map[uint64]chan reply{}
	close(a.done)
	r.mu.Unlock()
	a.mc.close()
	a.mc.dropFDs()
}

// serve reads one application's messages until it disconnects or breaks
// the protocol.
func (a *appConn) serve() error {
	r := a.r
	uc := a.mc.uc
	uc.SetReadDeadline(time.Now().Add(registerTimeout))
	m, fds, err := a.mc.read()
	uc.SetReadDeadline(time.Time{})
	if err != nil {
		return fmt.Errorf("waiting for registration: %w", err)
	}
	if err := a.register(m, fds); err != nil {
		return err
	}
	for {
		m, fds, err := a.mc.read()
		if err != nil {
			return err
		}
		switch m.Type {
		case msgOpened, msgClosed:
			closeFDs(fds)
			if len(fds) > 0 || m.Tuple == nil || !m.Tuple.valid() || m.Service != a.service {
				return fmt.Errorf("%w: bad %s message (service %q, tuple %v)", ErrProtocol, m.Type, m.Service, m.Tuple)
			}
			r.mu.Lock()
			if m.Type == msgOpened {
				a.conns[*m.Tuple] = struct{}{}
			} else {
				delete(a.conns, *m.Tuple)
			}
			r.mu.Unlock()
		case msgExported, msgImported, msgFinished:
			if len(fds) > 0 && m.Type != msgExported {
				closeFDs(fds)
				return fmt.Errorf("%w: %s message with a descriptor", ErrProtocol, m.Type)
			}
			if err := a.answer(m, fds); err != nil {
				return err
			}
		default:
			closeFDs(fds)
			return fmt.Errorf("%w: unexpected %q message from the application", ErrProtocol, m.Type)
		}
	}
}

// register handles the first message of a connection.
func (a *appConn) register(m *message, fds []int) error {
	closeFDs(fds)
	refuse := func(code string, err error) error {
		a.mc.write(&message{Type: msgError, Error: err.Error(), Code: code}, -1)
		return err
	}
	switch {
	case len(fds) > 0 || m.Type != msgRegister:
		return refuse(codeGeneric, fmt.Errorf("%w: the first message must be a registration, got %q", ErrProtocol, m.Type))
	case m.Version != protocolVersion:
		return refuse(codeGeneric, fmt.Errorf("%w: protocol version %d, this daemon speaks %d: use matching mtcp versions", ErrProtocol, m.Version, protocolVersion))
	case m.Service == "" || strings.ContainsFunc(m.Service, func(r rune) bool { return r < ' ' || r == 0x7f }):
		return refuse(codeGeneric, fmt.Errorf("%w: bad service name %q", ErrProtocol, m.Service))
	}
	r := a.r
	r.mu.Lock()
	if other := r.services[m.Service]; other != nil {
		r.mu.Unlock()
		return refuse(codeTaken, fmt.Errorf("%w: service %s is served by pid %d; stop that process or listen on another address", ErrServiceTaken, m.Service, other.pid))
	}
	a.service = m.Service
	r.services[m.Service] = a
	r.mu.Unlock()
	if err := a.mc.write(&message{Type: msgRegistered, Service: m.Service}, -1); err != nil {
		return err
	}
	r.log.Info("application registered", "service", m.Service, "pid", a.pid, "pid_claimed", m.PID)
	return nil
}

// answer delivers an answer to the request waiting for it.
func (a *appConn) answer(m *message, fds []int) error {
	r := a.r
	r.mu.Lock()
	ch, waiting := a.pending[m.ID]
	delete(a.pending, m.ID)
	abandoned := a.abandoned[m.ID]
	delete(a.abandoned, m.ID)
	r.mu.Unlock()
	switch {
	case waiting:
		ch <- reply{m: m, fds: fds}
	case abandoned:
		closeFDs(fds)
		// The caller of Export gave up before the application answered:
		// nobody will decide, so let the connection carry on there.
		if m.Type == msgExported && m.Error == "" {
			r.log.Warn("export answered after its caller gave up; resuming the connection in the application", "service", a.service, "id", m.ID)
			if err := a.expect(m.ID, true); err != nil {
				return nil
			}
			return a.mc.write(&message{Type: msgVerdict, ID: m.ID, Verdict: verdictResume}, -1)
		}
	default:
		closeFDs(fds)
		return fmt.Errorf("%w: %s answer to request %d, which is not pending", ErrProtocol, m.Type, m.ID)
	}
	return nil
}

// expect records that request id awaits an answer; abandoned means that
// nobody will wait for it.
func (a *appConn) expect(id uint64, abandoned bool) error {
	r := a.r
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-a.done:
		return fmt.Errorf("%w: pid %d serving %s", ErrAppGone, a.pid, a.service)
	default:
	}
	if abandoned {
		a.abandoned[id] = true
	} else {
		a.pending[id] = make(chan reply, 1)
	}
	return nil
}

// send sends a request (with fd, unless negative) whose answer the
// caller then collects with wait.
func (a *appConn) send(m *message, fd int) (chan reply, error) {
	if err := a.expect(m.ID, false); err != nil {
		return nil, err
	}
	a.r.mu.Lock()
	ch := a.pending[m.ID]
	a.r.mu.Unlock()
	if err := a.mc.write(m, fd); err != nil {
		a.mc.close() // a half-written frame leaves the stream unusable
		return nil, fmt.Errorf("%w: pid %d serving %s: %v", ErrAppGone, a.pid, a.service, err)
	}
	return ch, nil
}

// wait waits for the answer to request id. If ctx ends first, a late
// answer is handled by answer.
func (a *appConn) wait(ctx context.Context, id uint64, ch chan reply) (reply, error) {
	select {
	case rep := <-ch:
		return rep, nil
	case <-a.done:
		return reply{}, fmt.Errorf("%w: pid %d serving %s disconnected before answering", ErrAppGone, a.pid, a.service)
	case <-ctx.Done():
		a.r.mu.Lock()
		_, still := a.pending[id]
		if still {
			delete(a.pending, id)
			a.abandoned[id] = true
		}
		a.r.mu.Unlock()
		if still {
			return reply{}, fmt.Errorf("no answer from the application (pid %d) serving %s: %w", a.pid, a.service, context.Cause(ctx))
		}
		return <-ch, nil // it answered meanwhile
	}
}

// call sends a request without descriptor and waits for its answer.
func (a *appConn) call(ctx context.Context, m *message) (reply, error) {
	ch, err := a.send(m, -1)
	if err != nil {
		return reply{}, err
	}
	return a.wait(ctx, m.ID, ch)
}

// app returns the application registered for service.
func (r *Registry) app(service string) (*appConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.services[service]
	if a == nil {
		return nil, fmt.Errorf("%w: %q (registered: %s); is the application running?", ErrNoService, service, strings.Join(r.servicesLocked(), ", "))
	}
	return a, nil
}

// Services returns the services applications registered, sorted.
func (r *Registry) Services() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.servicesLocked()
}

func (r *Registry) servicesLocked() []string {
	out := make([]string, 0, len(r.services))
	for s := range r.services {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// Conns returns the connections the application registered for service
// reports it serves, sorted; none if no application has the service.
func (r *Registry) Conns(service string) []Tuple {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.services[service]
	if a == nil {
		return nil
	}
	out := make([]Tuple, 0, len(a.conns))
	for t := range a.conns {
		out = append(out, t)
	}
	slices.SortFunc(out, func(x, y Tuple) int {
		if c := x.Local.Compare(y.Local); c != 0 {
			return c
		}
		return x.Remote.Compare(y.Remote)
	})
	return out
}

// Exported is a connection an application gave up, pending its verdict.
type Exported struct {
	// Tuple is the connection's tuple on this host.
	Tuple Tuple
	// Service is the service whose application gave it.
	Service string
	// Socket is the connection's socket, a descriptor the application
	// passed; the caller owns and closes it. The application keeps its
	// own descriptor, without touching it, until Finish. It is whatever
	// the application sent: check that it is the TCP socket of Tuple
	// (its captured addresses) before acting on it.
	Socket *os.File
	// Snapshot is the application's per-connection state.
	Snapshot []byte

	a  *appConn
	id uint64

	mu       sync.Mutex
	finished bool
	err      error
}

// Export asks the application serving service for its connection t: the
// handler stops at a safe point and the application sends the socket and
// its snapshot. The connection then waits, untouched, for Finish, which
// must be called exactly once in the end (later calls are no-ops).
//
// Errors wrap ErrNoService (no such service), ErrNoConn (the application
// has no such connection), ErrAppGone, or the context's error; on error
// there is nothing to finish and the connection, if any, carries on.
func (r *Registry) Export(ctx context.Context, service string, t Tuple) (*Exported, error) {
	t = t.norm()
	a, err := r.app(service)
	if err != nil {
		return nil, fmt.Errorf("mtcp registry: export %s: %w", t, err)
	}
	id := r.nextID.Add(1)
	rep, err := a.call(ctx, &message{Type: msgExport, ID: id, Service: service, Tuple: &t})
	if err != nil {
		return nil, fmt.Errorf("mtcp registry: export %s of service %s: %w", t, service, err)
	}
	if rep.m.Type != msgExported || rep.m.Error != "" || len(rep.fds) != 1 {
		closeFDs(rep.fds)
		var why error
		switch {
		case rep.m.Type != msgExported:
			why = fmt.Errorf("%w: answer %q", ErrProtocol, rep.m.Type)
		case rep.m.Error != "":
			why = remoteError(rep.m)
		default:
			why = fmt.Errorf("%w: the application answered with %d descriptors, want 1", ErrProtocol, len(rep.fds))
			a.mc.close()
		}
		return nil, fmt.Errorf("mtcp registry: export %s of service %s (pid %d): %w", t, service, a.pid, why)
	}
	e := &Exported{
		Tuple: t, Service: service, Snapshot: rep.m.Snapshot,
		Socket: os.NewFile(uintptr(rep.fds[0]), "mtcp-export "+t.String()),
		a:      a, id: id,
	}
	r.log.Debug("exported", "service", service, "conn", t, "snapshot_bytes", len(e.Snapshot))
	return e, nil
}

// Finish tells the application the outcome of the export. committed
// means another server owns the connection now: the application closes
// its descriptor (the daemon froze the socket in repair mode, so that
// sends nothing) and forgets the connection. Otherwise the application
// serves the connection again from its snapshot; the socket must be out
// of repair mode by then.
//
// Finish waits for the application's acknowledgement and does not close
// e.Socket. Only the first call acts; later ones return its result. If
// the application has disconnected, committing succeeds (its descriptor
// is closed anyway) and resuming fails wrapping ErrAppGone.
func (e *Exported) Finish(ctx context.Context, committed bool) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.finished {
		return e.err
	}
	e.finished = true
	e.err = e.finish(ctx, committed)
	return e.err
}

func (e *Exported) finish(ctx context.Context, committed bool) error {
	v := verdictResume
	if committed {
		v = verdictGone
	}
	rep, err := e.a.call(ctx, &message{Type: msgVerdict, ID: e.id, Verdict: v})
	if err != nil {
		if committed && errors.Is(err, ErrAppGone) {
			return nil
		}
		return fmt.Errorf("mtcp registry: tell %s of service %s %q: %w", e.Tuple, e.Service, v, err)
	}
	if rep.m.Type != msgFinished || rep.m.Error != "" {
		return fmt.Errorf("mtcp registry: tell %s of service %s %q: the application answered %q: %s", e.Tuple, e.Service, v, rep.m.Type, rep.m.Error)
	}
	if committed {
		r := e.a.r
		r.mu.Lock()
		delete(e.a.conns, e.Tuple)
		r.mu.Unlock()
	}
	return nil
}

// ExportAll exports every connection of service (to drain it), at most
// max at a time (max < 1 means 16). It returns the connections it got,
// each pending Finish, and an error joining the failures; a connection
// that closes meanwhile is not a failure.
func (r *Registry) ExportAll(ctx context.Context, service string, max int) ([]*Exported, error) {
	if _, err := r.app(service); err != nil {
		return nil, fmt.Errorf("mtcp registry: export all of %s: %w", service, err)
	}
	if max < 1 {
		max = 16
	}
	tuples := r.Conns(service)
	out := make([]*Exported, len(tuples))
	errs := make([]error, len(tuples))
	sem := make(chan struct{}, max)
	var wg sync.WaitGroup
	for i, t := range tuples {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out[i], errs[i] = r.Export(ctx, service, t)
			if errors.Is(errs[i], ErrNoConn) {
				errs[i] = nil
			}
		}()
	}
	wg.Wait()
	got := slices.DeleteFunc(out, func(e *Exported) bool { return e == nil })
	return got, errors.Join(errs...)
}

// Import hands a live connection, socket and snapshot, to the application
// registered for service, which serves it with its Handler. The
// application gets its own descriptor: the caller still owns socket and
// closes it after Import returns. The socket must be a connected TCP
// socket out of repair mode.
//
// If ctx ends before the application acknowledges, Import returns an
// error but the application may still adopt the connection.
func (r *Registry) Import(ctx context.Context, service string, socket *os.File, snapshot []byte) error {
	if len(snapshot) > MaxSnapshot {
		return fmt.Errorf("mtcp registry: import into %s: snapshot of %d bytes, the limit is %d", service, len(snapshot), MaxSnapshot)
	}
	a, err := r.app(service)
	if err != nil {
		return fmt.Errorf("mtcp registry: import into %s: %w", service, err)
	}
	rc, err := socket.SyscallConn()
	if err != nil {
		return fmt.Errorf("mtcp registry: import into %s: %w", service, err)
	}
	id := r.nextID.Add(1)
	var ch chan reply
	var serr error
	// Control lends the descriptor as it is, open for the duration of the
	// send: Fd would switch it to blocking mode, under the feet of any
	// other process holding it.
	err = rc.Control(func(fd uintptr) {
		ch, serr = a.send(&message{Type: msgImport, ID: id, Service: service, Snapshot: snapshot}, int(fd))
	})
	if err = errors.Join(err, serr); err != nil {
		return fmt.Errorf("mtcp registry: import into %s: %w", service, err)
	}
	rep, err := a.wait(ctx, id, ch)
	if err != nil {
		return fmt.Errorf("mtcp registry: import into %s: %w", service, err)
	}
	if rep.m.Type != msgImported || rep.m.Error != "" {
		return fmt.Errorf("mtcp registry: import into %s (pid %d): the application refused: %s", service, a.pid, rep.m.Error)
	}
	return nil
}

// refuseConn tells a refused peer why, without waiting for it, and
// closes the connection.
func refuseConn(uc *net.UnixConn, err error) {
	mc := newMsgConn(uc)
	mc.write(&message{Type: msgError, Error: err.Error(), Code: codeRefused}, -1)
	uc.Close()
}

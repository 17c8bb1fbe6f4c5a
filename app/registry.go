package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mtcp-dev/mtcp/internal/ucred"
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

	frames frameCount // of all the application connections

	mu       sync.Mutex
	services map[string]*appConn
	apps     map[*appConn]struct{}
}

// NewRegistry returns a Registry that logs to logger (nil discards).
func NewRegistry(logger *slog.Logger) *Registry {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Registry{log: logger, services: map[string]*appConn{}, apps: map[*appConn]struct{}{}, frames: frameCount{n: map[string]int{}}}
}

// appConn is one application's connection to the registry. Fields after
// done are guarded by Registry.mu.
type appConn struct {
	r    *Registry
	mc   *msgConn
	pid  int
	done chan struct{} // closed when the connection is gone
	// freezing is held (read) while the daemon freezes a socket the
	// application exported (Exported.Claim), and taken by sever before
	// the link closes: the application, which resumes an exported socket
	// that is not frozen once its link is gone, then finds it frozen,
	// or never to be. severed (guarded by it) makes later claims fail.
	freezing sync.RWMutex
	severed  bool

	version int // negotiated at registration
	service string
	// ready is set, under r.mu, as the application is told it is
	// registered (with the connection's writes held until that answer is
	// out): before, its service is reserved but not served, so that no
	// request reaches it ahead of its "registered".
	ready   bool
	conns   map[Tuple]struct{}
	pending map[uint64]*call // requests awaiting their answer, by id
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
		owner, ok := ucred.FileOwner(ln.Addr().String())
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
		apps := slices.Collect(maps.Keys(r.apps))
		r.mu.Unlock()
		for _, a := range apps {
			a.sever()
		}
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
		pid, uid, err := ucred.Peer(uc)
		if err == nil && !allow(uid) {
			err = fmt.Errorf("%w: uid %d (pid %d) may not connect; only root and the socket's owner may", ErrPeerRefused, uid, pid)
		}
		if err != nil {
			r.log.Warn("refused an application connection", "err", err)
			refuseConn(uc, err)
			continue
		}
		mc := newMsgConn(uc)
		mc.frames = &r.frames
		a := &appConn{
			r: r, mc: mc, pid: pid, done: make(chan struct{}),
			conns: map[Tuple]struct{}{}, pending: map[uint64]*call{},
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
	a.stopClaims()
	r.mu.Lock()
	delete(r.apps, a)
	if a.service != "" && r.services[a.service] == a {
		delete(r.services, a.service)
	}
	a.conns = map[Tuple]struct{}{}
	a.pending = map[uint64]*call{}
	close(a.done)
	r.mu.Unlock()
	a.mc.close()
	a.mc.dropFDs()
}

// stopClaims waits for the freezes of the application's sockets under way
// (Exported.Claim) and keeps any from starting: then the link may close.
func (a *appConn) stopClaims() {
	a.freezing.Lock()
	a.severed = true
	a.freezing.Unlock()
}

// sever closes the link to the application once no freeze of one of its
// sockets is under way, and keeps any from starting.
func (a *appConn) sever() {
	a.stopClaims()
	a.mc.close()
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
			ts := m.Tuples
			if m.Tuple != nil {
				ts = append(ts, *m.Tuple)
			}
			if len(fds) > 0 || len(ts) == 0 || slices.ContainsFunc(ts, func(t Tuple) bool { return !t.valid() }) || m.Service != a.service {
				return fmt.Errorf("%w: bad %s message (service %q, tuple %v, %d tuples)", ErrProtocol, m.Type, m.Service, m.Tuple, len(m.Tuples))
			}
			r.mu.Lock()
			for _, t := range ts {
				if m.Type == msgOpened {
					a.conns[t] = struct{}{}
				} else {
					delete(a.conns, t)
				}
			}
			r.mu.Unlock()
		case msgExported, msgImported, msgFinished, msgExportedMany, msgImportedMany, msgFinishedMany:
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
		a.mc.write(&message{Type: msgError, Error: err.Error(), Code: code})
		return err
	}
	// A version-1 application sends only "version".
	hi := max(m.Version, m.MaxVersion)
	switch {
	case len(fds) > 0 || m.Type != msgRegister:
		return refuse(codeGeneric, fmt.Errorf("%w: the first message must be a registration, got %q", ErrProtocol, m.Type))
	case m.Version > protocolVersion || hi < minProtocolVersion:
		return refuse(codeGeneric, fmt.Errorf("%w: protocol versions %d to %d, this daemon speaks %d to %d: use matching mtcp versions", ErrProtocol, m.Version, hi, minProtocolVersion, protocolVersion))
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
	a.version = min(hi, protocolVersion)
	r.services[m.Service] = a
	r.mu.Unlock()
	// Served from when the answer goes out: a request for the service
	// waits for the connection's writes, which the answer holds, so it
	// cannot reach the application first.
	if err := a.mc.writeFirst(&message{Type: msgRegistered, Service: m.Service, Version: a.version}, func() {
		r.mu.Lock()
		a.ready = true
		r.mu.Unlock()
	}); err != nil {
		return err
	}
	a.mc.bin.Store(a.version >= binVersion)
	r.log.Info("application registered", "service", m.Service, "pid", a.pid, "pid_claimed", m.PID, "protocol", a.version)
	return nil
}

// app returns the application registered for service.
func (r *Registry) app(service string) (*appConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.services[service]
	if a == nil || !a.ready {
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
	for s, a := range r.services {
		if !a.ready {
			continue
		}
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
	if a == nil || !a.ready {
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

// PIDs returns the process IDs of the registered applications (as
// SO_PEERCRED gave them when each connected).
func (r *Registry) PIDs() map[int]bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[int]bool, len(r.services))
	for _, a := range r.services {
		out[a.pid] = true
	}
	return out
}

// NumConns returns how many connections the applications of all services
// report: what len of every service's Conns would sum to, without
// building and sorting the lists.
func (r *Registry) NumConns() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, a := range r.services {
		n += len(a.conns)
	}
	return n
}

// refuseConn tells a refused peer why, without waiting for it, and
// closes the connection.
func refuseConn(uc *net.UnixConn, err error) {
	mc := newMsgConn(uc)
	mc.write(&message{Type: msgError, Error: err.Error(), Code: codeRefused})
	uc.Close()
}

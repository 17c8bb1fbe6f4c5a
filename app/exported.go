package app

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"
)

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
	Socket *Socket
	// Snapshot is the application's per-connection state.
	Snapshot []byte

	a  *appConn
	id uint64

	mu       sync.Mutex
	claimed  bool          // a Finish or FinishMany is deciding it
	finished chan struct{} // closed once decided; err is set then
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
//
// Export is ExportMany for one connection.
func (r *Registry) Export(ctx context.Context, service string, t Tuple) (*Exported, error) {
	exps, errs := r.ExportMany(ctx, service, []Tuple{t})
	return exps[0], errs[0]
}

// ExportMany asks service's application to give up the connections ts in
// batched requests. It returns one entry per tuple: exps[i] != nil where
// exported, errs[i] != nil where not (wrapping ErrNoConn etc. like
// Export). Each exported connection waits for its Finish (or FinishMany).
//
// The application interrupts all the handlers at once and sends the
// connections as they become ready. If ctx ends first, ExportMany returns
// those it got and the context's error for the others; the application
// resumes the ones it exports later. A version-1 application gets one
// request per connection, all sent before the first answer is awaited.
func (r *Registry) ExportMany(ctx context.Context, service string, ts []Tuple) (exps []*Exported, errs []error) {
	exps = make([]*Exported, len(ts))
	errs = make([]error, len(ts))
	a, err := r.app(service)
	if err != nil {
		for i, t := range ts {
			errs[i] = fmt.Errorf("mtcp registry: export %s: %w", t.norm(), err)
		}
		return exps, errs
	}
	b := &batch{kind: kindExport, service: service, items: make([]item, len(ts))}
	norm := make([]Tuple, len(ts))
	for i, t := range ts {
		norm[i] = t.norm()
		b.items[i] = item{ID: r.nextID.Add(1), Tuple: &norm[i]}
	}
	failed := a.run(ctx, b, func(k int, it *item, fd int) {
		t := norm[k]
		if fd < 0 {
			errs[k] = fmt.Errorf("mtcp registry: export %s of service %s (pid %d): %w", t, service, a.pid, remoteError(it.Error, it.Code))
			return
		}
		exps[k] = &Exported{
			Tuple: t, Service: service, Snapshot: it.Snapshot,
			Socket: newSocket(fd),
			a:      a, id: it.ID, finished: make(chan struct{}),
		}
		r.log.Debug("exported", "service", service, "conn", t, "snapshot_bytes", len(it.Snapshot))
	})
	for k, err := range failed {
		errs[k] = fmt.Errorf("mtcp registry: export %s of service %s: %w", norm[k], service, err)
	}
	return exps, errs
}

// run posts b and collects its answers: each gets every answered item;
// the result holds why the others were not answered.
func (a *appConn) run(ctx context.Context, b *batch, each func(k int, it *item, fd int)) map[int]error {
	calls, errs := a.post(b, false)
	failed := a.collect(ctx, calls, each)
	for k, err := range errs {
		if err != nil {
			failed[k] = err
		}
	}
	return failed
}

// Claim keeps the application's link to this registry from being
// dropped while the caller freezes e.Socket (TCP_REPAIR): an application
// whose link is gone resumes an exported socket that it finds not
// frozen, and must not find it so just before it is frozen. It fails,
// wrapping ErrAppGone, once the application has disconnected: its socket
// must then be left alone. Otherwise call release once the freeze is
// done or has failed, and soon: the registry cannot drop the application
// meanwhile.
func (e *Exported) Claim() (release func(), err error) {
	e.a.freezing.RLock()
	if e.a.severed {
		e.a.freezing.RUnlock()
		return nil, fmt.Errorf("mtcp registry: connection %s of service %s: %w", e.Tuple, e.Service, ErrAppGone)
	}
	return e.a.freezing.RUnlock, nil
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
//
// Finish is FinishMany for one export.
func (e *Exported) Finish(ctx context.Context, committed bool) error {
	return FinishMany(ctx, []*Exported{e}, committed)[0]
}

// FinishMany tells the applications the outcome of every export in exps
// (nil entries are skipped), batched per application link, and waits for
// their acknowledgements. It returns one error per entry. An Exported
// finished this way is finished (a later Finish returns the same result);
// one that is already finished, or being finished by another call, gets
// that call's result. See Finish.
func FinishMany(ctx context.Context, exps []*Exported, committed bool) []error {
	errs := make([]error, len(exps))
	v := verdictResume
	if committed {
		v = verdictGone
	}
	// Claim the exports nobody decided yet, grouped by application.
	groups := map[*appConn][]int{}
	var others []int // decided or being decided elsewhere (or twice in exps)
	for i, e := range exps {
		if e == nil {
			continue
		}
		e.mu.Lock()
		if e.claimed {
			others = append(others, i)
		} else {
			e.claimed = true
			groups[e.a] = append(groups[e.a], i)
		}
		e.mu.Unlock()
	}
	var wg sync.WaitGroup
	for a, idx := range groups {
		wg.Go(func() {
			b := &batch{kind: kindVerdict, verdict: v, items: make([]item, len(idx))}
			for k, i := range idx {
				b.items[k] = item{ID: exps[i].id}
			}
			failed := a.run(ctx, b, func(k int, it *item, fd int) {
				if it.Error != "" {
					errs[idx[k]] = fmt.Errorf("the application answered: %s", it.Error)
				}
			})
			for k, err := range failed {
				if committed && errors.Is(err, ErrAppGone) {
					continue // its descriptor is closed anyway
				}
				errs[idx[k]] = err
			}
			// A connection that moved is not the application's any more,
			// whatever became of the verdict: it does not report one it
			// is told is gone, and may never hear of it.
			a.r.mu.Lock()
			for _, i := range idx {
				if committed {
					delete(a.conns, exps[i].Tuple)
				}
			}
			a.r.mu.Unlock()
			for _, i := range idx {
				e := exps[i]
				if errs[i] != nil {
					errs[i] = fmt.Errorf("mtcp registry: tell %s of service %s %q: %w", e.Tuple, e.Service, v, errs[i])
				}
				e.err = errs[i]
				close(e.finished)
			}
		})
	}
	wg.Wait()
	for _, i := range others {
		select {
		case <-exps[i].finished:
			errs[i] = exps[i].err
		case <-ctx.Done():
			errs[i] = fmt.Errorf("mtcp registry: %s of service %s is being finished by another call: %w", exps[i].Tuple, exps[i].Service, context.Cause(ctx))
		}
	}
	return errs
}

// ExportAll exports every connection of service (to drain it). It
// returns the connections it got, each pending Finish, and an error
// joining the failures; a connection that closes meanwhile is not a
// failure. max is ignored: the connections go in batches (it bounded the
// concurrent exports of earlier versions).
func (r *Registry) ExportAll(ctx context.Context, service string, max int) ([]*Exported, error) {
	if _, err := r.app(service); err != nil {
		return nil, fmt.Errorf("mtcp registry: export all of %s: %w", service, err)
	}
	out, errs := r.ExportMany(ctx, service, r.Conns(service))
	for i, err := range errs {
		if errors.Is(err, ErrNoConn) {
			errs[i] = nil
		}
	}
	return slices.DeleteFunc(out, func(e *Exported) bool { return e == nil }), errors.Join(errs...)
}

// Import hands a live connection, socket and snapshot, to the application
// registered for service, which serves it with its Handler. The
// application gets its own descriptor: the caller still owns socket and
// closes it after Import returns. The socket must be a connected TCP
// socket out of repair mode.
//
// If ctx ends before the application acknowledges, Import returns an
// error but the application may still adopt the connection.
//
// Import is ImportMany for one socket.
func (r *Registry) Import(ctx context.Context, service string, socket syscall.Conn, snapshot []byte) error {
	return r.ImportMany(ctx, service, []syscall.Conn{socket}, [][]byte{snapshot})[0]
}

// TCPOptions are a connection's TCP_NODELAY and keepalive settings.
// The application adopts an imported socket with net.FileConn, which
// turns TCP_NODELAY on and keepalive on (15 s idle, 15 s between probes,
// 9 probes, like every connection Go makes); given the connection's own
// settings with [WithTCPOptions], it puts them back.
type TCPOptions struct {
	NoDelay   bool
	KeepAlive bool
	// KeepIdle, KeepInterval (in whole seconds, at most 32767) and
	// KeepCount (at most 127) matter with KeepAlive; zero means Go's
	// default (15 s, 15 s, 9).
	KeepIdle, KeepInterval time.Duration
	KeepCount              int
}

// wire returns o as an item carries it: nil for Go's defaults, which the
// application's socket has already.
func (o TCPOptions) wire() *tcpOpts {
	w := &tcpOpts{NoDelay: o.NoDelay, KeepAlive: o.KeepAlive}
	if o.KeepAlive {
		w.Idle = uint32(min(max(o.KeepIdle/time.Second, 0), maxKeepSecs))
		w.Intvl = uint32(min(max(o.KeepInterval/time.Second, 0), maxKeepSecs))
		w.Count = uint32(min(max(o.KeepCount, 0), maxKeepCount))
	}
	if *w == (tcpOpts{NoDelay: true, KeepAlive: true, Idle: goKeepSecs, Intvl: goKeepSecs, Count: goKeepCount}) {
		return nil
	}
	return w
}

// Go's keepalive settings for every connection it wraps.
const (
	goKeepSecs  = 15
	goKeepCount = 9
)

// WithTCPOptions returns socket, for Import and ImportMany, with the
// connection's TCP options attached: the application (one built with
// this version of the package) sets them on the connection it adopts.
func WithTCPOptions(socket syscall.Conn, o TCPOptions) syscall.Conn { return withTCP{socket, o} }

// withTCP is a socket with its TCP options (WithTCPOptions).
type withTCP struct {
	syscall.Conn
	o TCPOptions
}

// ImportMany hands sockets with their snapshots to service's application
// in batched messages and returns one error per socket. The sockets are
// *os.File, *net.TCPConn, [*Socket] or anything else that gives access to
// its descriptor, each possibly wrapped by [WithTCPOptions]; ImportMany
// does not close them. See Import.
func (r *Registry) ImportMany(ctx context.Context, service string, socks []syscall.Conn, snaps [][]byte) []error {
	errs := make([]error, len(socks))
	fail := func(i int, err error) {
		errs[i] = fmt.Errorf("mtcp registry: import into %s: %w", service, err)
	}
	if len(snaps) != len(socks) {
		for i := range socks {
			fail(i, fmt.Errorf("%d sockets but %d snapshots", len(socks), len(snaps)))
		}
		return errs
	}
	a, err := r.app(service)
	if err != nil {
		for i := range socks {
			fail(i, err)
		}
		return errs
	}
	b := &batch{kind: kindImport, service: service}
	var pos []int // position in socks of each item of b
	for i, f := range socks {
		var rc syscall.RawConn
		switch {
		case len(snaps[i]) > MaxSnapshot:
			fail(i, fmt.Errorf("snapshot of %d bytes, the limit is %d", len(snaps[i]), MaxSnapshot))
			continue
		case f == nil:
			fail(i, errors.New("no socket"))
			continue
		}
		// The descriptors are lent as they are for the duration of the
		// send: Fd would switch them to blocking mode, under the feet of
		// any other process holding them.
		var tcp *tcpOpts
		if w, ok := f.(withTCP); ok {
			f = w.Conn
			if a.version >= tcpVersion {
				tcp = w.o.wire()
			}
		}
		if rc, err = f.SyscallConn(); err != nil {
			fail(i, err)
			continue
		}
		b.items = append(b.items, item{ID: r.nextID.Add(1), Snapshot: snaps[i], TCP: tcp})
		b.socks = append(b.socks, rc)
		pos = append(pos, i)
	}
	failed := a.run(ctx, b, func(k int, it *item, fd int) {
		if it.Error != "" {
			fail(pos[k], fmt.Errorf("the application (pid %d) refused: %s", a.pid, it.Error))
		}
	})
	for k, err := range failed {
		fail(pos[k], err)
	}
	return errs
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
)

// Daemon is one running mtcpd.
type Daemon struct {
	cfg  *Config
	log  *slog.Logger
	tls  *peer.Config
	nat  *nat.Table
	q    *nat.Queue
	apps *app.Registry
	// inject sends restored sockets the segments their restore needs
	// from the peer, for every restore here (one set of raw sockets).
	inject *repair.Injector
	// txs counts the migrations under way (connection and process
	// mode): a stopping daemon waits for them once it has cancelled
	// them, as their rollback (a thaw, a switch back) needs its
	// services.
	txs sync.WaitGroup
	// stopping is cancelled when the daemon starts to stop, with the
	// admin requests: for work started in the background, such as
	// recoverUnconfirmed.
	stopping context.Context
	txMu     sync.Mutex
	txClosed bool // no migration may start: the daemon waits for txs

	peersMu sync.Mutex
	peers   map[string]*peerConn

	mu sync.Mutex
	// moved are the flows migrated in and living here, by local tuple:
	// their Flow keeps the address the client dialled.
	moved map[app.Tuple]migrate.Flow
	// adopted are the moved flows their application has taken: once it
	// stops reporting one, the connection has ended.
	adopted map[app.Tuple]bool
	// missing counts the reaper's sweeps that did not see a moved flow.
	missing map[app.Tuple]int
	// unseen counts the slow sweeps that did not find the socket of a
	// flow no application reports (reapUnclaimed); the reaper's alone.
	unseen map[app.Tuple]int
	// restoring are transfers restored here, waiting for commit or abort.
	restoring map[uint64]*incoming
	// commits are the commits done here (or under way) in the last
	// CommitMemory, so that a commit its source asks for again (its
	// answer lost) gets the same answer rather than "no transfer".
	commits map[uint64]*commitRecord
	// laters are the discards running drains keep for their ends.
	laters map[*laterDiscards]struct{}
	// ending are the rules of ended connections left to remove
	// (reap.go).
	ending map[migrate.Flow]*endingRules
	// openHolds are the holds this steering point made, for a peer or
	// for itself, and has not yet switched or lifted (expire.go).
	openHolds map[migrate.Flow]openHold
	// holdMu orders a hold made and recorded (steerLocal) against
	// expireHolds' choice of the holds to lift and their lifting, so
	// that it never lifts a newer hold of the same flow.
	holdMu sync.Mutex
	// steered are the flows this steering point has switched, with
	// where they went and who asked (steerauth.go).
	steered map[migrate.Flow]steered

	// movedFile, with gateway steering, is where moved is written down
	// (movedfile.go); movedDirty says it changed.
	movedFile  string
	movedDirty chan struct{}
	// blanks are sockets made ahead of restores, by family.
	blanks map[bool][]*repair.Blank
	// blankWant is how many blanks of each family the goroutine making
	// them aims at; it runs while blankWant exceeds what is made.
	blankWant map[bool]int
	// blanksClosed is set at shutdown: no more blanks are kept.
	blanksClosed bool
	// frozen are flows captured here, waiting for the verdict.
	frozen map[migrate.Flow]*outgoing
	txSeq  uint64

	// proc is process mode's state (process.go).
	proc *procMode

	// pol is the policy engine and the load measurements (policy.go).
	pol *policyState
	// tlsFiles reloads the TLS files (tlsreload.go).
	tlsFiles *tlsReload
}

// Run starts the daemon and serves until ctx is done.
func Run(ctx context.Context, cfg *Config, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Daemon{cfg: cfg, log: log, peers: map[string]*peerConn{},
		moved: map[app.Tuple]migrate.Flow{}, adopted: map[app.Tuple]bool{}, missing: map[app.Tuple]int{}, unseen: map[app.Tuple]int{}, restoring: map[uint64]*incoming{}, commits: map[uint64]*commitRecord{}, laters: map[*laterDiscards]struct{}{}, openHolds: map[migrate.Flow]openHold{}, ending: map[migrate.Flow]*endingRules{}, steered: map[migrate.Flow]steered{},
		blanks: map[bool][]*repair.Blank{}, blankWant: map[bool]int{}, frozen: map[migrate.Flow]*outgoing{}}
	d.proc = newProcMode()
	d.movedFile, d.movedDirty = movedPath(cfg), make(chan struct{}, 1)
	var err error
	files := peer.TLSFiles{CA: cfg.TLS.CA, Cert: cfg.TLS.Cert, Key: cfg.TLS.Key}
	if d.tls, err = files.Config(cfg.Name); err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}
	d.tlsFiles = newTLSReload(files, cfg.Name, d.tls, log.With("part", "peer"))
	// One connection's state can reach 2 × repair.MaxQueueLen: a frame
	// must hold at least that. Batches are split to fit (remoteTarget).
	d.tls.MaxFrame = 2*repair.MaxQueueLen + 1<<20
	d.tls.Log = log.With("part", "peer")
	// Only the configured peers: a pool CA certificate alone (a member
	// taken out of the pool, another CA's during a rotation) is not
	// enough.
	d.tls.Members = func(name string) bool { _, ok := cfg.Peer(name); return ok }
	if d.pol, err = newPolicyState(cfg, log); err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}

	// Claim what is this daemon's alone first: the admin socket, the
	// listeners and the queue. Another mtcpd started by mistake with the
	// same configuration then stops here, before it touches the nftables
	// table, the holds or the application socket of the one running.
	if cfg.Role == "server" {
		// Before the admin socket, which would make a shared directory
		// root-only: an application may run as the app socket's owner.
		if err := os.MkdirAll(filepath.Dir(cfg.AppSocket), 0o755); err != nil {
			return fmt.Errorf("mtcpd: app socket: %w", err)
		}
	}
	orphanAfter, err := faultDuration("orphan-after")
	if err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}
	unclaimedEvery, err := faultDuration("unclaimed-reap")
	if err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}
	if unclaimedEvery == 0 {
		unclaimedEvery = UnclaimedReapInterval
	}
	grace, err := faultDuration("shutdown-grace")
	if err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}
	if grace == 0 {
		grace = ShutdownGrace
	}
	adm, err := admin.Listen(cfg.AdminSocket)
	if err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}
	defer adm.Close() // removes the socket file too
	pln, err := net.Listen("tcp", cfg.PeerListen)
	if err != nil {
		return fmt.Errorf("mtcpd: peer listener: %w", err)
	}
	defer pln.Close()
	var mln net.Listener
	if cfg.Metrics != "" {
		if mln, err = net.Listen("tcp", cfg.Metrics); err != nil {
			return fmt.Errorf("mtcpd: metrics listener: %w", err)
		}
		defer mln.Close()
	}
	natOpts := nat.Options{Table: cfg.Table, Queue: cfg.NFQueue, Idle: cfg.FlowIdle, InjectMark: cfg.Marks.Inject, QuietMark: cfg.Marks.Quiet}
	if d.q, err = nat.OpenQueue(natOpts); err != nil {
		return fmt.Errorf("mtcpd: nfqueue: %w", err)
	}
	defer d.q.Close()
	var aln *net.UnixListener
	if cfg.Role == "server" {
		if aln, err = admin.ListenFresh(cfg.AppSocket, "app socket"); err != nil {
			return fmt.Errorf("mtcpd: %w", err)
		}
		defer aln.Close() // removes the socket file too
	}

	if d.nat, err = nat.Open(natOpts); err != nil {
		return fmt.Errorf("mtcpd: nftables: %w", err)
	}
	defer d.nat.Close()
	var unfinished []*procJournal
	if cfg.Role == "server" {
		unfinished = d.leftCheckpoints() // before the peer server can start a migration
	}
	if err := d.reconcile(unfinished); err != nil {
		return fmt.Errorf("mtcpd: reconcile nftables: %w", err)
	}
	if d.inject, err = repair.NewInjector(cfg.Marks.repair()); err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	}
	defer d.inject.Close()

	// The services run until the admin requests under way when the
	// daemon is told to stop have finished (see ShutdownGrace).
	stopping := ctx
	ctx, cancel := context.WithCancel(context.WithoutCancel(stopping))
	defer cancel()
	policyCtx, stopPolicy := context.WithCancel(ctx)
	defer stopPolicy()
	var wg sync.WaitGroup
	errc := make(chan error, 16) // one per serve, at most
	serve := func(name string, fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", name, err)
				cancel()
			}
		}()
	}

	var ph peer.Handler = d
	if delay, err := peerDelay(); err != nil {
		return fmt.Errorf("mtcpd: %w", err)
	} else if delay > 0 {
		log.Warn("fault injected: peers answer as if far away", "one_way", delay)
		ph = distant{d, delay}
	}
	serve("peer server", func() error { return peer.NewServer(d.tls, ph).Serve(ctx, pln) })

	if cfg.Role == "server" {
		d.apps = app.NewRegistry(log.With("part", "apps"))
		serve("app registry", func() error { return d.apps.Serve(ctx, aln) })
	}

	// The admin requests have their own context, cancelled before the
	// services' (see the end of Run).
	reqCtx, cancelRequests := context.WithCancel(ctx)
	d.stopping = reqCtx
	defer cancelRequests()
	hs := admin.NewServer(reqCtx, d.adminHandler())
	serve("admin", func() error {
		if err := hs.Serve(adm); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	if mln != nil {
		ms := &http.Server{Handler: metricsHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
		serve("metrics", func() error { return ms.Serve(mln) })
		go func() { <-ctx.Done(); ms.Close() }()
	}
	serve("expiry", func() error { d.expire(ctx, orphanAfter); return nil })
	// Without its reader, the queue neither releases nor takes in held
	// packets: no migration can end and every held flow stalls. Stop, so
	// that the supervisor starts mtcpd again, whose reconcile lifts the
	// holds left behind.
	serve("nfqueue", func() error {
		select {
		case <-ctx.Done():
			return nil
		case <-d.q.Done():
			return fmt.Errorf("the reader stopped: %w", d.q.Err())
		}
	})
	if d.movedFile != "" {
		serve("moved-in file", func() error { d.saveMoved(ctx); return nil })
	}
	serve("heartbeats", func() error { d.heartbeats(ctx); return nil })
	serve("policy", func() error { d.runPolicy(policyCtx); return nil })
	if d.apps != nil {
		serve("reaper", func() error { d.reap(ctx, unclaimedEvery); return nil })
		serve("rule refresh", func() error { d.refresh(ctx); return nil })
		if len(unfinished) > 0 {
			serve("process recovery", func() error { d.recoverProcesses(ctx, unfinished); return nil })
		}
		go d.checkCRIU(ctx)
		defer d.dropIncoming()
	}
	log.Info("mtcpd running", "name", cfg.Name, "role", cfg.Role, "steering", cfg.Steering, "peer_listen", cfg.PeerListen, "admin", cfg.AdminSocket)

	select {
	case <-stopping.Done():
		// A migration or drain under way finishes rather than stop
		// half-way (a process left stopped at the source, or a lazy
		// one's pages cut off on the target); nothing new starts.
		stopPolicy()
		log.Info("stopping: letting the admin requests under way finish", "grace", grace)
		sctx, scancel := context.WithTimeout(context.Background(), grace)
		if err := hs.Shutdown(sctx); err != nil {
			log.Warn("stopping: admin requests still under way after the grace are cancelled", "err", err)
		}
		scancel()
	case <-ctx.Done(): // a service failed
	}
	// Cancelled, the migrations under way roll back (or, past their
	// switch, finish): with the services still running, which a thaw,
	// an abort or a switch back needs.
	cancelRequests()
	stopPolicy()
	hs.Close()
	d.waitMigrations(log, rollbackWait)
	cancel()
	wg.Wait()
	d.closePeers()
	d.mu.Lock()
	for _, bs := range d.blanks {
		for _, b := range bs {
			b.Close()
		}
	}
	clear(d.blanks)
	d.blanksClosed = true
	d.mu.Unlock()
	close(errc)
	var errs []error
	for err := range errc {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ShutdownGrace is how long a stopping mtcpd lets the admin requests under
// way (migrations, drains) finish before it cancels them.
const ShutdownGrace = 30 * time.Second

// rollbackWait bounds how long a stopping mtcpd waits, once it has
// cancelled the migrations under way, for them to end (the phases'
// deadlines bound each step of a rollback: an abort, a thaw, a switch
// back).
const rollbackWait = 30 * time.Second

// beginMigration counts a migration starting in d.txs; ok is false once
// the daemon is stopping (none may start then).
func (d *Daemon) beginMigration() (done func(), ok bool) {
	d.txMu.Lock()
	defer d.txMu.Unlock()
	if d.txClosed {
		return nil, false
	}
	d.txs.Add(1)
	return d.txs.Done, true
}

// errStopping refuses a migration asked for while mtcpd stops.
var errStopping = errors.New("mtcpd is stopping")

// waitMigrations lets no migration start any more and waits up to max for
// those under way (d.txs).
func (d *Daemon) waitMigrations(log *slog.Logger, max time.Duration) {
	d.txMu.Lock()
	d.txClosed = true
	d.txMu.Unlock()
	done := make(chan struct{})
	go func() {
		d.txs.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(max):
		log.Warn("stopping: migrations still under way after their cancellation; leaving them", "waited", max)
	}
}

// reconcile clears what a previous run may have left: holds (nothing is
// migrating at start; a hold left in place would black-hole its flow),
// but those of the process migrations it left unfinished (the recovery
// lifts or switches them: lifted now, segments would reach the stopped
// process's sockets, which would acknowledge them), and reply rewrites of
// sockets that no longer exist here. What the lifted holds queued since
// this run opened the queue goes on. Forward entries stay:
// connections living on other servers still need them (their idle timeout
// removes the dead ones).
//
// A reply rewrite whose socket lives on is a connection that migrated in
// before the restart: it is remembered as such again, with the address
// its client dialled, so that it is listed, migrated on and reaped as one.
func (d *Daemon) reconcile(unfinished []*procJournal) error {
	conns, err := repair.List(context.Background(), repair.ListOptions{})
	if err != nil {
		return err
	}
	live := map[app.Tuple]bool{}
	for _, c := range conns {
		live[app.Tuple{Local: unmapAP(c.Local), Remote: unmapAP(c.Remote)}] = true
	}
	keepHeld := map[nat.Flow]bool{}
	for _, j := range unfinished {
		for _, f := range j.flows {
			keepHeld[natFlow(f)] = true
		}
	}
	var in, fwd []nat.Entry
	var lifted []nat.Flow
	err = d.nat.Reconcile(func(e nat.Entry) bool {
		switch e.Kind {
		case nat.KindHold:
			if keepHeld[e.Flow] {
				return true
			}
			lifted = append(lifted, e.Flow)
			return false
		case nat.KindReplyFrom:
			if !live[replyTuple(e)] {
				return false
			}
			in = append(in, e)
		case nat.KindForward:
			fwd = append(fwd, e)
		}
		return true
	})
	d.relearnSteered(fwd)
	if len(lifted) > 0 {
		if _, rerr := d.q.Release(lifted...); rerr != nil {
			d.log.Warn("sending on what the holds a previous run left had queued", "flows", len(lifted), "err", rerr)
		}
	}
	// Not adopted yet: the reaper marks each one once its application
	// reports it (a process migration's sockets also have reply
	// rewrites, but no application).
	d.mu.Lock()
	for _, e := range in {
		d.moved[replyTuple(e)] = migrate.Flow{Client: e.Flow.Client, Service: e.Flow.Service}
	}
	d.mu.Unlock()
	n := len(in)
	if d.movedFile != "" {
		m, lerr := d.loadMoved(live)
		if lerr != nil {
			d.log.Warn("cannot read back the connections that migrated in before a restart", "file", d.movedFile, "err", lerr)
		}
		n += m
	}
	if n > 0 {
		d.log.Info("found connections that migrated in before a restart", "conns", n)
	}
	return err
}

// replyTuple is the local socket's tuple of a reply rewrite entry.
func replyTuple(e nat.Entry) app.Tuple {
	port := e.LocalPort
	if port == 0 {
		port = e.Flow.Service.Port()
	}
	return app.Tuple{Local: netip.AddrPortFrom(e.Addr, port), Remote: e.Flow.Client}
}

// ownAddr returns this host's service address of f's family.
func (d *Daemon) ownAddr(v6 bool) (netip.Addr, error) {
	a, ok := d.cfg.ServiceAddr(v6)
	if !ok {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		return a, fmt.Errorf("%s has no %s service address (service_addrs)", d.cfg.Name, fam)
	}
	return a, nil
}

// owner returns the peer whose service addresses include a ("" for this
// host).
func (d *Daemon) owner(a netip.Addr) (string, bool) {
	for _, o := range d.cfg.ServiceAddrs {
		if o == a {
			return "", true
		}
	}
	for _, p := range d.cfg.Peers {
		for _, o := range p.ServiceAddrs {
			if o == a {
				return p.Name, true
			}
		}
	}
	return "", false
}

func (d *Daemon) nextTx() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.txSeq++
	return uint64(time.Now().UnixNano())<<8 | d.txSeq&0xff
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/criu"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
)

// procIn is a process migration arriving here.
type procIn struct {
	from     string
	name     string
	dir      string     // the checkpoint (tmpfs)
	pages    chan error // the pages stream's outcome, once
	started  bool       // a pages stream was opened
	restore  bool       // its restore was asked for (d.proc.mu): once only
	pid      int        // the restored process, once restored and until it is reaped (d.proc.mu)
	rules    []nat.Flow // flows given a reply rewrite here (d.proc.mu)
	finished bool       // ProcessFinish ended it (d.proc.mu)
	askedAt  time.Time  // when its restore was asked for (d.proc.mu)
	flows    map[app.Tuple]migrate.Flow
	restored map[app.Tuple]bool // every connection, as restored here (d.proc.mu)
	expire   *time.Timer        // discards the migration if the source vanishes

	// A lazy (post-copy) migration: the pages stream is handed to a
	// lazy-pages daemon, which lives on after the restore until the
	// process has all its memory.
	lazy     bool
	lazyConn chan net.Conn   // the pages stream, from ProcessPages to ProcessRestore
	lazyEnd  chan struct{}   // closed when the stream is no longer needed
	lp       *criu.LazyPages // the daemon, once started
	lazyErr  error           // its outcome, once lazyEnd is closed
	endOnce  sync.Once
}

// endLazy releases the pages stream of a lazy migration with its outcome.
func (in *procIn) endLazy(err error) {
	in.endOnce.Do(func() {
		in.lazyErr = err
		close(in.lazyEnd)
	})
}

// clockMargin is added to the age of a checkpoint when the restored
// connections' timestamp clocks are moved forward: it covers the time from
// that adjustment to the moment CRIU sets each clock during the restore,
// and the request's transit. Running ahead costs nothing; lagging behind
// the source's last retransmission makes the client drop segments.
const clockMargin = time.Second

// procInTimeout bounds how long a migration may stay unfinished here.
const procInTimeout = 2 * time.Minute

func (d *Daemon) procIn(tx uint64, from string) (*procIn, error) {
	d.proc.mu.Lock()
	defer d.proc.mu.Unlock()
	in, ok := d.proc.in[tx]
	switch {
	case !ok:
		return nil, fmt.Errorf("no process migration %d waiting on %s", tx, d.cfg.Name)
	case in.from != from:
		return nil, fmt.Errorf("process migration %d on %s belongs to %s, not %s", tx, d.cfg.Name, in.from, from)
	}
	return in, nil
}

// ProcessPrepare makes room for a process coming from a peer.
func (d *Daemon) ProcessPrepare(ctx context.Context, from string, r *peer.ProcessPrepareRequest) error {
	if d.apps == nil {
		return fmt.Errorf("%s is a gateway, not a server", d.cfg.Name)
	}
	if _, err := criu.Check(ctx, d.criuOpts()); err != nil {
		return err
	}
	if r.Lazy {
		if err := criu.CheckLazyRestore(ctx, d.criuOpts()); err != nil {
			return err
		}
	}
	dir, err := d.imageDir("in")
	if err != nil {
		return err
	}
	in := &procIn{from: from, name: r.Name, dir: dir, pages: make(chan error, 1),
		lazy: r.Lazy, lazyConn: make(chan net.Conn, 1), lazyEnd: make(chan struct{})}
	d.proc.mu.Lock()
	if _, dup := d.proc.in[r.TxID]; dup {
		d.proc.mu.Unlock()
		os.RemoveAll(dir)
		return fmt.Errorf("process migration %d is already under way on %s", r.TxID, d.cfg.Name)
	}
	d.proc.in[r.TxID] = in
	in.expire = time.AfterFunc(procInTimeout, func() {
		d.ProcessFinish(context.Background(), from, &peer.ProcessFinishRequest{TxID: r.TxID, Reason: "no commit within " + procInTimeout.String()})
	})
	d.proc.mu.Unlock()
	return nil
}

// ProcessPages receives the memory pages of a migration (the page images
// of the source's dump).
func (d *Daemon) ProcessPages(ctx context.Context, from string, tx uint64, conn net.Conn) error {
	in, err := d.procIn(tx, from)
	if err != nil {
		return err
	}
	d.proc.mu.Lock()
	if in.started {
		d.proc.mu.Unlock()
		return fmt.Errorf("process migration %d already has a pages stream", tx)
	}
	in.started = true
	d.proc.mu.Unlock()
	if in.lazy {
		// The stream stays open for the lazy-pages daemon that the
		// restore starts, until it has every page.
		in.lazyConn <- conn
		<-in.lazyEnd
		return in.lazyErr
	}
	if err := fault(ctx, "pages-in"); err != nil { // pages-in-hang: the images are never read (tests)
		return err
	}
	// The pages come within the migration's own bound, or not at all:
	// a source that stops sending must not keep this reader for ever.
	conn.SetDeadline(time.Now().Add(procInTimeout))
	// The page images land where the restore reads them, as long as
	// they leave the machine room (a tmpfs is memory): each file is
	// checked against the room left now, less what the files other
	// migrations are writing meanwhile have announced.
	var total, writing uint64
	done := func() {
		d.proc.mu.Lock()
		d.proc.writing -= writing
		d.proc.mu.Unlock()
		writing = 0
	}
	_, err = peer.ReceiveFiles(conn, conn, in.dir, func(name string, size uint64) error {
		done() // the file before is written
		if !criu.ValidImageName(name) || !criu.IsPagesImage(name) {
			return errors.New("not a memory page image")
		}
		total += size
		d.proc.mu.Lock()
		defer d.proc.mu.Unlock()
		room, err := criu.Room(in.dir)
		if err != nil {
			return err
		}
		if others := d.proc.writing; size+others > uint64(room) {
			return fmt.Errorf("the process's memory (%d MiB so far) does not fit in %s on %s: %d MiB free, less a reserve of %d%% of its size, and %d MiB being written by other migrations",
				total>>20, filepath.Dir(in.dir), d.cfg.Name, room>>20, criu.RoomReservePercent, others>>20)
		}
		d.proc.writing += size
		writing = size
		return nil
	})
	done()
	in.pages <- err
	return err
}

// ProcessRestore writes the images next to the pages, rewrites the
// sockets' local address to this host's, installs the reply rewrites and
// restores the process.
func (d *Daemon) ProcessRestore(ctx context.Context, from string, r *peer.ProcessRestoreRequest) (*peer.ProcessRestoreReply, error) {
	in, err := d.procIn(r.TxID, from)
	if err != nil {
		return nil, err
	}
	d.proc.mu.Lock()
	again := in.restore
	in.restore, in.askedAt = true, time.Now()
	d.proc.mu.Unlock()
	if again {
		// A second restore would start a second copy of the process.
		return nil, fmt.Errorf("process migration %d: its restore was asked for already", r.TxID)
	}
	rep := &peer.ProcessRestoreReply{}
	if delay, err := faultDuration("restore-delay"); err != nil {
		return nil, err
	} else if delay > 0 {
		time.Sleep(delay)
		if d.procUpdate(in, func() {}) {
			return nil, errAbortedMeanwhile
		}
	}
	t0 := time.Now()
	if r.Age < 0 {
		return nil, fmt.Errorf("process migration %d: negative checkpoint age %v", r.TxID, r.Age)
	}
	// CRIU starts while the images are written and the rules go in.
	pr, err := criu.PrepareRestore(d.criuOpts())
	if err != nil {
		return nil, err
	}
	defer pr.Close()
	d.proc.mu.Lock()
	started := in.started
	d.proc.mu.Unlock()
	var pagesConn net.Conn
	if in.lazy {
		select {
		case pagesConn = <-in.lazyConn:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the pages stream: %w", ctx.Err())
		}
	} else if started {
		select {
		case err := <-in.pages:
			if err != nil {
				return nil, fmt.Errorf("receiving the pages: %w", err)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the pages: %w", ctx.Err())
		}
	}
	rep.Wait = time.Since(t0)
	for _, f := range r.Files {
		if !criu.ValidImageName(f.Name) {
			return nil, fmt.Errorf("refusing image file name %q", f.Name)
		}
		path := filepath.Join(in.dir, f.Name)
		if _, err := os.Lstat(path); err == nil {
			return nil, fmt.Errorf("image file %q sent twice", f.Name)
		}
		if err := os.WriteFile(path, f.Data, 0o600); err != nil {
			return nil, err
		}
	}
	rewrite := map[netip.Addr]netip.Addr{}
	for _, a := range r.Rewrite {
		a = a.Unmap()
		if own, ok := d.cfg.ServiceAddr(a.Is6()); ok && own != a {
			rewrite[a] = own
		}
	}
	if err := d.checkProcessFlows(ctx, r.Flows, rewrite); err != nil {
		return nil, err
	}
	if rep.Rewritten, err = criu.Rewrite(in.dir, rewrite); err != nil {
		return nil, err
	}
	// The stopped source's sockets retransmit with their live timestamp
	// clocks until the source kills them: the restored clocks must not
	// start behind those.
	if _, err := criu.AdvanceClocks(in.dir, r.Age+time.Since(t0)+clockMargin); err != nil {
		return nil, err
	}
	// Restored, the process is this daemon's child: a restart of the
	// daemon must not be the parent death it was told to die of.
	if _, err := criu.ClearDeathSignals(in.dir); err != nil {
		return nil, err
	}
	// The reply rewrites go in before the restore: the restored sockets
	// send (a window probe when they leave repair mode) at once, and a
	// segment from this host's own address would make the client answer
	// with a RST.
	var b nat.Batch
	var rules []nat.Flow
	flows, restored := map[app.Tuple]migrate.Flow{}, map[app.Tuple]bool{}
	for _, pf := range r.Flows {
		f := migrate.Flow{Client: pf.Flow.Client, Service: pf.Flow.Service}
		local := restoredLocal(pf, rewrite)
		restored[app.Tuple{Local: unmapAP(local), Remote: unmapAP(f.Client)}] = true
		if local.Addr().Unmap() != f.Service.Addr().Unmap() {
			b.ReplyFrom(natFlow(f), local)
			rules = append(rules, natFlow(f))
			flows[app.Tuple{Local: local, Remote: f.Client}] = f
		}
	}
	d.proc.mu.Lock()
	in.flows, in.restored = flows, restored
	d.proc.mu.Unlock()
	if b.Len() > 0 {
		if err := d.nat.Apply(&b); err != nil {
			return nil, fmt.Errorf("installing reply rewrites: %w", err)
		}
		if d.procUpdate(in, func() { in.rules = rules }) {
			return nil, errors.Join(errAbortedMeanwhile, d.undoRestore(in))
		}
	}
	prepared := time.Since(t0)
	if in.lazy {
		lp, err := criu.StartLazyPages(ctx, criu.LazyOptions{Dir: in.dir, Conn: pagesConn})
		if err != nil {
			in.endLazy(err)
			return nil, err
		}
		d.proc.mu.Lock()
		in.lp = lp
		d.proc.mu.Unlock()
	}
	lazyStarted := time.Since(t0) - prepared
	if d.procUpdate(in, func() {}) {
		// Aborted meanwhile (without rewrites, not looked at above).
		return nil, errors.Join(errAbortedMeanwhile, d.undoRestore(in))
	}
	res, err := pr.Run(ctx, criu.RestoreOptions{Options: d.criuOpts(), Dir: in.dir, Lazy: in.lazy})
	if err != nil {
		if in.lp != nil {
			in.lp.Kill()
			in.endLazy(err)
		}
		return nil, err
	}
	rep.PID, rep.Restore = res.PID, res.Took
	aborted := d.procUpdate(in, func() { in.pid = res.PID })
	// The restored process is this daemon's child (CRIU's restore
	// sibling): reap it when it exits, and forget its pid then, which
	// may be another process's next.
	if p, err := os.FindProcess(res.PID); err == nil {
		go func() {
			p.Wait()
			d.procUpdate(in, func() {
				if in.pid == res.PID {
					in.pid = 0
				}
			})
		}()
	}
	if aborted {
		// The source gave up (its deadline) while CRIU restored: what
		// the restore made goes, as the abort would have done.
		return nil, errors.Join(errAbortedMeanwhile, d.undoRestore(in))
	}
	if in.lp != nil {
		// The process runs; its pages keep coming until it has them all,
		// for up to lazyPagesTimeout, and the commit comes after the
		// last one: the migration's time here is longer by as much (its
		// pages stopping end it sooner, below).
		if in.expire.Stop() {
			in.expire.Reset(lazyPagesTimeout + procInTimeout)
		}
		go func() {
			wctx, cancel := context.WithTimeout(context.Background(), lazyPagesTimeout)
			defer cancel()
			err := fault(wctx, "target-pages") // target-pages-refuse: the pages stop coming (tests)
			if err == nil {
				err = in.lp.Wait(wctx)
			}
			if err == nil {
				err = fault(wctx, "target-pages-end") // target-pages-end-refuse: they stop at the end (tests)
			}
			st := in.lp.Stats()
			d.log.Info("process migration: memory pages in place", "from", from, "tx", r.TxID, "err", err, "pages", st.Pages,
				"faults", st.Faults, "fault_wait_mean", st.FaultWait/time.Duration(max(st.Faults, 1)), "fault_wait_max", st.FaultWaitMax, "processes", st.Processes)
			if err != nil {
				// Without its pages the process cannot go on (a
				// failed lazy-pages daemon keeps it waiting on them,
				// rather than let it read zeros): better dead than
				// corrupt. Its rules and itself go, silently, as the
				// source's copy carries on.
				if kerr := d.undoRestore(in); kerr != nil {
					d.log.Warn("process migration: removing the restored process", "from", from, "tx", r.TxID, "pid", res.PID, "err", kerr)
				}
				d.log.Error("process migration: the memory pages stopped coming; the restored process is killed, without a word to its clients (the source's copy may carry on with them)",
					"from", from, "tx", r.TxID, "pid", res.PID, "err", err)
			}
			in.endLazy(err)
			if err != nil {
				// Its source is gone or gave up: the migration ends
				// here, with its rules and images, as an abort (a
				// commit would have come after the last page).
				d.ProcessFinish(context.Background(), from, &peer.ProcessFinishRequest{TxID: r.TxID, Reason: "the memory pages stopped coming"})
			}
		}()
	}
	if err := fault(ctx, "restored"); err != nil { // restored-hang: the answer is lost (tests)
		return nil, err
	}
	d.log.Info("process restored", "from", from, "tx", r.TxID, "name", in.name, "pid", res.PID, "conns", len(r.Flows), "rewritten", rep.Rewritten,
		"prepare", prepared, "lazy_pages_start", lazyStarted, "restore", res.Took, "lazy", in.lazy)
	return rep, nil
}

// ProcessFinish commits a migration (the process stays, its connections'
// rewrites are remembered) or aborts it (the restored process is killed
// after its rewrites are gone, so that what it sends on dying cannot
// reach the client as the service).
func (d *Daemon) ProcessFinish(ctx context.Context, from string, r *peer.ProcessFinishRequest) error {
	d.proc.mu.Lock()
	in, ok := d.proc.in[r.TxID]
	if ok && in.from != from {
		d.proc.mu.Unlock()
		return fmt.Errorf("process migration %d on %s belongs to %s, not %s", r.TxID, d.cfg.Name, in.from, from)
	}
	if lost, _ := faultDuration("process-finish-unanswered"); ok && lost > 0 && ctx.Done() != nil && !in.askedAt.IsZero() && time.Since(in.askedAt) < lost {
		// (Peers' requests only: this daemon's own, from its expiry
		// or its pages' end, cannot be cancelled.)
		// Tests: the commit or abort is lost on the way, unanswered.
		d.proc.mu.Unlock()
		<-ctx.Done()
		return ctx.Err()
	}
	delete(d.proc.in, r.TxID)
	now := time.Now()
	for tx, o := range d.proc.ended {
		if now.Sub(o.at) > outcomeKeep {
			delete(d.proc.ended, tx)
		}
	}
	ended, known := d.proc.ended[r.TxID]
	if ok {
		in.finished = true
		d.proc.ended[r.TxID] = procOutcome{from: from, committed: r.Commit, at: now}
	}
	if ok && r.Commit {
		for t, f := range in.flows {
			d.proc.flows[t] = f
		}
	}
	d.proc.mu.Unlock()
	switch {
	case !ok && known && ended.from != from:
		return fmt.Errorf("process migration %d on %s belongs to %s, not %s", r.TxID, d.cfg.Name, ended.from, from)
	case !ok && known && ended.committed && r.Commit:
		return nil // asked again: the answer to the first commit was lost
	case !ok && known && ended.committed:
		// An abort after the commit must not let the source resume
		// its copy: the process runs here.
		return fmt.Errorf("process migration %d on %s: %s: its process runs here", r.TxID, d.cfg.Name, endedCommitted)
	case !ok && known && r.Commit:
		return fmt.Errorf("no process migration %d on %s to commit: %s (its pages stopped coming, or no commit within %v): its process is gone", r.TxID, d.cfg.Name, endedAborted, procInTimeout)
	case !ok && r.Commit:
		// Unknown: ended here long ago, or before a restart of this
		// daemon, whose restored processes it no longer manages.
		return fmt.Errorf("no process migration %d on %s to commit: unknown here (ended more than %v ago, or before mtcpd restarted)", r.TxID, d.cfg.Name, outcomeKeep)
	case !ok:
		return nil
	}
	in.expire.Stop()
	defer os.RemoveAll(in.dir)
	d.proc.mu.Lock()
	lp := in.lp
	d.proc.mu.Unlock()
	if r.Commit && lp != nil {
		// The source commits once it has sent every page: the
		// lazy-pages daemon is done, or about to exit.
		select {
		case <-in.lazyEnd:
		case <-ctx.Done():
			d.undoRestore(in) // the process, then its daemon
			<-in.lazyEnd
		}
		if in.lazyErr != nil {
			// The pages stopped coming all the same (or the commit
			// waited too long for the last): the process was killed
			// for it, and the migration ends as an abort, which
			// the source is told so that its copy carries on.
			d.proc.mu.Lock()
			d.proc.ended[r.TxID] = procOutcome{from: from, at: now}
			for t := range in.flows {
				delete(d.proc.flows, t)
			}
			d.proc.mu.Unlock()
			return errors.Join(fmt.Errorf("process migration %d on %s: %s: its memory pages stopped coming (%v): its process is gone", r.TxID, d.cfg.Name, endedAborted, in.lazyErr),
				d.undoRestore(in))
		}
	}
	if in.lazy {
		// An abort: its daemon goes with the process (undoRestore).
		in.endLazy(errors.New("the migration ended"))
	}
	if r.Commit {
		return nil
	}
	err := d.undoRestore(in)
	d.log.Info("process migration aborted", "from", from, "tx", r.TxID, "reason", r.Reason)
	return err
}

// procOutcome is how a migration that arrived here ended.
type procOutcome struct {
	from      string
	committed bool
	at        time.Time
}

// outcomeKeep is how long a target remembers how a migration ended:
// longer than a source asks again, a restarted source's recovery
// included.
const outcomeKeep = 30 * time.Minute

// The target's answers to a finish of a migration it has ended, for the
// source to tell them apart: committed (its process runs on the target),
// aborted (it is gone).
const (
	endedCommitted = "already committed"
	endedAborted   = "already aborted"
)

// procUpdate records what a restore made (set runs under d.proc.mu) and
// reports whether the migration was ended meanwhile (ProcessFinish), in
// which case the restore undoes it.
func (d *Daemon) procUpdate(in *procIn, set func()) (finished bool) {
	d.proc.mu.Lock()
	defer d.proc.mu.Unlock()
	set()
	return in.finished
}

// errAbortedMeanwhile: the source ended a migration while its restore
// was under way here.
var errAbortedMeanwhile = errors.New("the migration was aborted while the process was being restored")

// checkProcessFlows refuses the connections of a process restore that no
// connection of the pool can have (checkFlow), and those whose socket, as
// restored here (its local address rewritten), exists on this host
// already: their reply rewrites would replace that connection's, and an
// undo would remove them.
func (d *Daemon) checkProcessFlows(ctx context.Context, flows []peer.ProcessFlow, rewrite map[netip.Addr]netip.Addr) error {
	want := map[app.Tuple]migrate.Flow{}
	ports := map[uint16]bool{}
	for _, pf := range flows {
		f := migrate.Flow{Client: pf.Flow.Client, Service: pf.Flow.Service}
		if err := d.checkFlow(f); err != nil {
			return err
		}
		local := unmapAP(restoredLocal(pf, rewrite))
		want[app.Tuple{Local: local, Remote: unmapAP(f.Client)}] = f
		ports[local.Port()] = true
	}
	for port := range ports {
		conns, err := repair.List(ctx, repair.ListOptions{Port: port, States: allStates})
		if err != nil {
			return fmt.Errorf("listing the connections on port %d: %w", port, err)
		}
		for _, c := range conns {
			if f, ok := want[app.Tuple{Local: unmapAP(c.Local), Remote: unmapAP(c.Remote)}]; ok {
				return fmt.Errorf("flow %v: %s has that connection already (%v, %v)", f, d.cfg.Name, c.Local, c.State)
			}
		}
	}
	return nil
}

// restoredLocal is the local address a process flow's socket has once
// restored here: the source's, or this host's that rewrite puts in its
// place.
func restoredLocal(pf peer.ProcessFlow, rewrite map[netip.Addr]netip.Addr) netip.AddrPort {
	if to, ok := rewrite[pf.Local.Addr().Unmap()]; ok {
		return netip.AddrPortFrom(to, pf.Local.Port())
	}
	return pf.Local
}

// undoRestore removes what the restore of an aborted migration made:
// its reply rewrites; the restored process, killed after them (so that
// what it sends on dying cannot reach the client as the service) and
// without a word to its clients (see killQuietly); then, for a lazy
// migration, its lazy-pages daemon, which keeps a process that faults on
// a missing page waiting until then (its pages would read as zeros).
// Each is taken once. (An abort while CRIU restores lets the pages go
// before the process is known: the restore, which needs some of them,
// then ends, and its process is killed at once, its rewrites gone.)
func (d *Daemon) undoRestore(in *procIn) error {
	d.proc.mu.Lock()
	rules, pid, restored, lp := in.rules, in.pid, in.restored, in.lp
	in.rules, in.pid = nil, 0
	d.proc.mu.Unlock()
	var errs []error
	if len(rules) > 0 {
		var b nat.Batch
		for _, f := range rules {
			b.Remove(f)
		}
		errs = append(errs, d.nat.Apply(&b))
	}
	if pid > 0 {
		errs = append(errs, killQuietly(context.Background(), pid, restored))
	}
	if lp != nil {
		lp.Kill()
	}
	return errors.Join(errs...)
}

// killQuietly kills the restored process pid and its descendants, and
// waits for them to die. Its connections that the migration brought
// (restored: their tuples here) are first put into repair mode, in which
// closing them sends nothing. A FIN or RST from this copy would end its
// clients' connections, which the source's copy, carrying on when a
// migration is undone, still serves (those that exchanged no data here
// meanwhile; the others are broken either way). Its other connections end
// as a death ends them. The tree is stopped first, so that it closes
// nothing meanwhile. A process already gone is not an error.
func killQuietly(ctx context.Context, pid int, restored map[app.Tuple]bool) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tree, err := treeOf(pid)
	if err != nil {
		return nil
	}
	var errs []error
	in := map[int]bool{}
	for _, p := range tree {
		in[p] = true
		errs = append(errs, signal(p, syscall.SIGSTOP))
	}
	conns, err := repair.List(ctx, repair.ListOptions{Owners: true, OwnersAmong: tree})
	errs = append(errs, err)
	for _, c := range conns {
		if !restored[app.Tuple{Local: c.Local, Remote: c.Remote}] {
			continue
		}
		i := slices.IndexFunc(c.Owners, func(o repair.Owner) bool { return in[o.PID] })
		if i < 0 {
			continue
		}
		// Frozen through a copy of the descriptor, and left so when
		// the copy is closed: the process's own keeps the socket.
		f, err := repair.TakeFD(c.Owners[i].PID, c.Owners[i].FD)
		if err == nil {
			_, err = repair.Freeze(f)
			f.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("silencing connection %v->%v: %w", c.Remote, c.Local, err))
		}
	}
	for _, p := range tree {
		errs = append(errs, signal(p, syscall.SIGKILL))
	}
	errs = append(errs, waitDead(tree, 5*time.Second))
	return errors.Join(errs...)
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/criu"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
)

// Process mode: a whole process moves with CRIU (see criu/ and the peer
// package's Process messages). The transaction, from the source:
//
//	prepare   the target makes a directory (tmpfs) and checks its CRIU
//	hold      the process's connections are held at their steering points
//	          (NFQUEUE, as in connection mode: packets wait, none is lost)
//	freeze,   CRIU freezes and dumps the process to tmpfs, left stopped
//	dump      with its sockets in repair mode
//	transfer  the memory pages stream to the target (a second connection),
//	          the other images and the connections follow; the target
//	          rewrites the sockets' local address to its own, installs the
//	          reply-source rewrites (before the process can send) and
//	restore   restores the process (its sockets leave repair mode there)
//	switch    the steering points send the connections to the target and
//	          re-deliver the held packets
//	commit    the stopped source is killed (sockets in repair mode close
//	          silently), its rules go; the target keeps the process.
//
// Any failure before the switch aborts: the target kills what it restored
// and removes its rules, the source's sockets leave repair mode, the
// process gets SIGCONT and the held packets are re-delivered to it.

// procMode is the daemon's process-mode state.
type procMode struct {
	mu sync.Mutex
	// flows are the connections of processes restored here whose socket
	// address differs from the address their client dialled, by local
	// tuple.
	flows map[app.Tuple]migrate.Flow
	// in are the migrations arriving here, by transaction.
	in map[uint64]*procIn
	// leaving are the processes migrating away from here, by pid, with
	// the peer each goes to: a process moves in one migration at a time.
	leaving map[int]string
	// ended are the migrations that arrived here and ended, with how,
	// for outcomeKeep: a finish asked again (its answer was lost) gets
	// the same answer, not "unknown".
	ended map[uint64]procOutcome
	// writing is the size of the page image files incoming migrations
	// are writing to the checkpoint file system, announced and not
	// written yet.
	writing uint64
}

func newProcMode() *procMode {
	return &procMode{flows: map[app.Tuple]migrate.Flow{}, in: map[uint64]*procIn{}, leaving: map[int]string{}, ended: map[uint64]procOutcome{}}
}

// leave marks the processes of tree as migrating to peer to, unless one of
// them already is; the function it returns unmarks them.
func (p *procMode) leave(tree []int, to string) (done func(), err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pid := range tree {
		if other, ok := p.leaving[pid]; ok {
			return nil, fmt.Errorf("process %d is already migrating to %s", pid, other)
		}
	}
	for _, pid := range tree {
		p.leaving[pid] = to
	}
	return func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, pid := range tree {
			delete(p.leaving, pid)
		}
	}, nil
}

// criuOpts is how the daemon runs CRIU.
func (d *Daemon) criuOpts() criu.Options { return criu.Options{} }

// checkCRIU logs, at start, whether process mode can work here.
func (d *Daemon) checkCRIU(ctx context.Context) {
	v, err := criu.Check(ctx, d.criuOpts())
	if err != nil {
		d.log.Warn("process mode (CRIU) unavailable; connection mode works without it", "err", err)
		return
	}
	if d.cfg.ProcessPages == "lazy" {
		// A lazy migration's target needs userfaultfd.
		if err := criu.CheckLazyRestore(ctx, d.criuOpts()); err != nil {
			d.log.Warn("process mode: lazy migrations (process_pages: lazy) will fail here", "criu", v.String(), "err", err)
			return
		}
	}
	d.log.Info("process mode available", "criu", v.String(), "pages", d.cfg.ProcessPages)
}

// imageBase is where checkpoints go: a tmpfs when there is one, as the
// images are read once, right away, and must not outlive a reboot.
func imageBase() string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

// imageDir makes a directory for a checkpoint arriving (kind "in") or
// leaving (kind "out"), named after this daemon so that its next start
// finds what a crash left (leftCheckpoints).
func (d *Daemon) imageDir(kind string) (string, error) {
	return os.MkdirTemp(imageBase(), checkpointPrefix(kind, d.cfg.Name, d.cfg.AdminSocket))
}

// checkpointPrefix names the checkpoint directories of the daemon name
// whose admin socket is adminSocket: several daemons of one name may
// share a machine's /dev/shm (test beds in network namespaces).
func checkpointPrefix(kind, name, adminSocket string) string {
	return fmt.Sprintf("mtcp-%s-%s-%08x-", kind, name, crc32.ChecksumIEEE([]byte(adminSocket)))
}

// CheckpointGlob matches the process-mode checkpoint directories, arriving
// or leaving, of the daemon name whose admin socket is adminSocket.
func CheckpointGlob(name, adminSocket string) string {
	return filepath.Join(imageBase(), checkpointPrefix("*", name, adminSocket)+"*")
}

// dropIncoming removes the image directories of the process migrations
// still arriving here as the daemon stops.
func (d *Daemon) dropIncoming() {
	d.proc.mu.Lock()
	defer d.proc.mu.Unlock()
	for _, in := range d.proc.in {
		os.RemoveAll(in.dir)
	}
}

// procSocket is one TCP connection of a migrating process.
type procSocket struct {
	conn  repair.Conn
	owner repair.Owner // one descriptor of the process that holds it
	flow  migrate.Flow
}

// treeOf returns pid and its descendants.
func treeOf(pid int) ([]int, error) {
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
		return nil, fmt.Errorf("no process %d on this server", pid)
	}
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp := ppidOf(p); pp > 0 {
			children[pp] = append(children[pp], p)
		}
	}
	tree := []int{pid}
	for i := 0; i < len(tree); i++ {
		tree = append(tree, children[tree[i]]...)
	}
	return tree, nil
}

// ppidOf reads the parent of pid from /proc (0 if it cannot).
func ppidOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	pp, _ := strconv.Atoi(f[1])
	return pp
}

func commOf(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

// listenerOwner finds the process that owns the TCP listener on port: the
// root of the owners' tree when several processes share it (workers).
func listenerOwner(ctx context.Context, port uint16) (int, error) {
	ls, err := repair.List(ctx, repair.ListOptions{States: []repair.TCPState{repair.StateListen}, Owners: true, Port: port})
	if err != nil {
		return 0, err
	}
	var owners []repair.Owner
	for _, l := range ls {
		owners = append(owners, l.Owners...)
	}
	slices.SortFunc(owners, func(a, b repair.Owner) int { return a.PID - b.PID })
	if o, ok := eldestOwner(owners); ok {
		return o.PID, nil
	}
	return 0, fmt.Errorf("no process listens on TCP port %d on this server", port)
}

// procSockets lists the TCP connections of the tree and the flows they
// are, refusing connections that cannot move.
func (d *Daemon) procSockets(ctx context.Context, tree []int) ([]procSocket, error) {
	in := map[int]bool{}
	for _, p := range tree {
		in[p] = true
	}
	conns, err := repair.List(ctx, repair.ListOptions{Owners: true})
	if err != nil {
		return nil, err
	}
	var out []procSocket
	for _, c := range conns {
		var mine, others []repair.Owner
		for _, o := range c.Owners {
			if in[o.PID] {
				mine = append(mine, o)
			} else {
				others = append(others, o)
			}
		}
		if len(mine) == 0 {
			continue
		}
		if len(others) > 0 {
			return nil, fmt.Errorf("connection %v->%v is shared with process %d (%s) outside the migrating process", c.Remote, c.Local, others[0].PID, others[0].Comm)
		}
		if err := c.Migratable(); err != nil {
			return nil, fmt.Errorf("connection %v->%v cannot move: %w", c.Remote, c.Local, err)
		}
		if c.Remote.Addr().IsLoopback() || d.isOwnAddr(c.Remote.Addr()) {
			return nil, fmt.Errorf("connection %v->%v is local to this server: a process talking to its own host cannot move", c.Remote, c.Local)
		}
		t := app.Tuple{Local: c.Local, Remote: c.Remote}
		d.proc.mu.Lock()
		f, ok := d.proc.flows[t]
		d.proc.mu.Unlock()
		if !ok {
			// Came here before a restart of this daemon, which found
			// it again from its reply rewrite (reconcile) but could
			// not tell a process's connection from an application's:
			// it is this process's.
			d.mu.Lock()
			if f, ok = d.moved[t]; ok {
				delete(d.moved, t)
				delete(d.adopted, t)
				d.movedChanged()
			}
			d.mu.Unlock()
			if ok {
				d.proc.mu.Lock()
				d.proc.flows[t] = f
				d.proc.mu.Unlock()
			}
		}
		if !ok {
			f = migrate.Flow{Client: c.Remote, Service: c.Local}
		}
		out = append(out, procSocket{conn: c, owner: mine[0], flow: f})
	}
	return out, nil
}

func (d *Daemon) isOwnAddr(a netip.Addr) bool {
	p, ok := d.owner(a.Unmap())
	return ok && p == ""
}

// errAcceptedMeanwhile is the error of a process migration undone
// because the process accepted connections after its sockets were
// listed, before its dump.
var errAcceptedMeanwhile = errors.New("the process accepted connections while it was being checkpointed")

// acceptRetries is how many attempts MigrateProcess makes at a process
// migration that keeps finding connections accepted during its dump
// (errAcceptedMeanwhile); the last one goes through without them.
const acceptRetries = 3

// acceptedSince returns the connections the processes of tree hold that
// are not among socks (by socket inode): those accepted since socks were
// listed; and how many connections wait in the queues of the tree's
// listeners, not accepted yet. Only the tree's descriptors are read.
func acceptedSince(ctx context.Context, tree []int, socks []procSocket) (accepted []procSocket, queued int, err error) {
	conns, err := repair.List(ctx, repair.ListOptions{States: append([]repair.TCPState{repair.StateListen}, allStates...), Owners: true, OwnersAmong: tree})
	if err != nil {
		return nil, 0, err
	}
	known := make(map[uint64]bool, len(socks))
	for _, s := range socks {
		known[s.conn.Inode] = true
	}
	listening := map[netip.AddrPort]bool{}
	for _, c := range conns {
		if c.State == repair.StateListen && len(c.Owners) > 0 {
			listening[c.Local] = true
		}
	}
	for _, c := range conns {
		switch {
		case c.State == repair.StateListen:
		case len(c.Owners) > 0 && !known[c.Inode]:
			accepted = append(accepted, procSocket{conn: c, owner: c.Owners[0], flow: migrate.Flow{Client: c.Remote, Service: c.Local}})
		case c.Inode == 0 && c.State == repair.StateEstablished && (listening[c.Local] || listening[netip.AddrPortFrom(unspecified(c.Local.Addr()), c.Local.Port())]):
			// A child of a listener, not accepted yet, has no file.
			queued++
		}
	}
	return accepted, queued, nil
}

// unspecified is the wildcard address of a's family, as a listener bound
// to every address has it.
func unspecified(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

func flowsOf(socks []procSocket) []migrate.Flow {
	out := make([]migrate.Flow, len(socks))
	for i, s := range socks {
		out[i] = s.flow
	}
	return out
}

// MigrateProcess moves a whole process to the peer r.To, reporting each
// finished phase to progress. It returns the report; Error is set when
// the process stayed here.
func (d *Daemon) MigrateProcess(ctx context.Context, r *admin.ProcessRequest, progress func(admin.ProcessPhase)) *admin.ProcessReport {
	rep := &admin.ProcessReport{To: r.To, PID: r.PID, Phases: []admin.ProcessPhase{}}
	end, ok := d.beginMigration()
	if !ok {
		rep.Error = errStopping.Error()
		return rep
	}
	defer end()
	start := time.Now()
	phase := func(name string, took time.Duration) {
		p := admin.ProcessPhase{Name: name, Took: took}
		rep.Phases = append(rep.Phases, p)
		processPhaseSeconds.WithLabelValues(name).Observe(took.Seconds())
		if progress != nil {
			progress(p)
		}
	}
	var err error
	for attempt := 1; ; attempt++ {
		t0 := time.Now()
		err = d.migrateProcess(ctx, r, rep, phase, attempt == acceptRetries)
		// The last attempt ends the loop whatever its error: one CRIU
		// refused for queued connections all the same (a socket
		// SkipInFlight does not cover) is not tried again.
		if !errors.Is(err, errAcceptedMeanwhile) || attempt == acceptRetries || ctx.Err() != nil {
			break
		}
		d.log.Info("process migration: starting again", "pid", rep.PID, "to", r.To, "err", err)
		// The report is the last attempt's, after a retry phase for
		// each attempt before it.
		retries := slices.DeleteFunc(rep.Phases, func(p admin.ProcessPhase) bool { return p.Name != admin.PhaseRetry })
		*rep = admin.ProcessReport{To: r.To, PID: r.PID, Phases: retries}
		phase(admin.PhaseRetry, time.Since(t0))
	}
	switch {
	case errors.Is(err, errCommitUnconfirmed), errors.Is(err, errAbortUnconfirmed):
		rep.Error = err.Error()
		processMigrations.WithLabelValues("unconfirmed").Inc()
		d.log.Warn("process migration: the target did not answer; ending it in the background", "pid", rep.PID, "to", r.To, "err", err)
	case err != nil:
		rep.Aborted = true
		rep.Error = err.Error()
		processMigrations.WithLabelValues("aborted").Inc()
		d.log.Warn("process migration aborted", "pid", rep.PID, "to", r.To, "err", err)
	default:
		processMigrations.WithLabelValues("moved").Inc()
		processPauseSeconds.Observe(rep.Pause.Seconds())
		d.log.Info("process migrated", "pid", rep.PID, "new_pid", rep.NewPID, "to", r.To, "conns", rep.Conns, "pause", rep.Pause, "took", time.Since(start))
	}
	return rep
}

func (d *Daemon) migrateProcess(ctx context.Context, r *admin.ProcessRequest, rep *admin.ProcessReport, phase func(string, time.Duration), last bool) error {
	if d.apps == nil {
		return fmt.Errorf("%s is a gateway, not a server", d.cfg.Name)
	}
	if r.To == d.cfg.Name {
		return fmt.Errorf("the process is already on %s", r.To)
	}
	pcfg, ok := d.cfg.Peer(r.To)
	if !ok {
		return fmt.Errorf("%q is not a peer of %s", r.To, d.cfg.Name)
	}
	if (r.PID > 0) == (r.Port > 0) {
		return errors.New("give exactly one of a pid and a port")
	}
	if _, err := criu.Check(ctx, d.criuOpts()); err != nil {
		return err
	}
	lazy := d.cfg.ProcessPages == "lazy"
	rep.Lazy = lazy
	pid := r.PID
	if r.Port > 0 {
		var err error
		if pid, err = listenerOwner(ctx, r.Port); err != nil {
			return err
		}
	}
	rep.PID = pid
	if pid == os.Getpid() || pid == 1 {
		return fmt.Errorf("process %d cannot be migrated", pid)
	}
	rep.Command = commOf(pid)
	tree, err := treeOf(pid)
	if err != nil {
		return err
	}
	done, err := d.proc.leave(tree, r.To)
	if err != nil {
		return err
	}
	// handedOff: a commit or an abort went unanswered, and the mark as
	// leaving and the checkpoint's journal go to recoverUnconfirmed.
	handedOff := false
	defer func() {
		if !handedOff {
			done()
		}
	}()
	socks, err := d.procSockets(ctx, tree)
	if err != nil {
		return err
	}
	rep.Conns = len(socks)
	flows := flowsOf(socks)
	if delay, err := faultDuration("listed-delay"); err == nil && delay > 0 {
		time.Sleep(delay) // tests: a wider window for connections accepted now
	}

	c, err := d.peer(ctx, r.To)
	if err != nil {
		return err
	}
	tx := d.nextTx()
	t0 := time.Now()
	if err := c.ProcessPrepare(ctx, &peer.ProcessPrepareRequest{TxID: tx, Name: rep.Command, Lazy: lazy}); err != nil {
		return fmt.Errorf("prepare on %s: %w", r.To, err)
	}
	// From here on the target holds state for tx: abort it on failure.
	finish := func(reason string) error {
		// (An answer later than this hands the migration to the
		// recovery, below: slower, still safe.)
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		err := c.ProcessFinish(fctx, &peer.ProcessFinishRequest{TxID: tx, Reason: reason})
		if err != nil {
			d.log.Warn("process migration: aborting on the target", "to", r.To, "err", err)
		}
		return err
	}
	pages, err := peer.DialPages(ctx, pcfg.Addr, r.To, d.tls, tx)
	if err != nil {
		finish(err.Error())
		return err
	}
	defer pages.Close()
	dir, err := d.imageDir("out")
	if err != nil {
		finish(err.Error())
		return err
	}
	defer func() {
		if !handedOff {
			os.RemoveAll(dir)
		}
	}()
	// CRIU starts before the hold: its start-up is not spent while the
	// connections wait.
	pd, err := criu.PrepareDump(criu.DumpOptions{Options: d.criuOpts(), PID: pid, Dir: dir, LeaveStopped: true, Lazy: lazy, SkipInFlight: last})
	if err != nil {
		finish(err.Error())
		return err
	}
	defer pd.Close()
	// From the hold on, a daemon that dies leaves the process to its
	// next start: the journal says how far the migration got.
	j, err := newJournal(dir, r.To, tx, lazy, t0, tree, socks)
	if err == nil {
		err = j.write(journalHeld)
	}
	if err != nil {
		finish(err.Error())
		return err
	}
	phase("prepare", time.Since(t0))

	holdStart := time.Now()
	if len(flows) > 0 {
		hctx, hcancel := context.WithTimeout(ctx, procHoldDeadline)
		err := (steering{d}).Hold(hctx, flows)
		hcancel()
		if err != nil {
			(steering{d}).Unhold(context.WithoutCancel(ctx), flows)
			finish(err.Error())
			return fmt.Errorf("hold: %w", err)
		}
	}
	phase(admin.PhaseHold, time.Since(holdStart))
	// In a lazy migration this host serves the pages from the stopped
	// process until the target has them all, past the switch: the
	// outcome arrives here.
	var lazyDone <-chan error
	// restoreAsked: the target may have a copy of the process.
	restoreAsked := false
	// abort lets the process carry on here.
	abort := func(cause error) error {
		ferr := finish(cause.Error())
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if lazyDone != nil {
			// The target has gone, or will: closing the stream ends
			// the serving of its pages.
			pages.Close()
			select {
			case <-lazyDone:
			case <-actx.Done():
			}
		}
		gone := strings.Contains(cause.Error(), endedAborted) // the target said so
		if ferr != nil && restoreAsked && !gone && !errors.As(ferr, new(*peer.RemoteError)) {
			// No answer: the target may run a copy, restored and
			// alive, and the copy here must not run beside it. The
			// recovery of a daemon restarted at this point takes
			// over, in the background (see recoverUnconfirmed); the
			// journal says to undo, whatever phase it was in.
			if err := j.write(journalAborting); err != nil {
				d.log.Error("process migration: the target did not answer the abort, and the journal cannot say so; resuming here", "err", err)
			} else if d.recoverUnconfirmed(dir, done) {
				handedOff = true
				return fmt.Errorf("%w: %w (%w)", errAbortUnconfirmed, ferr, cause)
			}
		}
		err := errors.Join(thawTree(tree, socks), (steering{d}).Unhold(actx, flows))
		if err != nil {
			d.log.Error("process migration: resuming the source", "pid", pid, "err", err)
		}
		return errors.Join(cause, err)
	}

	dumpStart := time.Now()
	dctx, dcancel := context.WithTimeout(ctx, procDumpDeadline)
	res, err := pd.Run(dctx)
	dcancel()
	if errors.Is(err, criu.ErrInFlight) {
		// Connections wait in a listener's queue: the process goes on
		// here and accepts them, and MigrateProcess starts again.
		err = fmt.Errorf("%w: %w", errAcceptedMeanwhile, err)
	}
	if err == nil {
		// A connection the process accepted after its sockets were
		// listed is in the checkpoint, but nothing holds or switches
		// it: its client would be reset. The process goes on here
		// instead, with every connection, and MigrateProcess starts
		// the migration again; but the last attempt goes through,
		// without them and without those still in a listener's queue
		// (SkipInFlight).
		var extra []procSocket
		var queued int
		if extra, queued, err = acceptedSince(ctx, tree, socks); err == nil && (len(extra) > 0 || queued > 0) {
			if last {
				rep.Unmoved = len(extra) + queued
				d.log.Warn("process migration: connections the process accepted, or had queued, during its dump do not move; their clients will be reset", "pid", pid, "accepted", len(extra), "queued", queued, "attempts", acceptRetries)
			} else {
				socks = append(socks, extra...) // for abort to thaw them too
				j.addSockets(extra)
				err = errors.Join(fmt.Errorf("%w: %d accepted, %d queued", errAcceptedMeanwhile, len(extra), queued), j.write(journalHeld))
			}
		}
	}
	if err == nil {
		// A child forked after the tree was listed is in the
		// checkpoint, stopped with the rest: it moves too, so it must
		// be thawed or killed with them, and its pages served.
		if now, terr := treeOf(pid); terr == nil {
			listed := len(tree)
			for _, p := range now {
				if slices.Contains(tree, p) {
					continue
				}
				st, serr := procStart(p)
				if serr != nil {
					continue // gone
				}
				tree = append(tree, p)
				j.Procs = append(j.Procs, journalProc{PID: p, Start: st})
				d.log.Info("process migration: a child forked during the migration moves too", "pid", pid, "child", p)
			}
			if len(tree) > listed {
				err = j.write(journalHeld)
			}
		}
	}
	if err != nil {
		pages.Close()
		return abort(err)
	}
	var small []string
	if lazy {
		// Post-copy: the restore starts as soon as the images but the
		// memory are written; the pages follow through the pages
		// stream, on demand and in the background.
		phase(admin.PhaseDump, res.Took)
		procs, err := criu.CheckpointPIDs(tree)
		if err != nil {
			pages.Close()
			return abort(err)
		}
		lazyDone = servePages(ctx, pages, procs)
		t0 = time.Now()
		if small, err = checkpointFiles(dir); err != nil {
			return abort(err)
		}
		// The pages CRIU kept out of post-copy (the stack's, say) go
		// with the images: count them.
		for _, name := range small {
			if fi, err := os.Stat(filepath.Join(dir, name)); err == nil && criu.IsPagesImage(name) {
				rep.Pages += uint64(fi.Size()) / 4096
			}
		}
	} else {
		phase(admin.PhaseFreeze, res.Freezing)
		phase(admin.PhaseDump, res.Took-res.Freezing)
		rep.Pages = res.PagesWritten

		// The memory pages go through the pages stream, the rest with
		// the restore request.
		t0 = time.Now()
		names, err := checkpointFiles(dir)
		if err != nil {
			pages.Close()
			return abort(err)
		}
		var big []string
		for _, n := range names {
			if criu.IsPagesImage(n) {
				big = append(big, n)
			} else {
				small = append(small, n)
			}
		}
		stall, err := faultDuration("pages-stall")
		if err != nil || stall == 0 {
			stall = pagesStall
		}
		stop := context.AfterFunc(ctx, func() { pages.SetDeadline(time.Unix(1, 0)) })
		g := stallGuard{pages, stall}
		sent, err := peer.SendFiles(g, g, dir, big)
		stop()
		pages.Close()
		if err != nil {
			return abort(fmt.Errorf("sending the memory pages to %s: %w", r.To, err))
		}
		rep.ImageBytes += sent
	}
	req := &peer.ProcessRestoreRequest{TxID: tx}
	for _, n := range small {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			return abort(err)
		}
		req.Files = append(req.Files, peer.ImageFile{Name: n, Data: b})
		rep.ImageBytes += int64(len(b))
	}
	for _, s := range socks {
		req.Flows = append(req.Flows, peer.ProcessFlow{Flow: peer.FlowID{Client: s.flow.Client, Service: s.flow.Service}, Local: s.conn.Local})
	}
	req.Rewrite = append(req.Rewrite, d.cfg.ServiceAddrs...)
	req.Age = time.Since(dumpStart)
	restoreWithin, err := faultDuration("restore-deadline")
	if err != nil || restoreWithin == 0 {
		restoreWithin = procRestoreDeadline
	}
	if lazy {
		// From its restore, the target keeps a lazy copy waiting
		// for its pages, then for the commit: at the latest, that
		// long from now (made exact once the restore answers).
		j.Expires = time.Now().Add(restoreWithin + lazyPagesTimeout + procInTimeout)
	}
	if err := j.write(journalRestoring); err != nil {
		return abort(err)
	}
	restoreAsked = true
	rctx, rcancel := context.WithTimeout(ctx, restoreWithin)
	rr, err := c.ProcessRestore(rctx, req)
	rcancel()
	if err != nil {
		return abort(fmt.Errorf("restore on %s: %w", r.To, err))
	}
	rep.NewPID = rr.PID
	phase(admin.PhaseTransfer, time.Since(t0)-rr.Restore)
	phase(admin.PhaseRestore, rr.Restore)

	if lazy {
		// The target keeps its copy waiting for its pages, then for
		// the commit, that long from its restore.
		j.Expires = time.Now().Add(lazyPagesTimeout + procInTimeout)
	}
	if err := j.write(journalSwitching); err != nil {
		return abort(err)
	}
	t0 = time.Now()
	sctx, scancel := context.WithTimeout(ctx, procSwitchDeadline)
	err = d.switchProcess(sctx, flows, pcfg)
	scancel()
	// steerBack steers the flows back to this host's address, which is
	// where they went before.
	steerBack := func() error {
		var back []error
		for _, v6 := range []bool{false, true} {
			if fs := familyFlows(flows, v6); len(fs) > 0 {
				if own, ok := d.cfg.ServiceAddr(v6); ok {
					back = append(back, (steering{d}).Switch(context.WithoutCancel(ctx), fs, own))
				}
			}
		}
		return errors.Join(back...)
	}
	if err != nil {
		return abort(errors.Join(fmt.Errorf("switch: %w", err), steerBack())) // whatever moved
	}
	phase(admin.PhaseSwitch, time.Since(t0))
	rep.Pause = time.Since(holdStart)

	// Commit: the target runs the process and owns the connections.
	var errs []error
	if lazyDone != nil {
		// The frozen process here is where the target's missing pages
		// come from: it stays until the last one is there.
		t0 = time.Now()
		fault(ctx, "pages") // pages-crash: this host dies mid post-copy (tests)
		err := <-lazyDone
		lazyDone = nil // read: abort must not wait for it
		phase(admin.PhasePages, time.Since(t0))
		if err != nil {
			// The target kills its copy when its pages stop coming (it
			// cannot run without them): the process carries on here,
			// whole, rather than die on both hosts. Its connections
			// that exchanged data with the target meanwhile are
			// broken.
			return abort(errors.Join(fmt.Errorf("sending the memory pages to %s after the switch: %w", r.To, err), steerBack()))
		}
	}
	if err := j.write(journalCommitting); err != nil {
		errs = append(errs, err)
	}
	fault(ctx, "process-commit") // process-commit-crash: this host dies before the commit (tests)
	t0 = time.Now()
	// The commit first: were this daemon to die between the two, the
	// target's copy must not be left to its timeout (which kills it)
	// with the copy here already gone.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := d.commitOn(fctx, r.To, tx); err != nil {
		if strings.Contains(err.Error(), endedAborted) {
			// The target's copy is gone (its pages stopped, or its
			// timeout passed): the process carries on here, as when
			// the pages break.
			return abort(errors.Join(fmt.Errorf("commit on %s: %w", r.To, err), steerBack()))
		}
		if !errors.As(err, new(*peer.RemoteError)) {
			// No answer: the target may have committed or not, so
			// neither copy may go yet. The recovery of a daemon
			// restarted at this point takes over (the journal says
			// committing), in the background.
			if d.recoverUnconfirmed(dir, done) {
				handedOff = true
				return fmt.Errorf("%w: %s: %w", errCommitUnconfirmed, r.To, err)
			}
		}
		errs = append(errs, fmt.Errorf("commit on %s: %w", r.To, err))
	} else {
		fault(ctx, "process-committed") // process-committed-crash: this host dies after the commit, before its journal says so (tests)
		if err := j.write(journalCommitted); err != nil {
			errs = append(errs, err)
		}
	}
	fault(ctx, "process-retire") // process-retire-crash: this host dies after the commit (tests)
	errs = append(errs, d.retireSource(tree, socks)...)
	phase(admin.PhaseCommit, time.Since(t0))
	if err := errors.Join(errs...); err != nil {
		// The process runs on the target: this is not an abort.
		d.log.Error("process migration: commit", "pid", pid, "err", err)
	}
	return nil
}

// commitOn commits migration tx on target to, asking again while the
// target does not answer (a reply lost on the way, a connection broken:
// d.peer dials again for the next try) until ctx is done: the target answers a
// repeated commit as it did the first. An answer of the target's own
// ends it.
func (d *Daemon) commitOn(ctx context.Context, to string, tx uint64) error {
	for {
		actx, cancel := context.WithTimeout(ctx, commitAttempt)
		c, err := d.peer(actx, to)
		if err == nil {
			err = c.ProcessFinish(actx, &peer.ProcessFinishRequest{TxID: tx, Commit: true})
		}
		cancel()
		var re *peer.RemoteError
		if err == nil || errors.As(err, &re) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(commitRetry):
		}
	}
}

// pagesStall bounds how long the transfer of an eager migration's page
// images may make no progress (a write of one buffer, or the target's
// acknowledgement of the last): a target that hangs with its connection
// open must not keep the process stopped, whatever the memory's size.
const pagesStall = 30 * time.Second

// stallGuard gives each read and write of its connection d to complete.
type stallGuard struct {
	net.Conn
	d time.Duration
}

func (g stallGuard) Write(p []byte) (int, error) {
	g.SetWriteDeadline(time.Now().Add(g.d))
	return g.Conn.Write(p)
}

func (g stallGuard) Read(p []byte) (int, error) {
	g.SetReadDeadline(time.Now().Add(g.d))
	return g.Conn.Read(p)
}

// commitAttempt bounds one try of a commit, commitRetry is the wait
// before the next.
var (
	commitAttempt = 3 * time.Second
	commitRetry   = 200 * time.Millisecond
)

// Deadlines of a process migration's phases on the source: a hung CRIU
// or a stalled target must not keep the process stopped and its
// connections held for good. The transfer of an eager migration's pages
// has none but the request's: it takes as long as the memory needs.
const (
	procHoldDeadline    = 10 * time.Second
	procDumpDeadline    = time.Minute
	procRestoreDeadline = time.Minute // the images' transfer included
	procSwitchDeadline  = 10 * time.Second
)

// lazyPagesTimeout bounds how long the pages of a lazy migration may take
// to reach the target after the switch.
const lazyPagesTimeout = 5 * time.Minute

// servePages answers the target's page requests from the stopped tree
// until it has every page or the stream breaks, past the end of ctx (the
// process runs on the target by then); the outcome arrives on the
// returned channel.
func servePages(ctx context.Context, pages net.Conn, procs map[uint64]int) <-chan error {
	done := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lazyPagesTimeout)
		defer cancel()
		done <- criu.ServeLazyPages(sctx, pages, procs)
	}()
	return done
}

// switchProcess sends the flows to the target, one batch per family.
func (d *Daemon) switchProcess(ctx context.Context, flows []migrate.Flow, pcfg PeerConfig) error {
	for _, v6 := range []bool{false, true} {
		fs := familyFlows(flows, v6)
		if len(fs) == 0 {
			continue
		}
		to, ok := pickFamily(pcfg.ServiceAddrs, v6)
		if !ok {
			return fmt.Errorf("%s has no service address of the family of %v", pcfg.Name, fs[0])
		}
		if err := (steering{d}).Switch(ctx, fs, to); err != nil {
			return err
		}
	}
	return nil
}

func familyFlows(flows []migrate.Flow, v6 bool) []migrate.Flow {
	var out []migrate.Flow
	for _, f := range flows {
		if f.Client.Addr().Unmap().Is6() == v6 {
			out = append(out, f)
		}
	}
	return out
}

// waitDead waits until every thread of the tree has exited (gone or a
// zombie: its descriptors are closed), at most timeout.
func waitDead(tree []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, p := range tree {
		for !threadsDead(p) {
			if time.Now().After(deadline) {
				return fmt.Errorf("process %d still runs %v after SIGKILL", p, timeout)
			}
			time.Sleep(time.Millisecond)
		}
	}
	return nil
}

// threadsDead reports whether every thread of pid is gone or a zombie.
func threadsDead(pid int) bool {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return true
	}
	for _, e := range ents {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, e.Name()))
		if err != nil {
			continue
		}
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X' {
			return false
		}
	}
	return true
}

// thawTree lets a dumped, stopped tree carry on: its TCP sockets leave
// repair mode (CRIU left them in it; a copy of each descriptor is taken
// with pidfd_getfd), then every process gets SIGCONT. A socket found out
// of repair mode is left alone (a dump that failed, or never began: the
// process may be using it).
func thawTree(tree []int, socks []procSocket) error {
	var errs []error
	for _, s := range socks {
		// A plain descriptor, not a net.Conn: net.FileConn would switch
		// the socket, which the process shares, to non-blocking mode,
		// with TCP_NODELAY and keepalive, under the process's feet.
		c, err := repair.TakeFD(s.owner.PID, s.owner.FD)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		frozen, err := repair.InRepair(c)
		if err == nil && frozen {
			var fr *repair.Frozen
			if fr, err = repair.Freeze(c); err == nil {
				err = fr.Thaw()
			}
		}
		errs = append(errs, err, c.Close())
	}
	for _, p := range tree {
		if err := signal(p, syscall.SIGCONT); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// signal sends sig to process pid (through a pidfd, so a recycled pid is
// never hit); a process that is gone already is not an error.
func signal(pid int, sig os.Signal) error {
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	defer p.Release()
	if err := p.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %v to %d: %w", sig, pid, err)
	}
	return nil
}

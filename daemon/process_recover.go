package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/criu"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
)

// A process migration leaving this host keeps a journal next to its
// checkpoint (in the same tmpfs directory), rewritten as it passes each
// point that changes what undoing it takes. A daemon that dies during the
// migration (a crash, SIGKILL; a stop lets the migration finish) leaves
// the process stopped with its sockets in repair mode, and perhaps a
// restored copy on the target; when it starts again it reads the journal
// and either finishes the migration or undoes it (recoverProcesses).
//
// What decides is whether the flows may already reach the target's copy:
//
//	held       holds asked for, the dump perhaps under way; the target has
//	           no copy (its restore was not asked for): undo
//	restoring  the restore was asked for: the target may have a copy,
//	           live but not switched to: abort it there, then undo
//	switching  the switch was asked for: eagerly, the target's copy is
//	           whole and may have served the clients: finish; lazily, it
//	           died with the page stream (it cannot run without the pages
//	           this daemon served): undo, steering the flows back here
//	committing the switch is done (and, lazily, every page has gone):
//	           finish
//	committed  the target has committed: only the stopped copy here and
//	           its rules are left to remove (a second commit would be
//	           refused: the target has forgotten the migration)
//	aborting   this daemon decided to undo the migration, but the target
//	           did not answer its abort (recoverUnconfirmed): undo,
//	           steering the flows back here
//
// To finish is to have the target commit (which it does only while it
// still has the migration: it drops one procInTimeout after its
// prepare), then kill the stopped source and remove its rules. To undo is
// to abort the migration on the target (or, if it cannot be reached,
// wait until it has dropped it on its own), lift the holds, steer the
// flows back here if they were switched, and thaw the process.
type procJournal struct {
	Phase    string    `json:"phase"`
	To       string    `json:"to"`
	TxID     uint64    `json:"tx"`
	Lazy     bool      `json:"lazy"`
	Prepared time.Time `json:"prepared"` // when the target prepared
	// Expires is when the target drops the migration unless a commit
	// reaches it, if later than procInTimeout after its prepare: a lazy
	// migration's restored copy waits for its pages, then its commit.
	Expires time.Time      `json:"expires,omitzero"`
	Procs   []journalProc  `json:"procs"`
	Sockets []journalSock  `json:"sockets"`
	path    string         // the journal file
	root    int            // Procs[0].PID
	tree    []int          // the processes still there, once checked
	socks   []procSocket   // from Sockets
	flows   []migrate.Flow // from Sockets
	release func()         // ends the tree's mark as leaving (leftCheckpoints)
	// unconfirmed: handed over by a migration whose commit went
	// unanswered (recoverUnconfirmed), not left by an earlier run.
	unconfirmed bool
}

// The journal's phases (see procJournal).
const (
	journalHeld       = "held"
	journalRestoring  = "restoring"
	journalSwitching  = "switching"
	journalCommitting = "committing"
	journalCommitted  = "committed"
	journalAborting   = "aborting"
)

// journalName is the journal's file in a checkpoint directory; it is not
// one of the checkpoint's images (checkpointFiles).
const journalName = "mtcp-journal.json"

// journalProc is one process of the migrating tree, with its start time
// (clock ticks after boot) so that a recycled pid is never taken for it.
type journalProc struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// journalSock is one connection of the migrating tree.
type journalSock struct {
	Client  netip.AddrPort `json:"client"`
	Service netip.AddrPort `json:"service"`
	Local   netip.AddrPort `json:"local"`
	Remote  netip.AddrPort `json:"remote"`
	PID     int            `json:"pid"` // one process holding it, and its descriptor
	FD      int            `json:"fd"`
}

// newJournal starts the journal of a migration of tree (whose sockets are
// socks) to peer to, in the checkpoint directory dir.
func newJournal(dir, to string, tx uint64, lazy bool, prepared time.Time, tree []int, socks []procSocket) (*procJournal, error) {
	j := &procJournal{To: to, TxID: tx, Lazy: lazy, Prepared: prepared, path: filepath.Join(dir, journalName)}
	for _, p := range tree {
		st, err := procStart(p)
		if err != nil {
			return nil, err
		}
		j.Procs = append(j.Procs, journalProc{PID: p, Start: st})
	}
	j.addSockets(socks)
	return j, nil
}

// addSockets records socks among the migration's sockets, for a recovery
// to thaw.
func (j *procJournal) addSockets(socks []procSocket) {
	for _, s := range socks {
		j.Sockets = append(j.Sockets, journalSock{Client: s.flow.Client, Service: s.flow.Service,
			Local: s.conn.Local, Remote: s.conn.Remote, PID: s.owner.PID, FD: s.owner.FD})
	}
}

// write records that the migration has reached phase: the file is
// replaced whole, so that a crash leaves the old phase or the new one.
func (j *procJournal) write(phase string) error {
	j.Phase = phase
	b, err := json.Marshal(j)
	if err != nil {
		return err
	}
	tmp := j.path + ".new"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("process migration journal: %w", err)
	}
	if err := os.Rename(tmp, j.path); err != nil {
		return fmt.Errorf("process migration journal: %w", err)
	}
	return nil
}

// readJournal reads the journal of the checkpoint directory dir.
func readJournal(dir string) (*procJournal, error) {
	b, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		return nil, err
	}
	j := &procJournal{path: filepath.Join(dir, journalName)}
	if err := json.Unmarshal(b, j); err != nil {
		return nil, fmt.Errorf("process migration journal %s: %w", j.path, err)
	}
	switch {
	case !slices.Contains([]string{journalHeld, journalRestoring, journalSwitching, journalCommitting, journalCommitted, journalAborting}, j.Phase):
		return nil, fmt.Errorf("process migration journal %s: unknown phase %q", j.path, j.Phase)
	case len(j.Procs) == 0 || j.To == "":
		return nil, fmt.Errorf("process migration journal %s: no process or no target", j.path)
	}
	j.root = j.Procs[0].PID
	for _, p := range j.Procs {
		if st, err := procStart(p.PID); err == nil && st == p.Start {
			j.tree = append(j.tree, p.PID)
		}
	}
	for _, s := range j.Sockets {
		f := migrate.Flow{Client: s.Client, Service: s.Service}
		j.flows = append(j.flows, f)
		j.socks = append(j.socks, procSocket{conn: repair.Conn{Local: s.Local, Remote: s.Remote},
			owner: repair.Owner{PID: s.PID, FD: s.FD}, flow: f})
	}
	return j, nil
}

// expires is when the target drops the migration, its copy killed, unless
// a commit reaches it first.
func (j *procJournal) expires() time.Time {
	if !j.Expires.IsZero() {
		return j.Expires
	}
	return j.Prepared.Add(procInTimeout)
}

// forward reports whether the migration is to be finished rather than
// undone (see procJournal).
func (j *procJournal) forward() bool {
	return j.Phase == journalCommitting || j.Phase == journalCommitted || (j.Phase == journalSwitching && !j.Lazy)
}

// procStart is the start time of process pid, in clock ticks after boot
// (/proc/PID/stat's 22nd field).
func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(s[i+1:]) // from the 3rd field on
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// checkpointFiles lists the images of the checkpoint in dir, without the
// journal.
func checkpointFiles(dir string) ([]string, error) {
	names, err := criu.Images(dir)
	out := names[:0]
	for _, n := range names {
		if n != journalName && n != journalName+".new" {
			out = append(out, n)
		}
	}
	return out, err
}

// leftCheckpoints sorts the checkpoint directories an earlier run of this
// daemon left (it died during process migrations): those whose journal
// says a process may be waiting for the migration's end are returned, to
// be recovered once the daemon's services run; the others (arriving
// migrations, which their sources end, and departures that never got as
// far as a hold) are removed. An eager checkpoint holds a whole process's
// memory, on a tmpfs.
func (d *Daemon) leftCheckpoints() []*procJournal {
	left, _ := filepath.Glob(CheckpointGlob(d.cfg.Name, d.cfg.AdminSocket))
	var out []*procJournal
	for _, dir := range left {
		if err := ownDir(dir); err != nil {
			// The checkpoint directory (/dev/shm) is everyone's: a
			// journal planted there would have this daemon kill,
			// resume or take the sockets of processes it names.
			d.log.Warn("ignoring a checkpoint directory this daemon did not make", "dir", dir, "err", err)
			continue
		}
		if strings.HasPrefix(filepath.Base(dir), checkpointPrefix("out", d.cfg.Name, d.cfg.AdminSocket)) {
			j, err := readJournal(dir)
			if err == nil {
				// Marked as leaving until recovered: no migration (the
				// policy's, say) may take the stopped process first.
				j.release = func() {}
				if done, err := d.proc.leave(j.tree, j.To); err == nil {
					j.release = done
				}
				out = append(out, j)
				continue
			}
			if !errors.Is(err, os.ErrNotExist) {
				d.log.Warn("a process migration an earlier run left cannot be recovered", "dir", dir, "err", err)
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			d.log.Warn("removing a checkpoint an earlier run left", "dir", dir, "err", err)
			continue
		}
		d.log.Info("removed a checkpoint an earlier run left", "dir", dir)
	}
	return out
}

// ownDir checks that dir is a directory (not a link) owned by this
// process's user and closed to everyone else, as os.MkdirTemp makes the
// checkpoint directories.
func ownDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("not a directory (%v)", fi.Mode().Type())
	case !ok || int(st.Uid) != os.Geteuid():
		return errors.New("owned by another user")
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("mode %v: open to others", fi.Mode().Perm())
	}
	return nil
}

// errCommitUnconfirmed: a process migration's commit went unanswered,
// and recoverUnconfirmed ends it.
var errCommitUnconfirmed = errors.New("no answer to the commit; the process stays stopped here, and mtcpd asks again in the background until the target answers (then its copy here goes) or has dropped its own (then it resumes here)")

// errAbortUnconfirmed: a process migration's abort went unanswered after
// the target was asked to restore, and recoverUnconfirmed ends it.
var errAbortUnconfirmed = errors.New("no answer to the abort; the process stays stopped here, and mtcpd asks again in the background until the target answers or has dropped its copy, then it resumes here (or, if the target committed, runs there)")

// recoverUnconfirmed ends in the background, as the recovery of a daemon
// restarted at that point does (recoverProcess), the migration whose
// checkpoint is in dir: its commit or its abort went unanswered, so the
// target may run the process or not. It takes over release, the tree's mark as leaving,
// and the directory, or reports false if it cannot (the journal cannot be
// read).
func (d *Daemon) recoverUnconfirmed(dir string, release func()) bool {
	j, err := readJournal(dir)
	if err != nil {
		d.log.Error("process migration: the target did not answer, and the journal cannot be read", "dir", dir, "err", err)
		return false
	}
	j.release, j.unconfirmed = release, true
	// The recovery reads the journal alone: the images (an eager
	// dump holds the whole memory, on a tmpfs) go now.
	if names, err := checkpointFiles(dir); err == nil {
		for _, n := range names {
			os.Remove(filepath.Join(dir, n))
		}
	}
	// Counted as a migration under way (the caller's still is, so the
	// count is not at zero): a stopping daemon cancels it (d.stopping),
	// waits for it, and its next start takes up what is left.
	d.txs.Add(1)
	go func() {
		defer d.txs.Done()
		defer j.release()
		if d.recoverProcess(d.stopping, j) {
			os.RemoveAll(dir)
		}
	}()
	return true
}

// recoverProcesses ends, one after the other, the process migrations an
// earlier run of this daemon left half-way (see procJournal).
func (d *Daemon) recoverProcesses(ctx context.Context, js []*procJournal) {
	defer func() {
		for _, j := range js {
			j.release()
		}
	}()
	for _, j := range js {
		if ctx.Err() != nil {
			return // the checkpoint stays for the next start
		}
		if !d.recoverProcess(ctx, j) {
			// Not ended (cancelled, CRIU still on it, a thaw that
			// failed): the journal stays, for the next start.
			continue
		}
		os.RemoveAll(filepath.Dir(j.path))
	}
}

// recoverProcess finishes or undoes one migration an earlier run left. It
// reports whether it ended it; if not, the journal should stay.
func (d *Daemon) recoverProcess(ctx context.Context, j *procJournal) (ended bool) {
	log := d.log.With("pid", j.root, "to", j.To, "tx", j.TxID, "phase", j.Phase)
	if j.unconfirmed {
		log.Warn("process mode: the target did not answer; asking again, the process stopped here until it answers or has dropped its copy")
	} else {
		log.Warn("process mode: a migration was under way when this daemon last stopped; ending it")
	}
	if len(j.tree) == 0 {
		// Killed meanwhile (or by the earlier run itself, after the
		// switch): nothing is left here to resume or to kill, but a
		// target whose copy may serve the flows still needs its commit.
		log.Warn("process mode: the process of the unfinished migration is gone")
		if j.forward() {
			if err := d.finishProcess(ctx, j); err != nil {
				log.Error("process mode: cannot commit the unfinished migration on its target", "err", err)
			}
			return ctx.Err() == nil
		}
		return d.undoProcess(ctx, j, log)
	}
	// The earlier run's CRIU may still be dumping (it outlives its
	// caller): wait until it has let the processes go.
	if err := waitUntraced(ctx, j.tree, procDumpDeadline); err != nil {
		log.Error("process mode: cannot end the unfinished migration yet; the next start tries again", "err", err)
		return false
	}
	if j.forward() {
		err := d.finishProcess(ctx, j)
		if err == nil {
			log.Warn("process mode: finished the unfinished migration: the process runs on the target, its copy here is gone")
			return true
		}
		log.Error("process mode: cannot finish the unfinished migration; the process resumes here", "err", err)
	}
	return d.undoProcess(ctx, j, log)
}

// finishProcess completes a migration whose flows may have reached the
// target: the switch is done again (it may have been cut short), the
// target commits, and the stopped copy here is killed and its rules go.
// Until the target has committed, nothing here is changed for good.
func (d *Daemon) finishProcess(ctx context.Context, j *procJournal) error {
	if j.Phase == journalCommitted {
		return errors.Join(d.retireSource(j.tree, j.socks)...)
	}
	pcfg, ok := d.cfg.Peer(j.To)
	if !ok {
		return fmt.Errorf("%q is no longer a peer of %s", j.To, d.cfg.Name)
	}
	// Only an answer of the target's says whether it runs the process:
	// one that did not commit drops the migration when it expires, and
	// answers a commit after that with endedAborted; one that did
	// answers it as the first, for outcomeKeep. Silence says nothing (a
	// commit whose answer was lost, and the copy here must not resume
	// beside the target's), so it is asked again for that long.
	until := j.Prepared.Add(outcomeKeep)
	var err error
	for {
		var answered bool
		answered, err = d.commitOnTarget(ctx, j, pcfg)
		if answered || time.Now().After(until) {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
	if err != nil {
		return err
	}
	return errors.Join(d.retireSource(j.tree, j.socks)...)
}

// commitOnTarget switches the flows to the target and has it commit. It
// reports whether the target answered the commit (err is then nil, or
// its refusal).
func (d *Daemon) commitOnTarget(ctx context.Context, j *procJournal, pcfg PeerConfig) (answered bool, err error) {
	cctx, cancel := context.WithTimeout(ctx, procSwitchDeadline)
	defer cancel()
	if err := d.switchProcess(cctx, j.flows, pcfg); err != nil {
		return false, fmt.Errorf("switch: %w", err)
	}
	c, err := d.peer(cctx, j.To)
	if err != nil {
		return false, err
	}
	if err := c.ProcessFinish(cctx, &peer.ProcessFinishRequest{TxID: j.TxID, Commit: true}); err != nil {
		return errors.As(err, new(*peer.RemoteError)), fmt.Errorf("commit on %s: %w", j.To, err)
	}
	return true, nil
}

// undoProcess lets the process of an unfinished migration carry on here.
// It reports whether every step of that went through (a next start can
// take them again: each is harmless done twice).
func (d *Daemon) undoProcess(ctx context.Context, j *procJournal, log *slog.Logger) bool {
	// No copy may live on the target: abort the migration there. Before
	// its restore was asked for, it has none; after, one that cannot be
	// reached drops it on its own when it expires.
	reason := "the source's mtcpd restarted during the migration"
	if j.unconfirmed {
		reason = "the source got no answer"
	}
	until := j.expires().Add(5 * time.Second)
	for {
		err := d.abortOnTarget(ctx, j, reason)
		if err != nil && strings.Contains(err.Error(), endedCommitted) {
			// The commit reached the target before this daemon
			// stopped: the process runs there, and must not here too.
			if err := errors.Join(d.retireSource(j.tree, j.socks)...); err != nil {
				log.Error("process mode: the target runs the process of the unfinished migration; ending its copy here; the next start tries again", "err", err)
				return false
			}
			log.Warn("process mode: the target had committed the unfinished migration: the process runs there, its copy here is gone")
			return true
		}
		if err == nil || j.Phase == journalHeld {
			break
		}
		if time.Now().After(until) {
			log.Warn("process mode: the target did not answer; it has dropped the migration by now", "err", err)
			break
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(2 * time.Second):
		}
	}
	var errs []error
	if j.Phase == journalSwitching || j.Phase == journalCommitting || j.Phase == journalAborting {
		// The flows may have gone to the target: steer them back to
		// this host's address, where they went before.
		for _, v6 := range []bool{false, true} {
			if fs := familyFlows(j.flows, v6); len(fs) > 0 {
				if own, ok := d.cfg.ServiceAddr(v6); ok {
					errs = append(errs, (steering{d}).Switch(ctx, fs, own))
				}
			}
		}
	}
	errs = append(errs, (steering{d}).Unhold(ctx, j.flows))
	if len(j.tree) > 0 {
		errs = append(errs, thawTree(j.tree, j.socks))
	}
	if err := errors.Join(errs...); err != nil {
		log.Error("process mode: resuming the process of the unfinished migration; the next start tries again", "err", err)
		return false
	}
	log.Warn("process mode: undid the unfinished migration: the process carries on here")
	return true
}

// abortOnTarget ends the migration on its target as an abort.
func (d *Daemon) abortOnTarget(ctx context.Context, j *procJournal, reason string) error {
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := d.peer(actx, j.To)
	if err != nil {
		return err
	}
	return c.ProcessFinish(actx, &peer.ProcessFinishRequest{TxID: j.TxID, Reason: reason})
}

// retireSource ends the stopped copy of a process that now runs on its
// target: the processes of tree are killed, and once they are gone (their
// sockets, in repair mode, still retransmit until then) the rules of the
// connections that came here from elsewhere are removed.
func (d *Daemon) retireSource(tree []int, socks []procSocket) []error {
	var errs []error
	for _, p := range tree {
		if err := signal(p, syscall.SIGKILL); err != nil {
			errs = append(errs, fmt.Errorf("killing the source process %d: %w", p, err))
		}
	}
	// Its sockets, in repair mode, close silently, but until they are
	// closed their timers still retransmit: the reply rewrites of a
	// process that came here must stay until it is dead, or a
	// retransmission would leave with this host's address and the client
	// would answer it with a RST.
	if err := waitDead(tree, 5*time.Second); err != nil {
		errs = append(errs, err)
	}
	var b nat.Batch
	d.proc.mu.Lock()
	d.mu.Lock()
	for _, s := range socks {
		t := app.Tuple{Local: s.conn.Local, Remote: s.conn.Remote}
		_, inProc := d.proc.flows[t]
		_, inMoved := d.moved[t] // found again after a restart (reconcile)
		if inProc || inMoved {
			delete(d.proc.flows, t)
			if inMoved {
				delete(d.moved, t)
				delete(d.adopted, t)
				d.movedChanged()
			}
			b.Remove(natFlow(s.flow))
		}
	}
	d.mu.Unlock()
	d.proc.mu.Unlock()
	if b.Len() > 0 {
		if err := d.nat.Apply(&b); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// waitUntraced waits until no process of tree is traced (by a CRIU
// still dumping it), for up to timeout.
func waitUntraced(ctx context.Context, tree []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		traced := 0
		for _, p := range tree {
			if tracerOf(p) > 0 {
				traced = p
				break
			}
		}
		if traced == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d is still traced (by a CRIU dump?) after %v", traced, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// tracerOf returns the pid of the process tracing pid, or 0.
func tracerOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "TracerPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

//go:build linux

package nat

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Table is mtcp's nftables table in one network namespace: fixed chains,
// sets and maps installed by [Open], per-flow elements changed by
// [Table.Apply]. Its methods are safe for concurrent use.
//
// A Table keeps an index of the ReplyFrom and GatewayReply elements it
// installed or found (their keys hold addresses that the Flow alone does
// not give), which [Batch.Remove] and replacing ReplyFrom/GatewayReply
// rely on. It is loaded at Open and rebuilt by Flows and Reconcile; Prune
// drops from it the elements the kernel timed out. If another process
// edits the same table, call Flows before Remove.
type Table struct {
	opts Options
	hold holdVerdict

	mu  sync.Mutex
	nft *nftConn // nil once closed
	idx *index

	// The late sweep (late_linux.go): removed elements to look for again
	// after a while (lateDelay), the current epoch, the running sweeper's
	// end (nil when none runs), how it waits, how many elements it has
	// removed, and whether Close is waiting for it.
	late        map[elemKey]lateEntry
	lateEpoch   uint64
	lateDone    chan struct{}
	lateWait    func()
	lateRemoved int
	lateClosing bool

	// liftFault, if set, is called before each try to lift holds; an
	// error it returns fails the try (tests).
	liftFault func() error
}

// Open creates mtcp's table in the calling thread's network namespace, or
// adopts it if it exists: one transaction creates what is missing, keeps
// the sets and maps and their elements, and replaces the chains' rules, so
// opening twice installs nothing twice and traffic never sees a partial
// layout. The netlink sockets are bound to the namespace at Open: the
// Table may then be used from any goroutine. Open needs CAP_NET_ADMIN in
// the namespace.
//
// Re-opening with another Options.Queue or Options.Idle replaces the rules
// and keeps the elements. A table of the same name whose sets are defined
// differently (another version of mtcp) makes Open fail with an error
// wrapping EEXIST: Destroy it, or choose another Options.Table.
func Open(o Options) (*Table, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, &OpError{Op: "open", Table: "inet " + o.Table, Err: err}
	}
	name := "inet " + o.Table
	n, err := dialNFT(o.Table)
	if err != nil {
		return nil, &OpError{Op: "open", Table: name, Err: err}
	}
	t := &Table{opts: o, nft: n, idx: newIndex(), late: map[elemKey]lateEntry{}, lateWait: lateWait}
	err = n.commit(n.layout(o, holdNative))
	var te *txError
	if errors.As(err, &te) && isErrno(err, syscall.ENOENT) && strings.HasPrefix(te.what, "add rule hold") {
		// No nft_queue expression in this kernel: queue through the
		// xtables NFQUEUE target instead.
		t.hold = holdXT
		err = n.commit(n.layout(o, holdXT))
	}
	if err != nil {
		n.close()
		switch {
		case isErrno(err, syscall.EPERM):
			err = fmt.Errorf("%w: needs CAP_NET_ADMIN in the network namespace", err)
		case isErrno(err, syscall.EEXIST):
			err = fmt.Errorf("%w: the table exists with a different layout (another mtcp version?); remove it with Destroy or `nft delete table %s`, or use another Options.Table", err, name)
		}
		return nil, &OpError{Op: "open", Table: name, Err: err}
	}
	if _, err := t.flowsLocked(); err != nil {
		n.close()
		return nil, &OpError{Op: "open", Table: name, Err: err}
	}
	return t, nil
}

func (t *Table) name() string { return "inet " + t.opts.Table }

// Options returns the options the Table was opened with, defaults filled
// in.
func (t *Table) Options() Options { return t.opts }

// Apply applies b as one nftables transaction (a single netlink batch): all
// of it takes effect at once, or none. One Forward replacing another is
// therefore atomic for packets. Holds that b lifts (Unhold, Remove)
// together with other changes are lifted by a second transaction, once
// the first has committed: the flows stay held, with their new elements
// in place, in between. The kernel refreshes the maps' timeouts from the
// packet path and does not see an element that a transaction under way
// adds or removes; a packet let through by the same transaction would
// make it insert a duplicate element, which outlives the flow's removal
// and makes its next switch fail (EEXIST). Removing an element while its
// flow's packets still pass (not held, its socket not frozen) can leave a
// copy behind the same way: Apply then looks up every element it removed
// (and did not add back) and removes again those still there; and since
// a packet evaluated across the commit can put one back even after that,
// a goroutine looks for them once more 50 to 100 ms later, unless a later
// batch has added them back. If a later transaction fails, the first
// stays applied and Apply says so: its error wraps ErrApplied whenever
// the batch went in. b is left unchanged; Apply refuses the
// whole batch, changing nothing, if any change in it is malformed (error
// wrapping ErrInvalid). An empty batch does nothing.
func (t *Table) Apply(b *Batch) error { return t.ApplyThen(b, nil) }

// ApplyThen is Apply with a step of the caller's at the moment the
// batch's holds are about to be lifted: then runs once every other change
// of b is in and while the holds it lifts still queue their flows'
// packets (between the two transactions; before the only one if b changes
// nothing but holds; after it if b lifts no hold). A switch re-delivers
// the held packets there ([Queue.Pass]), so that they go on ahead of the
// packets that arrive once the holds are gone. The holds are lifted even
// if then fails; its error is returned with Apply's. then runs with the
// Table locked: it must not use the Table. Nil then is Apply.
func (t *Table) ApplyThen(b *Batch, then func() error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return &OpError{Op: "apply", Table: t.name(), Err: ErrClosed}
	}
	if err := t.applyLocked(b.ops, then); err != nil {
		return &OpError{Op: "apply", Table: t.name(), Err: err}
	}
	return nil
}

func (t *Table) applyLocked(ops []op, then func() error) error {
	var thenErr error
	step := func() {
		if then != nil {
			thenErr = then()
			then = nil
		}
	}
	if len(ops) == 0 {
		step()
		return thenErr
	}
	p, err := makePlan(ops, t.idx)
	if err != nil {
		return err
	}
	first, last := p.phases(t.opts.Idle, t.opts.HoldIdle)
	reqs := t.nft.elemReqs(first)
	if len(reqs) == 0 {
		step()
		return thenErr
	}
	lastReqs := t.nft.elemReqs(last)
	lifting := onlyHolds(first) && len(first[setHold4].destroy)+len(first[setHold6].destroy) > 0
	if lifting {
		step() // only holds change: the lifting is this transaction
	}
	if lifting {
		err = t.lift(reqs)
	} else {
		err = t.nft.commit(reqs)
		if isErrno(err, syscall.EEXIST) {
			err = t.dropDuplicates(first, reqs, err)
		}
	}
	if err != nil {
		if isErrno(err, syscall.ENOENT) {
			err = fmt.Errorf("%w: the table or one of its sets is missing (deleted by someone else?); Open it again", err)
		}
		if lifting {
			err = fmt.Errorf("%w: %w", ErrHoldsKept, err)
		}
		return errors.Join(err, thenErr)
	}
	p.commit()
	t.queueLateLocked(p)
	step()
	if len(lastReqs) > 0 {
		if err := t.lift(lastReqs); err != nil {
			return applied(errors.Join(fmt.Errorf("%w: lifting them after the batch's other changes went in: %w", ErrHoldsKept, err), thenErr))
		}
	}
	return applied(errors.Join(t.sweep(p.removed()), thenErr))
}

// applied marks err, from a step after a batch went in, with ErrApplied.
func applied(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w, but: %w", ErrApplied, err)
}

// dropDuplicates handles a transaction (reqs, whose changes are ch) that
// failed with EEXIST, err: an element it replaces (destroys, then adds)
// had two copies, the second put there by a packet evaluated across an
// earlier change (see Apply; seen under heavy load, about once in a
// hundred runs of TestSwitchUnderTraffic). The destroy took one copy and
// the add met the other. It removes one copy of each element the
// transaction adds, in a transaction of its own, then commits the
// transaction again, whose own destroys take the other copies. Every
// element a batch adds it also replaces, and its flows are held while
// their forwarding changes, so the moment in between, without the
// element, is one no packet of theirs sees. It returns the commit's
// error, or err if the removal failed.
func (t *Table) dropDuplicates(ch [numSets]setChanges, reqs []nftReq, err error) error {
	var drop [numSets]setChanges
	for id := range numSets {
		for _, e := range ch[id].add {
			drop[id].destroy = append(drop[id].destroy, setElem{key: e.key})
		}
	}
	if derr := t.nft.commit(t.nft.elemReqs(drop)); derr != nil {
		return err
	}
	if cerr := t.nft.commit(reqs); cerr != nil {
		// The drop is in: the table is not as it was, whatever the
		// transaction's own error says.
		return fmt.Errorf("%w (after one copy of each element it adds was removed, which stays so)", cerr)
	}
	return nil
}

// liftTries are the waits before each try of a transaction that lifts
// holds: a failed lift leaves flows held, their packets on their way
// through the queue one by one at best, so it is worth a few tries.
var liftTries = []time.Duration{0, time.Millisecond, 10 * time.Millisecond}

// lift commits reqs, a transaction that lifts holds, trying it again
// after a failure (it only destroys and adds elements, so a retry
// changes nothing that the failed try changed).
func (t *Table) lift(reqs []nftReq) error {
	var errs []error
	for _, wait := range liftTries {
		time.Sleep(wait)
		err := t.testLiftFault()
		if err == nil {
			if err = t.nft.commit(reqs); err == nil {
				return nil
			}
		}
		errs = append(errs, err)
		if errors.Is(err, ErrClosed) {
			break
		}
	}
	return errors.Join(errs...)
}

// testLiftFault returns the error tests inject into the lifting of holds
// (nil outside those tests).
func (t *Table) testLiftFault() error {
	if t.liftFault == nil {
		return nil
	}
	return t.liftFault()
}

// sweepAttempts bounds the rounds of [Table.sweep].
const sweepAttempts = 8

// sweep removes again the elements a transaction removed that a packet
// re-created while it committed (see [Table.Apply]): it looks each one up
// and removes those still there, until none is. With nothing removed it
// does nothing. Each round's window for the race is one commit, so a flow
// would have to keep sending through every one of them to keep its
// element.
func (t *Table) sweep(gone [numSets][]setElem) error {
	n := 0
	for range sweepAttempts {
		var err error
		if gone, n, err = t.removeStillThere(gone); err != nil || n == 0 {
			return err
		}
	}
	return fmt.Errorf("%d removed elements keep being re-created by their flows' packets", n)
}

// removeStillThere looks up els, per set, and removes in one transaction
// those still there, which found lists (n of them). On error found may be
// incomplete, and those found may still be there.
func (t *Table) removeStillThere(els [numSets][]setElem) (found [numSets][]setElem, n int, err error) {
	var del [numSets]setChanges
	for id, e := range els {
		if len(e) == 0 {
			continue
		}
		back, err := t.nft.present(setID(id), e)
		if err != nil {
			return found, n, fmt.Errorf("checking that removed elements stay removed: %w", err)
		}
		del[id].destroy, found[id] = back, back
		n += len(back)
	}
	if n == 0 {
		return found, 0, nil
	}
	if err := t.nft.commit(t.nft.elemReqs(del)); err != nil {
		return found, n, fmt.Errorf("removing %d elements that packets re-created during their removal: %w", n, err)
	}
	return found, n, nil
}

// Prune drops from the Table's index the ReplyFrom and GatewayReply
// elements the kernel no longer holds (timed out: a flow whose rules were
// never removed), and returns how many it dropped. Unlike Flows, which
// reads the whole table in one hold of the Table's lock, it looks the
// indexed elements up by key, lockChunk flows per hold: a long-running
// owner calls it now and then, and an Apply (a migration's hold) waits
// for one chunk at most, not for a dump of a table of 100,000 flows.
// It only drops: an element the index lacks (its transaction went in but
// its acknowledgement was lost) is learned by Flows or Reconcile, which a
// daemon runs at start.
func (t *Table) Prune() (int, error) {
	t.mu.Lock()
	if t.nft == nil {
		t.mu.Unlock()
		return 0, &OpError{Op: "prune", Table: t.name(), Err: ErrClosed}
	}
	flows := make([]Flow, 0, len(t.idx.reply)+len(t.idx.gw))
	for f := range t.idx.reply {
		flows = append(flows, f)
	}
	for f := range t.idx.gw {
		if _, ok := t.idx.reply[f]; !ok {
			flows = append(flows, f)
		}
	}
	t.mu.Unlock()
	n := 0
	for lo := 0; lo < len(flows); lo += lockChunk {
		k, err := t.pruneSome(flows[lo:min(lo+lockChunk, len(flows))])
		n += k
		if err != nil {
			return n, &OpError{Op: "prune", Table: t.name(), Err: err}
		}
	}
	return n, nil
}

// pruneSome drops from the index those of the indexed elements of flows
// that the kernel does not hold.
func (t *Table) pruneSome(flows []Flow) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return 0, ErrClosed
	}
	var keys [numSets][]setElem
	var drops [numSets]map[string]func()
	for _, f := range flows {
		t.idx.elements(f, func(id setID, key []byte, drop func()) {
			if drops[id] == nil {
				drops[id] = map[string]func(){}
			}
			keys[id] = append(keys[id], setElem{key: key})
			drops[id][string(key)] = drop
		})
	}
	n := 0
	for id := range numSets {
		if len(keys[id]) == 0 {
			continue
		}
		there, err := t.nft.present(setID(id), keys[id])
		if err != nil {
			return n, err
		}
		for _, e := range there {
			delete(drops[id], string(e.key))
		}
		for _, drop := range drops[id] {
			drop()
			n++
		}
	}
	return n, nil
}

// Flows lists every element of the table (all kinds, both families) and
// rebuilds the Table's index from them.
func (t *Table) Flows() ([]Entry, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return nil, &OpError{Op: "flows", Table: t.name(), Err: ErrClosed}
	}
	es, err := t.flowsLocked()
	if err != nil {
		return nil, &OpError{Op: "flows", Table: t.name(), Err: err}
	}
	return es, nil
}

// Refresh restarts the idle timeout (Options.Idle) of the rewrite
// elements of flows (forwarding, reply rewrite, gateway reply; holds are
// left alone) in place, as a packet of the flow would: for connections
// known to live on while they stay silent. The elements are not replaced,
// so a packet of the flow meanwhile meets them as they were; flows without
// elements here are skipped. It returns how many elements it refreshed.
// A kernel before Linux 6.12 takes the refresh without error and does not
// do it (it leaves an existing element's timeout alone).
//
// The elements are looked up by key (the Table's index gives the keys
// that the flow alone does not), a few hundred flows per hold of the
// Table's lock: a refresh costs what its flows do, not what the table
// holds, and other changes wait for one chunk of it at most.
func (t *Table) Refresh(flows []Flow) (int, error) {
	seen := make(map[Flow]bool, len(flows))
	fs := make([]Flow, 0, len(flows))
	for _, f := range flows {
		nf, err := f.normalize()
		if err != nil {
			return 0, &OpError{Op: "refresh", Table: t.name(), Err: err}
		}
		if !seen[nf] {
			seen[nf] = true
			fs = append(fs, nf)
		}
	}
	n := 0
	for lo := 0; lo < len(fs) || lo == 0; lo += lockChunk {
		k, err := t.refreshSome(fs[lo:min(lo+lockChunk, len(fs))])
		n += k
		if err != nil {
			return n, &OpError{Op: "refresh", Table: t.name(), Err: err}
		}
	}
	return n, nil
}

// lockChunk is how many flows Refresh and Prune look up in one hold of
// the Table's lock: an Apply (a migration's hold) waits for one chunk at
// most, not for the whole of a busy steering point's table.
const lockChunk = 256

// refreshSome refreshes the elements of flows: it looks up the keys the
// flows' elements may have (the index gives the local addresses of
// ReplyFrom and the targets of GatewayReply), and adds those found again
// with the data they have and a new expiration, in one transaction.
func (t *Table) refreshSome(flows []Flow) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return 0, ErrClosed
	}
	var keys [numSets][]setElem
	for _, f := range flows {
		fwd := setOf(KindForward, f.Is6())
		keys[fwd] = append(keys[fwd], setElem{key: flowKey(f)})
		t.idx.elements(f, func(id setID, key []byte, _ func()) { keys[id] = append(keys[id], setElem{key: key}) })
	}
	var reqs []nftReq
	n := 0
	for id := range numSets {
		if len(keys[id]) == 0 {
			continue
		}
		var again []setElem
		err := t.nft.lookup(setID(id), keys[id], func(e setElem, el rawElem) {
			if len(el.data) != setSpecs[id].dataLen {
				return // not read back whole: left alone
			}
			// The same key and data: the kernel updates the element's
			// timeout and expiration rather than refuse it as a
			// duplicate.
			again = append(again, setElem{key: e.key, data: el.data, timeout: t.opts.Idle, expiration: t.opts.Idle})
		})
		if err != nil {
			return 0, err
		}
		n += len(again)
		reqs = append(reqs, t.nft.elemMsgs(setID(id), nftMsgNewSetElem, again)...)
	}
	if len(reqs) == 0 {
		return 0, nil
	}
	if err := t.nft.commit(reqs); err != nil {
		return 0, err
	}
	return n, nil
}

func (t *Table) flowsLocked() ([]Entry, error) {
	var out []Entry
	idx := newIndex()
	for id := range numSets {
		els, err := t.nft.elements(id)
		if err != nil {
			return nil, err
		}
		for _, el := range els {
			e, err := decodeEntry(id, el.key, el.data)
			if err != nil {
				return nil, err
			}
			e.Expires = el.expires
			idx.add(e)
			out = append(out, e)
		}
	}
	t.idx = idx
	return out, nil
}

// Reconcile deletes, in one transaction, every element for which keep
// returns false, and keeps the others. A daemon calls it at start with
// the flows it knows of, so that nothing is left steered after a crash.
func (t *Table) Reconcile(keep func(Entry) bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return &OpError{Op: "reconcile", Table: t.name(), Err: ErrClosed}
	}
	es, err := t.flowsLocked()
	if err != nil {
		return &OpError{Op: "reconcile", Table: t.name(), Err: err}
	}
	var b Batch
	for _, e := range es {
		if !keep(e) {
			b.deleteEntry(e)
		}
	}
	if err := t.applyLocked(b.ops, nil); err != nil {
		return &OpError{Op: "reconcile", Table: t.name(), Err: err}
	}
	return nil
}

// Close closes the Table's netlink sockets. The table and its elements
// stay in the kernel (and keep steering traffic); Open adopts them again.
// Close is idempotent. It first lets the late sweep (see [Table.Apply])
// finish its round under way, with the elements already removed, which
// takes up to about 100 ms; a sweep that a concurrent Apply starts
// meanwhile, or one still running at Destroy, finds the Table closed and
// ends by itself.
func (t *Table) Close() error {
	t.mu.Lock()
	t.lateClosing = true
	done := t.lateDone
	t.mu.Unlock()
	if done != nil {
		<-done
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return nil
	}
	err := t.nft.close()
	t.nft = nil
	if err != nil {
		return &OpError{Op: "close", Table: t.name(), Err: err}
	}
	return nil
}

// Destroy deletes the whole table (rules, sets, every flow's elements)
// from the namespace, then closes the Table. A table already gone is not
// an error.
func (t *Table) Destroy() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nft == nil {
		return &OpError{Op: "destroy", Table: t.name(), Err: ErrClosed}
	}
	err := t.nft.commit([]nftReq{t.nft.destroyTableReq()})
	err = errors.Join(err, t.nft.close())
	t.nft = nil
	if err != nil {
		return &OpError{Op: "destroy", Table: t.name(), Err: err}
	}
	return nil
}

//go:build linux

package nat

import (
	"time"

	"golang.org/x/sys/unix"
)

// The late sweep closes what [Table.sweep] leaves open. A packet whose
// evaluation began before a removal committed still sees the element, and
// its timeout refresh (dynset "update") puts the element back if it runs
// after the commit took the element out, which can be after sweep has
// looked: the packet's CPU may have been interrupted, or its virtual CPU
// descheduled, in between. Every such evaluation runs inside an RCU
// read-side critical section (netfilter hooks run under rcu_read_lock), so
// once an RCU grace period has passed after a commit, none of them is
// still under way. The late sweep waits for one, off the caller's path,
// then looks up the removed elements again and removes those still there.
// Without it a re-created element would stay until Options.Idle and steer
// a new connection that reuses the 4-tuple.

// lateAttempts bounds how many times the late sweep removes the same
// element: each removal is another commit that a packet may race, so a
// flow that keeps sending could keep its element forever; it then times
// out after Options.Idle, as before.
const lateAttempts = 4

// lateEntry is a removed element that the late sweep will look for: the
// grace period it waits for must begin after epoch was current.
type lateEntry struct {
	epoch    uint64
	attempts int
}

// membarrierCmdGlobal is MEMBARRIER_CMD_GLOBAL (include/uapi/linux/membarrier.h),
// which returns after synchronize_rcu().
const membarrierCmdGlobal = 1

// rcuGrace waits for an RCU grace period: membarrier(MEMBARRIER_CMD_GLOBAL)
// is synchronize_rcu() (about 8 ms on a 2-core virtual machine). Where the
// kernel refuses it (nohz_full CPUs), a pause well beyond any packet's
// evaluation stands in.
func rcuGrace() {
	if _, _, e := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); e != 0 {
		time.Sleep(50 * time.Millisecond)
	}
}

// queueLateLocked records what plan p removed (and did not add back) for
// the late sweep, forgets the keys p puts back, and starts the sweeper if
// it is not running. t.mu is held.
func (t *Table) queueLateLocked(p *plan) {
	for _, k := range p.order {
		if setSpecs[k.set].kind == KindHold {
			continue
		}
		if p.changes[k].present {
			delete(t.late, k) // the element is wanted again: leave it
			continue
		}
		t.late[k] = lateEntry{epoch: t.lateEpoch}
	}
	if len(t.late) > 0 && t.lateDone == nil {
		t.lateDone = make(chan struct{})
		go t.lateSweep(t.lateDone)
	}
}

// lateSweep runs until no removed element waits for it, or the Table is
// closed: each round starts a new epoch, waits for a grace period, then
// deals with the elements queued before that epoch.
func (t *Table) lateSweep(done chan struct{}) {
	defer close(done)
	for {
		t.mu.Lock()
		cut := t.lateEpoch
		t.lateEpoch++
		grace := t.lateGrace
		t.mu.Unlock()

		grace()

		t.mu.Lock()
		if t.nft == nil || len(t.late) == 0 {
			t.lateDone = nil
			t.mu.Unlock()
			return
		}
		t.lateRoundLocked(cut)
		if len(t.late) == 0 {
			t.lateDone = nil
			t.mu.Unlock()
			return
		}
		t.mu.Unlock()
	}
}

// lateRoundLocked looks up the queued elements of epochs up to cut, removes
// those still there and queues them again (their removal is a new commit
// that a packet may race); the others are done. t.mu is held. An error
// leaves the elements to Options.Idle: no caller is left to tell.
func (t *Table) lateRoundLocked(cut uint64) {
	var due [numSets][]setElem
	tries := map[elemKey]int{}
	for k, e := range t.late {
		if e.epoch <= cut {
			due[k.set] = append(due[k.set], setElem{key: []byte(k.key)})
			tries[k] = e.attempts
			delete(t.late, k)
		}
	}
	var back [numSets]setChanges
	n := 0
	for id, els := range due {
		if len(els) == 0 {
			continue
		}
		found, err := t.nft.present(setID(id), els)
		if err != nil {
			return
		}
		back[id].destroy = found
		n += len(found)
	}
	if n == 0 {
		return
	}
	if err := t.nft.commit(t.nft.elemReqs(back)); err != nil {
		return
	}
	t.lateRemoved += n
	for id, sc := range back {
		for _, e := range sc.destroy {
			k := elemKey{setID(id), string(e.key)}
			if a := tries[k] + 1; a < lateAttempts {
				t.late[k] = lateEntry{epoch: t.lateEpoch, attempts: a}
			}
		}
	}
}

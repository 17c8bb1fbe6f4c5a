//go:build linux

package nat

import (
	"os"
	"strconv"
	"strings"
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
// which returns after synchronize_rcu() when more than one CPU is online.
const membarrierCmdGlobal = 1

// graceFallback stands in for a grace period where membarrier cannot give
// one: far beyond any packet's evaluation, and a sleep, so that a reader
// preempted on the only CPU gets to run and finish.
const graceFallback = 50 * time.Millisecond

// rcuGrace waits for an RCU grace period: membarrier(MEMBARRIER_CMD_GLOBAL)
// is synchronize_rcu() (about 8 ms on a 2-core virtual machine). With one
// CPU online it returns at once without one, and with nohz_full CPUs the
// kernel refuses it: then graceFallback.
func rcuGrace() {
	if onlineCPUs() > 1 {
		if _, _, e := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); e == 0 {
			return
		}
	}
	time.Sleep(graceFallback)
}

// onlineCPUs counts the CPUs online, or returns 0 if it cannot tell.
func onlineCPUs() int {
	b, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		return 0
	}
	return countCPUs(string(b))
}

// countCPUs counts the CPUs of a kernel CPU list such as "0-3,5\n", or
// returns 0 if it is malformed.
func countCPUs(list string) int {
	n := 0
	for r := range strings.SplitSeq(strings.TrimSpace(list), ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		if !isRange {
			hi = lo
		}
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0
		}
		z, err := strconv.Atoi(hi)
		if err != nil || z < a {
			return 0
		}
		n += z - a + 1
	}
	return n
}

// lateChunk bounds the elements one step of a late round looks up with
// the Table locked, so that a batch applied meanwhile (a switch, its
// flows held) waits for at most that many lookups.
const lateChunk = 256

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
// deals with the elements queued before that epoch, a chunk at a time.
func (t *Table) lateSweep(done chan struct{}) {
	defer close(done)
	for {
		t.mu.Lock()
		cut := t.lateEpoch
		t.lateEpoch++
		grace := t.lateGrace
		t.mu.Unlock()

		grace()

		for {
			t.mu.Lock()
			if t.nft == nil || len(t.late) == 0 {
				t.lateDone = nil
				t.mu.Unlock()
				return
			}
			more := t.lateStepLocked(cut)
			t.mu.Unlock()
			if !more {
				break
			}
		}
	}
}

// lateStepLocked takes up to lateChunk queued elements of epochs up to
// cut, looks them up, removes those still there and queues them again
// (their removal is a new commit that a packet may race; up to
// lateAttempts times). It reports whether elements up to cut are left.
// If the kernel cannot be asked, the elements are queued again, as many
// times. t.mu is held.
func (t *Table) lateStepLocked(cut uint64) (more bool) {
	var due [numSets][]setElem
	tries := map[elemKey]int{}
	for k, e := range t.late {
		if e.epoch > cut {
			continue
		}
		if len(tries) == lateChunk {
			more = true
			break
		}
		due[k.set] = append(due[k.set], setElem{key: []byte(k.key)})
		tries[k] = e.attempts
		delete(t.late, k)
	}
	again := func(k elemKey) {
		if a := tries[k] + 1; a < lateAttempts {
			t.late[k] = lateEntry{epoch: t.lateEpoch, attempts: a}
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
			for _, e := range els {
				again(elemKey{setID(id), string(e.key)})
			}
			continue
		}
		back[id].destroy = found
		n += len(found)
	}
	if n == 0 {
		return more
	}
	if err := t.nft.commit(t.nft.elemReqs(back)); err == nil {
		t.lateRemoved += n
	}
	for id, sc := range back {
		for _, e := range sc.destroy {
			again(elemKey{setID(id), string(e.key)})
		}
	}
	return more
}

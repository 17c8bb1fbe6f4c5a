//go:build linux

package nat

import "time"

// The late sweep closes what [Table.sweep] leaves open. A packet whose
// evaluation began before a removal committed still sees the element, and
// its timeout refresh (dynset "update") puts the element back if it runs
// after the commit took the element out, which can be after sweep has
// looked: the packet's CPU may have been interrupted, or its virtual CPU
// descheduled, in between. The late sweep waits lateDelay, off the
// caller's path, then looks up the removed elements again and removes
// those still there. Without it a re-created element would stay until
// Options.Idle and steer a new connection that reuses the 4-tuple.
//
// Every such evaluation runs inside an RCU read-side critical section
// (netfilter hooks run under rcu_read_lock), so an RCU grace period would
// be the exact wait, and membarrier(MEMBARRIER_CMD_GLOBAL) gives one
// (synchronize_rcu, about 8 ms here). It was tried and measured: forcing
// a grace period after each removal disturbed the machine's streams
// (BenchmarkPauseFloor's median pause went from 0.57-0.62 ms to 1.6-2.5
// ms, and its no-migration baseline's 99th percentile from under 1 ms to
// 14-15 ms), while a plain 8 ms sleep did not (nor, in a later A/B
// against the build before the late sweep, the 50 ms of lateDelay). A
// packet held up for longer than lateDelay in the middle of one rule's
// evaluation can still leave its element behind. An element removed while
// a wait is under way waits for the next round: 50 to 100 ms in all, and
// another round each time it is found re-created.

// lateDelay is how long the late sweep waits after a removal before it
// looks again: far beyond a packet's evaluation, even with its virtual
// CPU descheduled for a while.
const lateDelay = 50 * time.Millisecond

func lateWait() { time.Sleep(lateDelay) }

// lateAttempts bounds how many times the late sweep removes the same
// element: each removal is another commit that a packet may race, so a
// flow that keeps sending could keep its element forever; it then times
// out after Options.Idle, as before.
const lateAttempts = 4

// lateEntry is a removed element that the late sweep will look for: the
// wait before the look must begin after epoch was current.
type lateEntry struct {
	epoch    uint64
	attempts int
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
// closed: each round starts a new epoch, waits (lateWait), then deals
// with the elements queued before that epoch, a chunk at a time.
func (t *Table) lateSweep(done chan struct{}) {
	defer close(done)
	for round := 0; ; round++ {
		t.mu.Lock()
		if t.lateClosing && round > 0 {
			// Close waits for one round, not for Applies that go on
			// removing meanwhile.
			t.lateDone = nil
			t.mu.Unlock()
			return
		}
		cut := t.lateEpoch
		t.lateEpoch++
		wait := t.lateWait
		t.mu.Unlock()

		wait()

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
// If the kernel cannot be asked, the elements are all queued again, as
// many times. t.mu is held.
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
	found, n, err := t.removeStillThere(due)
	if err != nil {
		found = due
	} else {
		t.lateRemoved += n
	}
	for id, els := range found {
		for _, e := range els {
			k := elemKey{setID(id), string(e.key)}
			if a := tries[k] + 1; a < lateAttempts {
				t.late[k] = lateEntry{epoch: t.lateEpoch, attempts: a}
			}
		}
	}
	return more
}

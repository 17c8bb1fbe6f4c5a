package daemon

import (
	"context"
	"net/netip"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/peer"
)

// OrphanTimeout is how long this daemon keeps a transfer another
// daemon's transaction restored here without committing or aborting it.
// A source that dies in between never ends it; its own deadlines end a
// live connection-mode transaction within seconds. An expired transfer's
// sockets are thrown away (still in repair mode; if the flow was switched
// here already, its connection was lost with its source anyway).
const OrphanTimeout = time.Minute

// HoldOrphanTimeout is how long a steering point keeps a hold (another
// daemon's, or one of its own migrations') without switching or lifting
// it: longer than a
// process migration may take (the target gives one two minutes), which
// holds its flows from before the dump to after the restore. An expired
// hold is lifted, its queued packets sent on where they were going.
const HoldOrphanTimeout = 5 * time.Minute

// openHold is a hold this steering point made, and for whom ("" for
// itself).
type openHold struct {
	from string
	at   time.Time
}

// expire ends orphaned transactions until ctx is done: transfers after
// OrphanTimeout and holds after HoldOrphanTimeout, or both after the
// MTCP_FAULT orphan-after duration if set (tests).
func (d *Daemon) expire(ctx context.Context, after time.Duration) {
	transfers, holds := OrphanTimeout, HoldOrphanTimeout
	if after > 0 {
		transfers, holds = after, after
	}
	t := time.NewTicker(max(transfers/10, 100*time.Millisecond))
	defer t.Stop()
	// The table's index of what it holds keeps the elements the kernel
	// timed out (a flow whose rules were never removed) until it is
	// pruned (a chunk at a time, not to stall the migrations).
	reindex := time.NewTicker(max(d.cfg.FlowIdle/4, time.Minute))
	defer reindex.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-reindex.C:
			if n, err := d.nat.Prune(); err != nil {
				d.log.Warn("pruning the table's index of timed-out elements", "err", err)
			} else if n > 0 {
				d.log.Debug("pruned the table's index of timed-out elements", "elements", n)
			}
		case now := <-t.C:
			d.expireTransfers(now.Add(-transfers))
			d.expireHolds(now.Add(-holds))
			d.pruneSteered(now, d.cfg.FlowIdle+refreshEvery(d.cfg.FlowIdle))
		}
	}
}

// expireTransfers throws away the transfers restored before cutoff that
// are still waiting for their commit or abort.
func (d *Daemon) expireTransfers(cutoff time.Time) {
	var old []*incoming
	d.mu.Lock()
	for tx, in := range d.restoring {
		if in.started.Before(cutoff) {
			delete(d.restoring, tx)
			old = append(old, in)
		}
	}
	for tx, rec := range d.commits {
		select {
		case <-rec.done:
			if time.Since(rec.at) > CommitMemory {
				delete(d.commits, tx)
			}
		default: // under way
		}
	}
	d.mu.Unlock()
	for _, in := range old {
		err := d.discardIncoming(in)
		d.log.Warn("discarded a transfer its source neither committed nor aborted", "from", in.from, "flows", len(in.items), "age", time.Since(in.started).Round(time.Second), "err", err)
	}
}

// noteHolds records the holds a peer (or this host, "") made (hold), or
// forgets them (switch, unhold), so that expireHolds lifts those never
// switched nor lifted: their source died, or lost their switch.
func (d *Daemon) noteHolds(from, op string, flows []migrate.Flow) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, f := range flows {
		if op == peer.SteerHold {
			d.openHolds[f] = openHold{from: from, at: time.Now()}
		} else {
			delete(d.openHolds, f)
		}
	}
}

// expireHolds lifts the holds made before cutoff and never switched or
// lifted.
func (d *Daemon) expireHolds(cutoff time.Time) {
	// A new hold of a flow made between the choice and the lift would be
	// lifted with the old one.
	d.holdMu.Lock()
	defer d.holdMu.Unlock()
	by := map[string][]migrate.Flow{}
	d.mu.Lock()
	for f, h := range d.openHolds {
		if h.at.Before(cutoff) {
			delete(d.openHolds, f)
			by[h.from] = append(by[h.from], f)
		}
	}
	d.mu.Unlock()
	for from, fs := range by {
		err := d.steerLocal("", peer.SteerUnhold, fs, netip.Addr{})
		d.log.Warn("lifted holds their source never switched nor lifted", "from", from, "flows", len(fs), "err", err)
	}
}

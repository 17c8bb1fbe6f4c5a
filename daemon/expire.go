package daemon

import (
	"context"
	"net/netip"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/peer"
)

// OrphanTimeout is how long this daemon keeps what another daemon's
// transaction left here without ending it: a transfer restored here but
// neither committed nor aborted, a hold asked for but neither switched
// nor lifted. A source that dies in between never ends them; its own
// deadlines end a live transaction within seconds. An expired transfer's
// sockets are thrown away (still in repair mode: the client sees nothing)
// and an expired hold is lifted, its queued packets sent on where they
// were going.
const OrphanTimeout = time.Minute

// remoteHold is a hold another daemon asked this steering point for.
type remoteHold struct {
	from string
	at   time.Time
}

// expire ends orphaned transactions every tenth of after, until ctx is
// done.
func (d *Daemon) expire(ctx context.Context, after time.Duration) {
	t := time.NewTicker(max(after/10, 100*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			d.expireTransfers(now.Add(-after))
			d.expireHolds(now.Add(-after))
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
	d.mu.Unlock()
	for _, in := range old {
		err := d.discardIncoming(in)
		d.log.Warn("discarded a transfer its source neither committed nor aborted", "from", in.from, "flows", len(in.items), "age", time.Since(in.started).Round(time.Second), "err", err)
	}
}

// noteHolds records the holds a peer asked for (hold), or forgets them
// (switch, unhold).
func (d *Daemon) noteHolds(from, op string, flows []migrate.Flow) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, f := range flows {
		if op == peer.SteerHold {
			d.remoteHolds[f] = remoteHold{from: from, at: time.Now()}
		} else {
			delete(d.remoteHolds, f)
		}
	}
}

// expireHolds lifts the holds peers asked for before cutoff and never
// switched or lifted.
func (d *Daemon) expireHolds(cutoff time.Time) {
	by := map[string][]migrate.Flow{}
	d.mu.Lock()
	for f, h := range d.remoteHolds {
		if h.at.Before(cutoff) {
			delete(d.remoteHolds, f)
			by[h.from] = append(by[h.from], f)
		}
	}
	d.mu.Unlock()
	for from, fs := range by {
		err := d.steerLocal(peer.SteerUnhold, fs, netip.Addr{})
		d.log.Warn("lifted holds their source never switched nor lifted", "from", from, "flows", len(fs), "err", err)
	}
}

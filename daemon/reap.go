package daemon

import (
	"context"
	"net/netip"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/repair"
)

// allStates are the TCP states in which a socket is still exchanging
// segments of its connection.
var allStates = []repair.TCPState{repair.StateEstablished, repair.StateFinWait1, repair.StateFinWait2,
	repair.StateCloseWait, repair.StateLastAck, repair.StateClosing}

// ReapInterval is how often the daemon looks for migrated connections that
// have ended.
const ReapInterval = 2 * time.Second

// UnclaimedReapInterval is how often the daemon looks for the ended
// connections that no application reports: those of processes that moved
// here, and those found again after a restart that no application has
// claimed. It asks the kernel for their sockets, one listing per local
// port.
const UnclaimedReapInterval = 10 * time.Second

// reap removes the rules of migrated connections that have ended here (the
// application closed them after a FIN or RST): this host's reply rewrite,
// and the flow's steering at its steering point. The nftables idle timeout
// is the safety net for what this misses (a daemon restart, a dead peer).
func (d *Daemon) reap(ctx context.Context, unclaimedEvery time.Duration) {
	t := time.NewTicker(ReapInterval)
	defer t.Stop()
	slow := time.NewTicker(unclaimedEvery)
	defer slow.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-slow.C:
			d.reapUnclaimed(ctx)
			continue
		case <-t.C:
		}
		live := map[app.Tuple]bool{}
		for _, svc := range d.apps.Services() {
			for _, tu := range d.apps.Conns(svc) {
				live[tu] = true
			}
		}
		// Most sweeps find every moved connection still served: skip the
		// kernel's socket dump then (it costs seconds with 100k sockets).
		d.mu.Lock()
		candidates := false
		for tu := range d.moved {
			switch {
			case live[tu] && !d.adopted[tu]:
				// Found again after a restart (reconcile): adopted once
				// its application reports it.
				d.adopted[tu] = true
			case !live[tu] && d.adopted[tu]:
				candidates = true
			}
		}
		if !candidates {
			clear(d.missing) // every one was seen: no sweep in a row
		}
		d.mu.Unlock()
		if !candidates {
			continue
		}
		// A socket the application closed may still exchange its last
		// segments (FIN_WAIT, CLOSING, LAST_ACK): its rules stay until
		// the kernel is done with it. TIME_WAIT is not waited for (60 s):
		// only a lost last ACK would make the peer repeat its FIN then.
		kernel, err := repair.List(ctx, repair.ListOptions{States: allStates})
		if err != nil {
			d.log.Warn("listing sockets", "err", err)
			continue
		}
		for _, c := range kernel {
			live[app.Tuple{Local: c.Local, Remote: c.Remote}] = true
		}
		var ended []migrate.Flow
		var b nat.Batch
		d.mu.Lock()
		for tu, f := range d.moved {
			// A connection being imported is in moved before its
			// application reports it, and the report of a connection can
			// trail the acknowledgement of its import: only a connection
			// the application has taken and has not reported for two
			// sweeps in a row has ended.
			if live[tu] || !d.adopted[tu] {
				delete(d.missing, tu)
				continue
			}
			if d.missing[tu]++; d.missing[tu] < 2 {
				continue
			}
			delete(d.missing, tu)
			if _, frozen := d.frozen[f]; frozen {
				continue // being migrated away right now
			}
			delete(d.moved, tu)
			d.movedChanged()
			delete(d.adopted, tu)
			ended = append(ended, f)
			if tu.Local != f.Service {
				b.Remove(natFlow(f))
			}
		}
		d.mu.Unlock()
		d.endRules(ctx, ended, &b)
	}
}

// endRules removes the rules of ended connections: b, this host's
// elements, and the flows' steering at their steering points.
func (d *Daemon) endRules(ctx context.Context, ended []migrate.Flow, b *nat.Batch) {
	if len(ended) == 0 {
		return
	}
	if b.Len() > 0 {
		if err := d.nat.Apply(b); err != nil {
			d.log.Warn("removing rules of ended connections", "err", err)
		}
	}
	// Switching a flow "home", to the address it was dialled at, removes
	// its steering.
	home := map[netip.Addr][]migrate.Flow{}
	for _, f := range ended {
		home[f.Service.Addr()] = append(home[f.Service.Addr()], f)
	}
	for addr, fs := range home {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := (steering{d}).Switch(sctx, fs, addr); err != nil {
			d.log.Warn("removing the steering of ended connections", "flows", len(fs), "err", err)
		}
		cancel()
	}
	d.log.Info("connections ended", "flows", len(ended))
}

// reapUnclaimed removes the rules of connections that moved here and that
// no application reports, once the kernel has had no socket for them in
// two sweeps in a row: the connections of processes that moved here, and
// those a restart found again from their rules that no application has
// claimed. While a process or connections migrate to or from here it
// does nothing: a leaving process's sockets go before its flows are
// forgotten, and arriving connections are not adopted yet.
func (d *Daemon) reapUnclaimed(ctx context.Context) {
	type unclaimed struct {
		tu   app.Tuple
		f    migrate.Flow
		proc bool
	}
	var cands []unclaimed
	d.proc.mu.Lock()
	busy := len(d.proc.leaving)+len(d.proc.in) > 0
	for tu, f := range d.proc.flows {
		cands = append(cands, unclaimed{tu, f, true})
	}
	d.proc.mu.Unlock()
	d.mu.Lock()
	// Connections migrating in or out are not adopted yet, or about to
	// go: wait for a quiet moment (a drain would pay for listing
	// thousands of sockets it is moving).
	busy = busy || len(d.restoring)+len(d.frozen) > 0
	if !busy {
		for tu, f := range d.moved {
			if !d.adopted[tu] {
				cands = append(cands, unclaimed{tu, f, false})
			}
		}
	}
	d.mu.Unlock()
	if busy || len(cands) == 0 {
		clear(d.unseen)
		return
	}
	live := map[app.Tuple]bool{}
	ports := map[uint16]bool{}
	for _, c := range cands {
		if p := c.tu.Local.Port(); !ports[p] {
			ports[p] = true
			kernel, err := repair.List(ctx, repair.ListOptions{States: allStates, Port: p})
			if err != nil {
				d.log.Warn("listing sockets", "port", p, "err", err)
				return
			}
			for _, k := range kernel {
				live[unmapTuple(app.Tuple{Local: k.Local, Remote: k.Remote})] = true
			}
		}
	}
	var ended []migrate.Flow
	var b nat.Batch
	seen := map[app.Tuple]bool{}
	d.proc.mu.Lock()
	d.mu.Lock()
	for _, c := range cands {
		seen[c.tu] = true
		if live[unmapTuple(c.tu)] {
			delete(d.unseen, c.tu)
			continue
		}
		if d.unseen[c.tu]++; d.unseen[c.tu] < 2 {
			continue
		}
		delete(d.unseen, c.tu)
		// Still what it was when listed (not adopted, migrated away or
		// ended by someone else meanwhile)?
		if c.proc {
			if f, ok := d.proc.flows[c.tu]; !ok || f != c.f {
				continue
			}
			delete(d.proc.flows, c.tu)
		} else {
			if f, ok := d.moved[c.tu]; !ok || f != c.f || d.adopted[c.tu] {
				continue
			}
			if _, frozen := d.frozen[c.f]; frozen {
				continue
			}
			delete(d.moved, c.tu)
			d.movedChanged()
		}
		ended = append(ended, c.f)
		if c.tu.Local != c.f.Service {
			b.Remove(natFlow(c.f))
		}
	}
	for tu := range d.unseen {
		if !seen[tu] {
			delete(d.unseen, tu)
		}
	}
	d.mu.Unlock()
	d.proc.mu.Unlock()
	d.endRules(ctx, ended, &b)
}

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
		d.retryEnded(ctx)
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
		var ended, local []migrate.Flow
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
				local = append(local, f)
			}
		}
		d.mu.Unlock()
		d.endRules(ctx, ended, local)
	}
}

// endRules removes the rules of ended connections: this host's elements
// of the flows in local, and the steering of every one at its steering
// point. What fails is tried again at the next sweeps (retryEnded).
func (d *Daemon) endRules(ctx context.Context, ended, local []migrate.Flow) {
	if len(ended) == 0 {
		return
	}
	failedSteer, failedLocal := d.removeRules(ctx, ended, local)
	now := time.Now()
	d.noteEnding(failedSteer, failedLocal, func(migrate.Flow) time.Time { return now })
	d.log.Info("connections ended", "flows", len(ended))
}

// noteEnding records in d.ending the steering and local rules of ended
// connections left to remove, each since the time since gives it.
func (d *Daemon) noteEnding(steer, local []migrate.Flow, since func(migrate.Flow) time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	entry := func(f migrate.Flow) *endingRules {
		e, ok := d.ending[f]
		if !ok {
			e = &endingRules{since: since(f)}
			d.ending[f] = e
		}
		return e
	}
	for _, f := range steer {
		entry(f).steer = true
	}
	for _, f := range local {
		entry(f).local = true
	}
}

// removeRules is endRules' work: it removes the steering of unsteer and
// this host's elements of local, and returns what it could not remove.
func (d *Daemon) removeRules(ctx context.Context, unsteer, local []migrate.Flow) (failedSteer, failedLocal []migrate.Flow) {
	if len(local) > 0 {
		var b nat.Batch
		for _, f := range local {
			b.Remove(natFlow(f))
		}
		if err := d.nat.Apply(&b); err != nil {
			d.log.Warn("removing rules of ended connections", "flows", len(local), "err", err)
			failedLocal = local
		}
	}
	// Switching a flow "home", to the address it was dialled at, removes
	// its steering.
	home := map[netip.Addr][]migrate.Flow{}
	for _, f := range unsteer {
		home[f.Service.Addr()] = append(home[f.Service.Addr()], f)
	}
	for addr, fs := range home {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := (steering{d}).Switch(sctx, fs, addr); err != nil {
			d.log.Warn("removing the steering of ended connections", "flows", len(fs), "err", err)
			failedSteer = append(failedSteer, fs...)
		}
		cancel()
	}
	return failedSteer, failedLocal
}

// endingRetry is how long the removal of an ended connection's rules is
// tried again. Until their idle timeout (FlowIdle), they would send a
// new connection from the same client address and port where the old
// one went.
const endingRetry = 10 * time.Minute

// endingRules are what is left to remove of an ended connection's rules:
// its steering, its elements here, since it ended.
type endingRules struct {
	steer, local bool
	since        time.Time
}

// retryEnded tries again to remove the rules of ended connections that
// removeRules could not remove, until endingRetry has passed, and unless
// a connection of the same addresses is on this host again. It runs on
// the reaper's goroutine, as endRules does.
func (d *Daemon) retryEnded(ctx context.Context) {
	d.mu.Lock()
	retry := d.ending
	if len(retry) > 0 {
		d.ending = map[migrate.Flow]*endingRules{}
	}
	d.mu.Unlock()
	if len(retry) == 0 {
		return
	}
	here := d.hereAgain()
	var unsteer, local []migrate.Flow
	for f, e := range retry {
		if here(f) || time.Since(e.since) > endingRetry {
			continue
		}
		if e.steer {
			unsteer = append(unsteer, f)
		}
		if e.local {
			local = append(local, f)
		}
	}
	failedSteer, failedLocal := d.removeRules(ctx, unsteer, local)
	d.noteEnding(failedSteer, failedLocal, func(f migrate.Flow) time.Time { return retry[f].since })
	d.log.Info("tried again to remove the rules of ended connections", "steering", len(unsteer), "local", len(local),
		"steering_failed", len(failedSteer), "local_failed", len(failedLocal))
}

// reapUnclaimed removes the rules of connections that moved here and that
// no application reports, once the kernel has had no socket for them in
// two sweeps (a sweep that finds one starts again): the connections of
// processes that moved here, and
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
	if busy {
		// Counted again at the next quiet sweep: two quiet sweeps that
		// find no socket, not necessarily in a row (on a host that
		// migrates all the time, a row would be rare).
		return
	}
	if len(cands) == 0 {
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
	var ended, local []migrate.Flow
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
			local = append(local, c.f)
		}
	}
	for tu := range d.unseen {
		if !seen[tu] {
			delete(d.unseen, tu)
		}
	}
	d.mu.Unlock()
	d.proc.mu.Unlock()
	d.endRules(ctx, ended, local)
}

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

// reap removes the rules of migrated connections that have ended here (the
// application closed them after a FIN or RST): this host's reply rewrite,
// and the flow's steering at its steering point. The nftables idle timeout
// is the safety net for what this misses (a daemon restart, a dead peer).
func (d *Daemon) reap(ctx context.Context) {
	t := time.NewTicker(ReapInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
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
		if len(ended) == 0 {
			continue
		}
		if b.Len() > 0 {
			if err := d.nat.Apply(&b); err != nil {
				d.log.Warn("removing rules of ended connections", "err", err)
			}
		}
		// Switching a flow "home", to the address it was dialled at,
		// removes its steering.
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
}

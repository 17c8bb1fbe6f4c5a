package daemon

import (
	"context"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
)

// refreshEvery is how often the rules of the connections living here are
// refreshed: a quarter of their idle timeout, so that a refresh may fail
// (a steering point restarting) a few times before a rule times out.
func refreshEvery(idle time.Duration) time.Duration {
	return max(idle/4, 250*time.Millisecond)
}

// refresh keeps, until ctx is done, the rules of the connections that
// moved here and live on from timing out while they are silent (no data,
// no keepalive): the nftables elements time out after flow_idle without a
// packet, the safety net for ends the daemons miss. This host's own
// elements (reply rewrites) are refreshed here, the flows' steering at
// their steering points (SteerRefresh). A connection that ended stops
// being refreshed once the reaper has forgotten it, and its rules go then
// (or, missed, after flow_idle).
func (d *Daemon) refresh(ctx context.Context) {
	t := time.NewTicker(refreshEvery(d.cfg.FlowIdle))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		flows, err := d.livingHere(ctx)
		if err != nil {
			d.log.Warn("refreshing the rules of connections that moved here", "err", err)
			continue
		}
		if len(flows) == 0 {
			continue
		}
		if _, err := d.nat.Refresh(natFlows(flows)); err != nil {
			d.log.Warn("refreshing the rules of connections that moved here", "flows", len(flows), "err", err)
		}
		by := map[string][]migrate.Flow{}
		for _, f := range flows {
			if p, err := d.point(f); err == nil && p != "" {
				by[p] = append(by[p], f)
			}
		}
		for p, fs := range by {
			if err := d.refreshAt(ctx, p, fs); err != nil {
				d.log.Warn("refreshing the steering of connections that moved here", "steering_point", p, "flows", len(fs), "err", err)
			}
		}
	}
}

// livingHere returns the flows whose connections moved here (connection
// mode and process mode) and whose sockets the kernel still has: the
// rules of one that ended unnoticed (a process's connection, or one found
// again after a restart that no application reports) are left to time
// out.
func (d *Daemon) livingHere(ctx context.Context) ([]migrate.Flow, error) {
	d.mu.Lock()
	n := len(d.moved)
	d.mu.Unlock()
	d.proc.mu.Lock()
	n += len(d.proc.flows)
	d.proc.mu.Unlock()
	if n == 0 {
		return nil, nil
	}
	kernel, err := repair.List(ctx, repair.ListOptions{States: allStates})
	if err != nil {
		return nil, err
	}
	// Unmapped on both sides: a dual-stack socket's IPv4 connection is
	// listed with IPv4-mapped addresses.
	live := make(map[app.Tuple]bool, len(kernel))
	for _, c := range kernel {
		live[unmapTuple(app.Tuple{Local: c.Local, Remote: c.Remote})] = true
	}
	var out []migrate.Flow
	d.mu.Lock()
	for tu, f := range d.moved {
		if live[unmapTuple(tu)] {
			out = append(out, f)
		}
	}
	d.mu.Unlock()
	d.proc.mu.Lock()
	for tu, f := range d.proc.flows {
		if live[unmapTuple(tu)] {
			out = append(out, f)
		}
	}
	d.proc.mu.Unlock()
	return out, nil
}

// refreshBatch bounds the flows of one SteerRefresh request (about 40
// bytes each); the steering point looks their elements up by key, a few
// hundred flows at a time (nat.Table.Refresh).
const refreshBatch = 50000

// refreshAt asks steering point p to refresh the steering of flows.
func (d *Daemon) refreshAt(ctx context.Context, p string, fs []migrate.Flow) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pc, err := d.peer(rctx, p)
	if err != nil {
		return err
	}
	for lo := 0; lo < len(fs); lo += refreshBatch {
		chunk := fs[lo:min(lo+refreshBatch, len(fs))]
		ids := make([]peer.FlowID, len(chunk))
		for i, f := range chunk {
			ids[i] = peer.FlowID{Client: f.Client, Service: f.Service}
		}
		if err := pc.Steer(rctx, &peer.SteerRequest{Op: peer.SteerRefresh, Flows: ids}); err != nil {
			return err
		}
	}
	return nil
}

package daemon

import (
	"context"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/peer"
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
		flows := d.livingHere()
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
// mode and process mode) and are not known to have ended.
func (d *Daemon) livingHere() []migrate.Flow {
	var out []migrate.Flow
	d.mu.Lock()
	for _, f := range d.moved {
		out = append(out, f)
	}
	d.mu.Unlock()
	d.proc.mu.Lock()
	for _, f := range d.proc.flows {
		out = append(out, f)
	}
	d.proc.mu.Unlock()
	return out
}

// refreshBatch bounds the flows of one SteerRefresh request.
const refreshBatch = 1000

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

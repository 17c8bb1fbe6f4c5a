package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
)

// steering is the migrate.Steering of a transaction: it sends each flow's
// hold and switch to the flow's steering point — this host, the host that
// owns the service address, or the gateway.
type steering struct{ d *Daemon }

// point returns the peer that steers f ("" for this host).
func (d *Daemon) point(f migrate.Flow) (string, error) {
	if d.cfg.Steering == "gateway" {
		if d.cfg.Gateway == d.cfg.Name {
			return "", nil // this daemon is the gateway
		}
		return d.cfg.Gateway, nil
	}
	p, ok := d.owner(f.Service.Addr())
	if !ok {
		return "", fmt.Errorf("no member of the pool owns service address %v (check service_addrs)", f.Service.Addr())
	}
	return p, nil
}

func (s steering) each(ctx context.Context, flows []migrate.Flow, op string, to netip.Addr) error {
	groups := map[string][]migrate.Flow{}
	for _, f := range flows {
		p, err := s.d.point(f)
		if err != nil {
			return err
		}
		groups[p] = append(groups[p], f)
	}
	var errs []error
	for p, fs := range groups {
		if p == "" {
			errs = append(errs, s.d.steerLocal("", op, fs, to))
			continue
		}
		pc, err := s.d.peer(ctx, p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ids := make([]peer.FlowID, len(fs))
		for i, f := range fs {
			ids[i] = peer.FlowID{Client: f.Client, Service: f.Service}
		}
		errs = append(errs, pc.Steer(ctx, &peer.SteerRequest{Op: op, Flows: ids, To: to}))
	}
	return errors.Join(errs...)
}

// Hold queues the flows' client packets at their steering points.
func (s steering) Hold(ctx context.Context, flows []migrate.Flow) error {
	return s.each(ctx, flows, peer.SteerHold, netip.Addr{})
}

// Switch sends the flows to the target.
func (s steering) Switch(ctx context.Context, flows []migrate.Flow, to netip.Addr) error {
	return s.each(ctx, flows, peer.SteerSwitch, to)
}

// Unhold lets the flows' packets go where they went before.
func (s steering) Unhold(ctx context.Context, flows []migrate.Flow) error {
	return s.each(ctx, flows, peer.SteerUnhold, netip.Addr{})
}

// LostSwitchRetry is how long a source tries again, in the background,
// the switch of flows a migration lost there (it failed twice, the target
// owning them already): once a second, for a steering point that comes
// back or restarts meanwhile. Then it lifts their holds, so that they do
// not fill the queue for good; their clients get resets from wherever
// their packets then go.
const LostSwitchRetry = time.Minute

// keepSwitching is LostSwitchRetry's work for the flows of a migration to
// tgt that failed at their switch. It tries each steering point's flows
// of each family on their own, and lets go of a flow once its switch went
// through, or once it is on this host again (migrated back, or leaving
// again): its steering is no longer this migration's.
func (d *Daemon) keepSwitching(flows []migrate.Flow, tgt migrate.Target) {
	st := steering{d}
	type group struct {
		point string
		fam   int
	}
	groups := map[group][]migrate.Flow{}
	for fam, fs := range migrate.ByFamily(flows) {
		for _, f := range fs {
			p, err := d.point(f)
			if err != nil {
				continue // no steering point any more (a new configuration)
			}
			groups[group{p, fam}] = append(groups[group{p, fam}], f)
		}
	}
	try := func(op func(context.Context, []migrate.Flow, int) error) (ok, left int) {
		here := d.hereAgain()
		for g, fs := range groups {
			if fs = slices.DeleteFunc(fs, here); len(fs) == 0 {
				delete(groups, g)
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), migrate.DefaultDeadlines.Switch)
			err := op(ctx, fs, g.fam)
			cancel()
			if err == nil {
				ok += len(fs)
				delete(groups, g)
				continue
			}
			groups[g], left = fs, left+len(fs)
		}
		return ok, left
	}
	switchOp := func(ctx context.Context, fs []migrate.Flow, fam int) error { return st.Switch(ctx, fs, tgt.Addr(fam)) }
	for end := time.Now().Add(LostSwitchRetry); len(groups) > 0; {
		time.Sleep(time.Second)
		if ok, left := try(switchOp); ok > 0 {
			d.log.Info("switched flows a migration had lost at its switch", "to", tgt.Name(), "flows", ok, "left", left)
		}
		if len(groups) > 0 && time.Now().After(end) {
			lifted, kept := try(func(ctx context.Context, fs []migrate.Flow, _ int) error { return st.Unhold(ctx, fs) })
			d.log.Error("gave up switching flows a migration lost at its switch; their holds lifted", "to", tgt.Name(), "flows", lifted+kept, "holds_kept", kept)
			return
		}
	}
}

// hereAgain returns a test of whether a flow is on this host again: served
// by an application or a process that moved here, restored or imported
// here, or frozen to leave.
func (d *Daemon) hereAgain() func(migrate.Flow) bool {
	here := map[migrate.Flow]bool{}
	for _, lf := range d.localFlows() {
		here[lf.Flow] = true
	}
	d.proc.mu.Lock()
	for _, f := range d.proc.flows {
		here[f] = true
	}
	d.proc.mu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, f := range d.moved {
		here[f] = true
	}
	for f := range d.frozen {
		here[f] = true
	}
	for _, in := range d.restoring {
		for _, it := range in.items {
			here[it.flow] = true
		}
	}
	return func(f migrate.Flow) bool { return here[f] }
}

// lostAtSwitch lists the flows of r that failed at their switch past the
// point of no return (the target owns them).
func lostAtSwitch(r *migrate.Report) []migrate.Flow {
	if r == nil || r.Aborted {
		return nil
	}
	var out []migrate.Flow
	for f, err := range r.Failed {
		if pe, ok := errors.AsType[*migrate.PhaseError](err); ok && pe.Phase == migrate.PhaseSwitch {
			out = append(out, f)
		}
	}
	return out
}

// RepliesNeedSwitch is true with gateway steering: the gateway gives the
// target's replies the service address only from the switch on. With
// forward steering the target installs its own rewrite before it answers
// the transfer.
func (s steering) RepliesNeedSwitch() bool { return s.d.cfg.Steering == "gateway" }

// Steer is the peer request behind remote holds and switches.
func (d *Daemon) Steer(ctx context.Context, from string, r *peer.SteerRequest) error {
	fs := make([]migrate.Flow, len(r.Flows))
	for i, id := range r.Flows {
		fs[i] = migrate.Flow{Client: id.Client, Service: id.Service}
		if p, err := d.point(fs[i]); err != nil || p != "" {
			return fmt.Errorf("%s is not the steering point of %v", d.cfg.Name, fs[i])
		}
	}
	r.To = r.To.Unmap() // as the rules and the home check below take it
	if r.Op == peer.SteerSwitch {
		if _, ok := d.owner(r.To); !ok {
			return fmt.Errorf("%v is not a service address of the pool: %s switches flows only to its members", r.To, d.cfg.Name)
		}
	}
	if r.Op == peer.SteerRefresh {
		// Refreshing is not all or nothing: flows that from does not
		// serve (ended, moved on meanwhile) are left to time out.
		fs = d.servedBy(from, fs)
	} else if err := d.maySteer(from, r.Op, fs); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		// The member gave up on it (its deadline passed): applied now, a
		// hold could come after the unhold of the abort that followed,
		// and hold the flow for good.
		return fmt.Errorf("%s on %s: %w", r.Op, d.cfg.Name, err)
	}
	if err := d.steerLocal(from, r.Op, fs, r.To); err != nil {
		return err
	}
	if r.Op == peer.SteerSwitch && len(fs) > 0 && r.To != fs[0].Service.Addr().Unmap() {
		return fault(ctx, "switched") // switched-refuse: the answer is lost (tests)
	}
	return nil
}

// steerLocal changes this host's rules for flows it steers (one nftables
// transaction, and for a switch a second that lifts the holds once the new
// destinations are in). A switch or an unhold re-delivers the packets the
// holds queued before it lifts them, so that they meet the new rules (or
// the old ones) ahead of the packets that come once the holds are gone:
// overtaken, they would look lost to the receiver, which would have the
// client send them again. by is the member that asked ("" for this
// host): a switch whose new destinations went in, and a refresh, are
// recorded for it (noteSwitched, noteRefreshed).
func (d *Daemon) steerLocal(by, op string, flows []migrate.Flow, to netip.Addr) error {
	if len(flows) == 0 {
		return nil
	}
	if op == peer.SteerRefresh {
		_, err := d.nat.Refresh(natFlows(flows))
		if err == nil {
			d.noteRefreshed(by, flows)
		}
		return err
	}
	var b nat.Batch
	for _, mf := range flows {
		f := natFlow(mf)
		switch op {
		case peer.SteerHold:
			b.Hold(f)
		case peer.SteerUnhold:
			b.Unhold(f)
		case peer.SteerSwitch:
			// Remove drops the hold and the old destination together; the
			// new destination goes in the same transaction.
			b.Remove(f)
			home := to == f.Service.Addr()
			switch {
			case d.cfg.Role == "gateway":
				if !home {
					b.Forward(f, to)
					b.GatewayReply(f, to)
				}
			case !home:
				b.Forward(f, to)
			}
		default:
			return fmt.Errorf("unknown steering operation %q", op)
		}
	}
	fs := natFlows(flows)
	if op == peer.SteerHold {
		d.holdMu.Lock()
		defer d.holdMu.Unlock()
		// A flow whose last holds could not be lifted is still passing
		// (below): end that, or the new hold would not hold.
		if err := d.q.EndPass(fs...); err != nil {
			return err
		}
		err := d.nat.Apply(&b)
		if err == nil {
			d.noteHolds(by, op, flows)
		}
		return err
	}
	var err error
	if op == peer.SteerSwitch {
		err = switchRulesFault(to == flows[0].Service.Addr().Unmap(), fs, d.q.HeldOf)
	}
	if err == nil {
		err = d.nat.ApplyThen(&b, func() error {
			_, err := d.q.Pass(fs...)
			return err
		})
	}
	if op == peer.SteerSwitch && switched(err) {
		d.noteSwitched(by, flows, to)
	}
	if switched(err) && !errors.Is(err, nat.ErrHoldsKept) {
		d.noteHolds(by, op, flows) // lifted: forgotten (kept, they expire)
	}
	if errors.Is(err, nat.ErrHoldsKept) {
		// The new rules are in but the holds stay, even after a few
		// tries: the pass stays on, so that what they queue goes on at
		// once, one packet at a time through the queue, until
		// expireHolds lifts them (their record stays) or a next
		// migration of the flows replaces them. The flows go where they
		// should: for the caller, done.
		d.log.Error("holds could not be lifted; their flows' packets pass through the queue until they are lifted again",
			"op", op, "flows", len(flows), "after", HoldOrphanTimeout, "err", err)
		return nil
	}
	if op == peer.SteerSwitch && err != nil && !switched(err) {
		// The holds are in with the old destinations: what they queued
		// stays queued for what comes next (the switch tried again, the
		// switch back to the source, or the holds lifted), instead of
		// going on to the frozen source, which would keep it from the
		// target (the client would send it again).
		return err
	}
	// Ends the pass, and sends on anything left held (if the pass
	// failed).
	_, rerr := d.q.Release(fs...)
	if errors.Is(err, nat.ErrApplied) && rerr == nil {
		// Only a step after the change failed (the pass, a second look
		// for elements a packet put back): the flows go where they
		// should.
		d.log.Warn("steering changed, with a failure after it", "op", op, "flows", len(flows), "err", err)
		return nil
	}
	return errors.Join(err, rerr)
}

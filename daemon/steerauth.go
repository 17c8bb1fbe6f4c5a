package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
)

// A steering point holds and switches a flow for the member that serves
// it, and for no other: a member, even a compromised one, cannot take
// another member's connections by sending their flows' switches. The
// member serving a flow is the one its last switch here sent it to, or,
// before any, the owner of the address its client dialled. The member
// that asked for that switch may also steer the flow for a while after it
// (switchUndoWindow), to undo it: a process migration whose memory pages
// stop coming after the switch, or a restarted source finishing its
// journal, steers its flows back.

// switchUndoWindow is how long the member that switched a flow away may
// still steer it: longer than a process migration's lazy pages may take
// after its switch.
const switchUndoWindow = 2 * lazyPagesTimeout

// steered is where a flow this host steers went at its last switch here.
type steered struct {
	at   string    // the member serving the flow ("" for this host)
	by   string    // the member that asked for the switch ("" for this host)
	when time.Time // the switch
	seen time.Time // the switch, or the last refresh from at since
}

// server returns who serves f as this steering point knows it (the
// member's name, "" for this host): where its last switch sent it, else
// the owner of the address its client dialled. d.mu is held.
func (d *Daemon) server(f migrate.Flow) steered {
	if st, ok := d.steered[f]; ok {
		return st
	}
	at, ok := d.owner(f.Service.Addr())
	if !ok {
		at = "?"
	}
	return steered{at: at, by: at}
}

// maySteer refuses a peer's steering request unless from serves every one
// of the flows, or switched it away within switchUndoWindow.
func (d *Daemon) maySteer(from, op string, flows []migrate.Flow) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, f := range flows {
		st := d.server(f)
		if st.at == from || (st.by == from && time.Since(st.when) < switchUndoWindow) {
			continue
		}
		at := st.at
		if at == "" {
			at = d.cfg.Name
		}
		return fmt.Errorf("%s does not %s %v for %s: %s serves that connection", d.cfg.Name, op, f, from, at)
	}
	return nil
}

// servedBy returns the flows of flows that from serves.
func (d *Daemon) servedBy(from string, flows []migrate.Flow) []migrate.Flow {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.DeleteFunc(flows, func(f migrate.Flow) bool {
		return d.server(f).at != from
	})
}

// switched tells whether a switch whose rules' transaction ended with err
// sent its flows on: it did if the error says that a step after the new
// destinations went in failed (its holds could not be lifted, say).
func switched(err error) bool { return err == nil || errors.Is(err, nat.ErrApplied) }

// noteSwitched records that member by ("" for this host) had flows
// switched to to.
func (d *Daemon) noteSwitched(by string, flows []migrate.Flow, to netip.Addr) {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	at, _ := d.owner(to)
	for _, f := range flows {
		d.steered[f] = steered{at: at, by: by, when: now, seen: now}
	}
}

// noteRefreshed records that member by refreshed flows, which keeps the
// records of those it serves.
func (d *Daemon) noteRefreshed(by string, flows []migrate.Flow) {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, f := range flows {
		if st, ok := d.steered[f]; ok && st.at == by {
			st.seen = now
			d.steered[f] = st
		}
	}
}

// relearnSteered records, after a restart, where the forward entries send
// their flows. Who switched them is lost with the previous run: only
// their servers may steer them now.
func (d *Daemon) relearnSteered(fwd []nat.Entry) {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range fwd {
		at, ok := d.owner(e.Addr)
		if !ok {
			continue
		}
		d.steered[migrate.Flow{Client: e.Flow.Client, Service: e.Flow.Service}] = steered{at: at, by: at, seen: now}
	}
}

// pruneSteered forgets the flows whose record no longer adds anything:
// those switched back to the owner of their address once their undo
// window has passed, and those not switched nor refreshed for longer than
// their rules live here (idle: their forward entries have timed out).
func (d *Daemon) pruneSteered(now time.Time, idle time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for f, st := range d.steered {
		home, _ := d.owner(f.Service.Addr())
		if (st.at == home && now.Sub(st.when) >= switchUndoWindow) || now.Sub(st.seen) > idle {
			delete(d.steered, f)
		}
	}
}

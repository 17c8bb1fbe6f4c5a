package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/repair"
)

// outgoing is a flow captured here and waiting for the transaction's
// verdict.
type outgoing struct {
	flow   migrate.Flow
	tuple  app.Tuple
	exp    *app.Exported
	frozen *repair.Frozen
}

// source is this daemon as the migrate.Source of a transaction.
type source struct{ d *Daemon }

// locate finds the local socket of flow f and the application serving it.
func (d *Daemon) locate(f migrate.Flow) (app.Tuple, string, error) {
	t := app.Tuple{Local: f.Service, Remote: f.Client}
	d.mu.Lock()
	for lt, mf := range d.moved {
		if mf == f {
			t = lt
			break
		}
	}
	d.mu.Unlock()
	svc, ok := d.appFor(t.Local.Port())
	if !ok {
		return t, "", fmt.Errorf("no application registered here serves port %d", t.Local.Port())
	}
	return t, svc, nil
}

// appFor returns the registered application service listening on port.
func (d *Daemon) appFor(port uint16) (string, bool) {
	if d.apps == nil {
		return "", false
	}
	for _, s := range d.apps.Services() {
		if servicePort(s) == port {
			return s, true
		}
	}
	return "", false
}

// servicePort extracts the port of an application service such as ":7000"
// or "10.77.2.11:7000".
func servicePort(s string) uint16 {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return 0
	}
	p, _ := strconv.ParseUint(s[i+1:], 10, 16)
	return uint16(p)
}

func (s source) Capture(ctx context.Context, flows []migrate.Flow) ([]migrate.Item, []error, error) {
	d := s.d
	got := make([]migrate.Item, len(flows))
	errs := make([]error, len(flows))
	// Each capture waits for its application to stop serving the
	// connection: overlap those round trips.
	parallel(len(flows), func(i int) { got[i], errs[i] = d.captureOne(ctx, flows[i]) })
	items := make([]migrate.Item, 0, len(flows))
	var b nat.Batch
	for i := range got {
		if errs[i] == nil {
			items = append(items, got[i])
			if t := d.frozenTuple(flows[i]); t.Local != flows[i].Service {
				b.ReplyFrom(natFlow(flows[i]), t.Local)
			}
		}
	}
	// With gateway steering the switch moves the gateway's reply rewrite
	// to the target at once, but the frozen socket here may still emit an
	// ACK or a retransmission until it is discarded: give those the
	// service address too, or the client would answer them with a RST.
	// (With forward steering this host's own rewrite, if any, stays until
	// Discard; a connection still on its first server needs none.)
	if d.cfg.Steering == "gateway" && b.Len() > 0 {
		if err := d.nat.Apply(&b); err != nil {
			return nil, nil, errors.Join(err, s.Thaw(ctx, migrate.FlowsOf(items)))
		}
	}
	return items, errs, nil
}

func (d *Daemon) frozenTuple(f migrate.Flow) app.Tuple {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.frozen[f].tuple
}

// workers bounds the concurrent application round trips of a batch.
const workers = 32

// parallel calls fn(0) ... fn(n-1) on up to workers goroutines.
func parallel(n int, fn func(i int)) {
	if n == 1 {
		fn(0)
		return
	}
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(n, workers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// captureOne takes f from its application (with the application's
// snapshot), freezes the socket and captures it. On error the flow is left
// as it was.
func (d *Daemon) captureOne(ctx context.Context, f migrate.Flow) (migrate.Item, error) {
	t, svc, err := d.locate(f)
	if err != nil {
		return migrate.Item{}, err
	}
	exp, err := d.apps.Export(ctx, svc, t)
	if err != nil {
		return migrate.Item{}, err
	}
	undo := func(err error) (migrate.Item, error) {
		exp.Socket.Close()
		return migrate.Item{}, errors.Join(err, exp.Finish(context.WithoutCancel(ctx), false))
	}
	fr, err := repair.Freeze(exp.Socket)
	if err != nil {
		return undo(err)
	}
	st, err := fr.Capture()
	if err == nil && (st.Local != t.Local || st.Remote != t.Remote) {
		err = fmt.Errorf("the application gave socket %v->%v for flow %v", st.Local, st.Remote, f)
	}
	var blob []byte
	if err == nil {
		blob, err = st.MarshalBinary()
	}
	if err != nil {
		return undo(errors.Join(err, fr.Thaw()))
	}
	d.mu.Lock()
	d.frozen[f] = &outgoing{flow: f, tuple: t, exp: exp, frozen: fr}
	d.mu.Unlock()
	return migrate.Item{Flow: f, App: svc, State: blob, Snapshot: exp.Snapshot}, nil
}

func (d *Daemon) takeFrozen(flows []migrate.Flow) []*outgoing {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*outgoing
	for _, f := range flows {
		if o, ok := d.frozen[f]; ok {
			out = append(out, o)
			delete(d.frozen, f)
		}
	}
	return out
}

// Thaw lets the flows carry on here: the sockets leave repair mode and go
// back to their application.
func (s source) Thaw(ctx context.Context, flows []migrate.Flow) error {
	d := s.d
	outs := d.takeFrozen(flows)
	errs := make([]error, len(outs))
	parallel(len(outs), func(i int) {
		o := outs[i]
		errs[i] = errors.Join(o.frozen.Thaw(), o.exp.Finish(ctx, false), o.exp.Socket.Close())
	})
	if d.cfg.Steering == "gateway" && len(outs) > 0 {
		// The switch did not happen: the gateway still rewrites the
		// flow's replies, and the rewrite Capture added here goes.
		var b nat.Batch
		for _, o := range outs {
			b.Remove(natFlow(o.flow))
		}
		errs = append(errs, d.nat.Apply(&b))
	}
	return errors.Join(errs...)
}

// Discard drops the frozen sockets of flows the target owns now: the
// application closes its descriptor, and ours is the last one, closed in
// repair mode so that nothing reaches the client. The reply rewrite of a
// flow that had migrated in goes too.
func (s source) Discard(ctx context.Context, flows []migrate.Flow) error {
	d := s.d
	outs := d.takeFrozen(flows)
	errs := make([]error, 2*len(outs))
	parallel(len(outs), func(i int) {
		errs[2*i], errs[2*i+1] = outs[i].exp.Finish(ctx, true), outs[i].frozen.Discard()
	})
	var b nat.Batch
	rules := 0
	for _, o := range outs {
		d.mu.Lock()
		_, movedIn := d.moved[o.tuple]
		delete(d.moved, o.tuple)
		delete(d.adopted, o.tuple)
		d.mu.Unlock()
		if (movedIn && o.tuple.Local.Addr() != o.flow.Service.Addr()) || d.cfg.Steering == "gateway" {
			b.Remove(natFlow(o.flow))
			rules++
		}
	}
	if rules > 0 {
		errs = append(errs, d.nat.Apply(&b))
	}
	return errors.Join(errs...)
}

func natFlow(f migrate.Flow) nat.Flow { return nat.Flow{Client: f.Client, Service: f.Service} }

func natFlows(fs []migrate.Flow) []nat.Flow {
	out := make([]nat.Flow, len(fs))
	for i, f := range fs {
		out[i] = natFlow(f)
	}
	return out
}

// localFlows returns the flows served here, for migrate requests and the
// connection list: every connection the applications report, with the
// address the client dialled.
func (d *Daemon) localFlows() []localFlow {
	if d.apps == nil {
		return nil
	}
	var out []localFlow
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, svc := range d.apps.Services() {
		for _, t := range d.apps.Conns(svc) {
			f, ok := d.moved[t]
			if !ok {
				f = migrate.Flow{Client: t.Remote, Service: t.Local}
			}
			out = append(out, localFlow{Flow: f, Tuple: t, App: svc})
		}
	}
	return out
}

type localFlow struct {
	Flow  migrate.Flow
	Tuple app.Tuple
	App   string
}

func unmapAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

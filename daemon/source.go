package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

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
type source struct {
	d     *Daemon
	later *laterDiscards // a drain's: discards wait for its end
}

// locator returns a function that finds the local socket of a flow and the
// application serving it. It works from one snapshot of the flows that
// migrated in and of the registered services, so locating a batch of n
// flows costs one pass over them, not n.
func (d *Daemon) locator() func(f migrate.Flow) (app.Tuple, string, error) {
	d.mu.Lock()
	movedIn := make(map[migrate.Flow]app.Tuple, len(d.moved))
	for t, f := range d.moved {
		movedIn[f] = t
	}
	d.mu.Unlock()
	svcs := map[uint16]string{}
	if d.apps != nil {
		for _, s := range d.apps.Services() {
			if p := servicePort(s); svcs[p] == "" {
				svcs[p] = s
			}
		}
	}
	return func(f migrate.Flow) (app.Tuple, string, error) {
		t, ok := movedIn[f]
		if !ok {
			t = app.Tuple{Local: f.Service, Remote: f.Client}
		}
		svc, ok := svcs[t.Local.Port()]
		if !ok {
			return t, "", fmt.Errorf("no application registered here serves port %d", t.Local.Port())
		}
		return t, svc, nil
	}
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

// Quiesce takes the flows from their applications, with their snapshots,
// in one batched request per application; the sockets stay live until
// Capture freezes them.
func (s source) Quiesce(ctx context.Context, flows []migrate.Flow) ([]error, error) {
	d := s.d
	errs := make([]error, len(flows))
	type group struct {
		idx    []int
		tuples []app.Tuple
	}
	groups := map[string]*group{}
	locate := d.locator()
	for i, f := range flows {
		t, svc, err := locate(f)
		if err != nil {
			errs[i] = err
			continue
		}
		g := groups[svc]
		if g == nil {
			g = &group{}
			groups[svc] = g
		}
		g.idx = append(g.idx, i)
		g.tuples = append(g.tuples, t)
	}
	for svc, g := range groups {
		exps, gerrs := d.apps.ExportMany(ctx, svc, g.tuples)
		d.mu.Lock()
		for k, i := range g.idx {
			if gerrs[k] != nil || exps[k] == nil {
				errs[i] = gerrs[k]
				if errs[i] == nil {
					errs[i] = fmt.Errorf("the application of %s did not export %v", svc, flows[i])
				}
				continue
			}
			d.frozen[flows[i]] = &outgoing{flow: flows[i], tuple: g.tuples[k], exp: exps[k]}
		}
		d.mu.Unlock()
	}
	return errs, nil
}

// Capture freezes and captures the sockets of quiesced flows.
func (s source) Capture(ctx context.Context, flows []migrate.Flow) ([]migrate.Item, []error, error) {
	d := s.d
	got := make([]migrate.Item, len(flows))
	errs := make([]error, len(flows))
	d.mu.Lock()
	outs := make([]*outgoing, len(flows))
	for i, f := range flows {
		outs[i] = d.frozen[f]
	}
	d.mu.Unlock()
	start, marks := time.Now(), d.cfg.Marks.repair()
	parallel(len(flows), func(i int) {
		if outs[i] == nil {
			errs[i] = fmt.Errorf("flow %v was not quiesced", flows[i])
			return
		}
		got[i], errs[i] = captureOne(outs[i], start, marks)
	})
	items := make([]migrate.Item, 0, len(flows))
	var b nat.Batch
	for i := range got {
		if errs[i] == nil {
			items = append(items, got[i])
			if t := outs[i].tuple; t.Local != flows[i].Service {
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
			return nil, nil, err // the flows stay quiesced: Run thaws them
		}
	}
	return items, errs, nil
}

// captureOne freezes and captures the socket of a quiesced flow, one of a
// batch whose capture began at start, quiet with marks. On error the
// socket is live again (o.frozen is nil) and the flow stays quiesced.
func captureOne(o *outgoing, start time.Time, marks repair.Marks) (migrate.Item, error) {
	// An application that disconnected resumes the sockets it finds
	// not frozen: leave those alone, and keep it connected while this
	// one freezes.
	release, err := o.exp.Claim()
	if err != nil {
		return migrate.Item{}, err
	}
	fr, err := repair.Freeze(o.exp.Socket)
	release()
	if err != nil {
		return migrate.Item{}, err
	}
	// Segments still on their way here despite the hold reach the frozen
	// socket after the capture: its acknowledgements of them must not
	// reach the client, which would then never send them to the target.
	if err := fr.Quiet(marks); err != nil {
		return migrate.Item{}, errors.Join(err, fr.Thaw())
	}
	st, err := fr.Capture()
	if err == nil && (st.Local != o.tuple.Local || st.Remote != o.tuple.Remote) {
		err = fmt.Errorf("the application gave socket %v->%v for flow %v", st.Local, st.Remote, o.flow)
	}
	var blob []byte
	if err == nil {
		blob, err = st.MarshalBinary()
	}
	if err != nil {
		return migrate.Item{}, errors.Join(err, fr.Thaw())
	}
	o.frozen = fr
	// Data within sendingWithin before the batch's capture began: in a
	// large batch a flow may be captured well after the hold.
	since, got := fr.SinceData()
	it := migrate.Item{Flow: o.flow, App: o.exp.Service, State: blob, Snapshot: o.exp.Snapshot,
		Receiving: got && since <= sendingWithin+time.Since(start)}
	// The item carries it from here: a drain keeps o until its end, and
	// with it up to a megabyte per connection (app.MaxSnapshot).
	o.exp.Snapshot = nil
	return it, nil
}

// sendingWithin: a client whose data reached the socket this shortly
// before the capture is taken to be sending, with more on its way
// (migrate.Item.Receiving). A bulk upload's data arrives every few
// microseconds; a connection that only downloads, or sits idle between
// requests, has received none for far longer. The kernel measures in
// jiffies (4 ms with HZ=250).
const sendingWithin = 20 * time.Millisecond

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
	errs := make([]error, 0, len(outs)+1)
	// The switch did not happen: with gateway steering the gateway still
	// rewrites the flows' replies, and the rewrites Capture added here go,
	// while the sockets are still frozen: a packet of the flow leaving
	// during the removal would have the kernel's timeout refresh put the
	// element back (see nat.Table.Apply).
	var b nat.Batch
	for _, o := range outs {
		if o.frozen != nil && d.cfg.Steering == "gateway" {
			b.Remove(natFlow(o.flow))
		}
	}
	if b.Len() > 0 {
		errs = append(errs, d.nat.Apply(&b))
	}
	exps := make([]*app.Exported, len(outs))
	for i, o := range outs {
		if o.frozen != nil {
			errs = append(errs, o.frozen.Thaw())
		}
		exps[i] = o.exp
	}
	errs = append(errs, app.FinishMany(ctx, exps, false)...)
	for _, o := range outs {
		errs = append(errs, o.exp.Socket.Close())
	}
	return errors.Join(errs...)
}

// Discard drops the frozen sockets of flows the target owns now: the
// application closes its descriptor, and ours is the last one, closed in
// repair mode so that nothing reaches the client. The reply rewrite of a
// flow that had migrated in goes too. In a drain (s.later) closing our
// descriptors and removing the rewrites wait for the drain's end, off the
// path of the batches still moving.
func (s source) Discard(ctx context.Context, flows []migrate.Flow) error {
	d := s.d
	outs := d.takeFrozen(flows)
	var rm []*outgoing // flows whose rewrite goes
	d.mu.Lock()
	for _, o := range outs {
		_, movedIn := d.moved[o.tuple]
		delete(d.moved, o.tuple)
		d.movedChanged()
		delete(d.adopted, o.tuple)
		if (movedIn && o.tuple.Local.Addr() != o.flow.Service.Addr()) || d.cfg.Steering == "gateway" {
			rm = append(rm, o)
		}
	}
	d.mu.Unlock()
	// The applications let go of them at once, so that nothing lists
	// them here any more.
	exps := make([]*app.Exported, len(outs))
	for i, o := range outs {
		exps[i] = o.exp
	}
	errs := app.FinishMany(ctx, exps, true)
	if s.later == nil || !s.later.add(outs, rm) {
		errs = append(errs, d.discard(outs, rm))
	}
	return errors.Join(errs...)
}

// discard removes the rewrites of rm, then closes the frozen sockets
// outs. In that order: a socket closed frees its tuple, which a flow
// migrating back here may take at once, rewrite included, and a removal
// after that would take the new rewrite away. (Frozen and quiet, the
// sockets send nothing meanwhile.)
func (d *Daemon) discard(outs, rm []*outgoing) error {
	var errs []error
	if len(rm) > 0 {
		var b nat.Batch
		for _, o := range rm {
			b.Remove(natFlow(o.flow))
		}
		errs = append(errs, d.nat.Apply(&b))
	}
	for _, o := range outs {
		if o.frozen != nil {
			errs = append(errs, o.frozen.Discard())
		}
	}
	return errors.Join(errs...)
}

// laterDiscards collects the frozen sockets a drain gave away, to close
// once every batch has moved, when the batches still moving no longer
// need the CPU time. The frozen sockets are inert meanwhile (repair mode,
// their flows steered away); their applications have let go of them
// already.
//
// A connection that comes back here while they wait (moved back by its
// new server) has its old socket closed and its old rules removed first,
// before its restore (takeDeferred): the frozen socket holds its 4-tuple,
// and the late removal would take the new rules away.
type laterDiscards struct {
	mu   sync.Mutex
	outs map[app.Tuple]*outgoing
	rm   map[app.Tuple]*outgoing
}

// add keeps outs and rm for later, unless that would keep more than
// drainDeferMax sockets open (false: discard them now).
func (l *laterDiscards) add(outs, rm []*outgoing) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.outs)+len(outs) > drainDeferMax() {
		return false
	}
	if l.outs == nil {
		l.outs, l.rm = map[app.Tuple]*outgoing{}, map[app.Tuple]*outgoing{}
	}
	for _, o := range outs {
		l.outs[unmapTuple(o.tuple)] = o
	}
	for _, o := range rm {
		l.rm[unmapTuple(o.tuple)] = o
	}
	return true
}

// take removes what is kept for tuple t and returns it.
func (l *laterDiscards) take(t app.Tuple) (outs, rm []*outgoing) {
	t = unmapTuple(t)
	l.mu.Lock()
	defer l.mu.Unlock()
	if o, ok := l.outs[t]; ok {
		outs = append(outs, o)
		delete(l.outs, t)
	}
	if o, ok := l.rm[t]; ok {
		rm = append(rm, o)
		delete(l.rm, t)
	}
	return outs, rm
}

// flush discards what was kept.
func (l *laterDiscards) flush(d *Daemon) error {
	l.mu.Lock()
	outs, rm := slices.Collect(maps.Values(l.outs)), slices.Collect(maps.Values(l.rm))
	l.outs, l.rm = nil, nil
	l.mu.Unlock()
	if len(outs) == 0 && len(rm) == 0 {
		return nil
	}
	return d.discard(outs, rm)
}

// deferDiscards registers a drain's later discards, for takeDeferred,
// until the returned function is called.
func (d *Daemon) deferDiscards(l *laterDiscards) (done func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.laters[l] = struct{}{}
	return func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		delete(d.laters, l)
	}
}

// takeDeferred discards now what a drain keeps for later of the
// connection t, which is about to be restored here again.
func (d *Daemon) takeDeferred(t app.Tuple) error {
	d.mu.Lock()
	ls := slices.Collect(maps.Keys(d.laters))
	d.mu.Unlock()
	var errs []error
	for _, l := range ls {
		if outs, rm := l.take(t); len(outs)+len(rm) > 0 {
			errs = append(errs, d.discard(outs, rm))
		}
	}
	return errors.Join(errs...)
}

// Addr is this server's service address of the family: where a switch
// taken back sends the flows again.
func (s source) Addr(family int) netip.Addr {
	a, _ := s.d.cfg.ServiceAddr(family == 6)
	return a
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

// numConns is how many connections are served here: len(localFlows())
// without building the list.
func (d *Daemon) numConns() int {
	if d.apps == nil {
		return 0
	}
	return d.apps.NumConns()
}

type localFlow struct {
	Flow  migrate.Flow
	Tuple app.Tuple
	App   string
}

// unmapTuple is tu with both addresses unmapped (unmapAP).
func unmapTuple(tu app.Tuple) app.Tuple {
	return app.Tuple{Local: unmapAP(tu.Local), Remote: unmapAP(tu.Remote)}
}

func unmapAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

package migrate

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Flow is one TCP connection as its client sees it: the client's address
// and the service address it dialled.
type Flow struct {
	Client, Service netip.AddrPort
}

// String renders f as CLIENT->SERVICE.
func (f Flow) String() string { return f.Client.String() + "->" + f.Service.String() }

// Item is one captured connection on its way from source to target.
type Item struct {
	Flow Flow
	// App names the application service that serves the connection
	// (for example ":7000"); the target hands the connection to the
	// application registered for it.
	App string
	// State is the encoded socket state (repair.State), opaque here.
	State []byte
	// Snapshot is the application's per-connection state, opaque here.
	Snapshot []byte
	// Receiving reports that the client was sending data when its socket
	// froze, so that more of it may be on its way through the hold. A
	// batch with such a flow commits only after the switch (see Run).
	Receiving bool
}

// Source is the server the connections leave.
type Source interface {
	// Quiesce asks the flows' applications to stop serving them and to
	// give their snapshots; the sockets stay live (the kernel goes on
	// sending what is queued and taking acknowledgements). It returns an
	// error per flow (nil where quiesced); the others carry on at the
	// source untouched.
	Quiesce(ctx context.Context, flows []Flow) ([]error, error)
	// Capture freezes the sockets of quiesced flows and captures them.
	// It returns one item per flow it captured and an error per flow it
	// could not (nil entries for those captured); a flow it could not
	// capture stays quiesced, for Thaw.
	Capture(ctx context.Context, flows []Flow) ([]Item, []error, error)
	// Thaw lets quiesced or captured flows carry on at the source
	// (abort); flows that are neither are ignored.
	Thaw(ctx context.Context, flows []Flow) error
	// Discard drops the frozen sockets of flows the target now owns.
	Discard(ctx context.Context, flows []Flow) error
	// Addr is the source's address on the service network of the given
	// family (4 or 6): where a switch that must be taken back sends the
	// flows again.
	Addr(family int) netip.Addr
}

// Target is the server the connections move to.
type Target interface {
	// Name identifies the target in reports.
	Name() string
	// Addr is the target's address on the service network of the given
	// family (4 or 6): where steering sends the flows.
	Addr(family int) netip.Addr
	// Prepare asks the target to get ready for n connections.
	Prepare(ctx context.Context, n int) error
	// Transfer restores the items in repair mode. It returns an error per
	// item (nil where restored).
	Transfer(ctx context.Context, items []Item) ([]error, error)
	// Commit brings restored flows to life and hands them over. A
	// commit that failed for some flows only returns FlowErrors.
	Commit(ctx context.Context, flows []Flow) error
	// Abort throws restored flows away silently.
	Abort(ctx context.Context, flows []Flow) error
}

// Steering is the point that decides where the flows' packets go.
type Steering interface {
	// Hold queues the flows' client packets from now on.
	Hold(ctx context.Context, flows []Flow) error
	// Switch sends the flows to addr, replacing the hold atomically, and
	// re-delivers what was queued so it meets the new rule.
	Switch(ctx context.Context, flows []Flow, to netip.Addr) error
	// Unhold lifts the hold and re-delivers what was queued to where the
	// flows went before (abort).
	Unhold(ctx context.Context, flows []Flow) error
	// RepliesNeedSwitch reports whether the target's replies reach the
	// client only once the switch is in, because the steering point
	// rewrites them on their way out (gateway steering). If so, Run
	// commits after the switch. If not, the target rewrites its own
	// replies, and Run commits while the switch is under way (unless a
	// flow is receiving, see Item): the client hears from the target one
	// round trip sooner, and what it sends meanwhile waits in the hold
	// until the switch re-delivers it to the target.
	RepliesNeedSwitch() bool
}

// Deadlines bound each phase. Zero fields take the defaults.
type Deadlines struct {
	Prepare, Quiesce, Hold, Capture, Transfer, Switch, Commit time.Duration
}

// DefaultDeadlines are used for zero fields of Deadlines.
var DefaultDeadlines = Deadlines{
	Prepare:  2 * time.Second,
	Quiesce:  5 * time.Second,
	Hold:     2 * time.Second,
	Capture:  5 * time.Second,
	Transfer: 10 * time.Second,
	Switch:   2 * time.Second,
	Commit:   5 * time.Second,
}

func (d Deadlines) get(p Phase) time.Duration {
	v := map[Phase]time.Duration{PhasePrepare: d.Prepare, PhaseQuiesce: d.Quiesce, PhaseHold: d.Hold, PhaseCapture: d.Capture,
		PhaseTransfer: d.Transfer, PhaseSwitch: d.Switch, PhaseCommit: d.Commit}[p]
	if v == 0 {
		v = DefaultDeadlines.get(p)
	}
	return v
}

// Phase names a step of the transaction.
type Phase string

// The phases, in order.
const (
	PhasePrepare  Phase = "prepare"
	PhaseQuiesce  Phase = "quiesce"
	PhaseHold     Phase = "hold"
	PhaseCapture  Phase = "capture"
	PhaseTransfer Phase = "transfer"
	PhaseSwitch   Phase = "switch"
	PhaseCommit   Phase = "commit"
)

// Report says what a transaction did.
type Report struct {
	// Moved are the flows the target owns now.
	Moved []Flow
	// Failed are the flows that did not move, with why (a PhaseError
	// naming the phase). Those that failed before the switch stayed at
	// the source; those past it (a commit or a switch that failed, which
	// cannot be taken back) may be lost, and their error says so.
	Failed map[Flow]error
	// Timings is how long each phase took.
	Timings map[Phase]time.Duration
	// Aborted is set when the whole transaction was rolled back.
	Aborted bool
	// CommitAfterSwitch is set when the commit waited for the switch
	// (gateway steering, or a client was sending: see Item.Receiving)
	// instead of going out with it.
	CommitAfterSwitch bool
}

// PhaseError says which phase failed.
type PhaseError struct {
	Phase Phase
	Err   error
}

// Error names the phase and what went wrong.
func (e *PhaseError) Error() string { return "migrate: " + string(e.Phase) + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e *PhaseError) Unwrap() error { return e.Err }

// FlowErrors is the error of a step that failed for some of its flows
// only: a Target's Commit returns it for the flows it could not bring to
// life, which Run then reports failed rather than moved.
type FlowErrors map[Flow]error

// Error lists the flows and why each failed.
func (e FlowErrors) Error() string {
	var b strings.Builder
	for f, err := range e {
		if b.Len() > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%v: %v", f, err)
	}
	return b.String()
}

// Run moves flows from src to tgt through the steering point st. On error
// before the switch every flow stays at the source; the report says which
// flows moved in any case.
func Run(ctx context.Context, flows []Flow, src Source, st Steering, tgt Target, d Deadlines) (*Report, error) {
	rep := &Report{Failed: map[Flow]error{}, Timings: map[Phase]time.Duration{}}
	if len(flows) == 0 {
		return rep, nil
	}
	// base is the context of the phases: ctx until the switch, which
	// must not be given up half-way (below).
	base := ctx
	// within runs fn under phase p's deadline.
	within := func(p Phase, fn func(ctx context.Context) error) error {
		pctx, cancel := context.WithTimeout(base, d.get(p))
		defer cancel()
		return fn(pctx)
	}
	var timings sync.Mutex // the commit may run alongside the switch
	phase := func(p Phase, fn func(ctx context.Context) error) error {
		t := time.Now()
		err := within(p, fn)
		timings.Lock()
		rep.Timings[p] += time.Since(t)
		timings.Unlock()
		if err != nil {
			return &PhaseError{Phase: p, Err: err}
		}
		return nil
	}
	// cleanup runs an abort step with its own deadline even when ctx is
	// already done: leaving a flow held or frozen is worse than a late
	// abort.
	cleanup := func(fn func(ctx context.Context) error) error {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.get(PhaseCommit))
		defer cancel()
		return fn(cctx)
	}
	// stay lets flows carry on at the source: the source thaws them and
	// the steering point lets their packets through again, after the
	// target, if it restored them, threw its copies away.
	stay := func(fs []Flow, restored bool) error {
		var errs []error
		if restored {
			errs = append(errs, cleanup(func(ctx context.Context) error { return tgt.Abort(ctx, fs) }))
		}
		return errors.Join(append(errs,
			cleanup(func(ctx context.Context) error { return src.Thaw(ctx, fs) }),
			cleanup(func(ctx context.Context) error { return st.Unhold(ctx, fs) }))...)
	}
	fail := func(fs []Flow, err error) {
		for _, f := range fs {
			rep.Failed[f] = err
		}
	}

	if err := phase(PhasePrepare, func(ctx context.Context) error { return tgt.Prepare(ctx, len(flows)) }); err != nil {
		fail(flows, err)
		rep.Aborted = true
		return rep, err
	}

	// Quiesce, then hold. The hold must be in before any socket is
	// frozen, and no sooner than needed: the client's acknowledgements it
	// holds back while the application still writes let the socket fill
	// its congestion window with data the client already has, all of it
	// then captured and carried to the target (on the testbed, a
	// flat-out stream's migration moved megabytes that way).
	var quiesceErrs []error
	if err := phase(PhaseQuiesce, func(ctx context.Context) (err error) {
		quiesceErrs, err = src.Quiesce(ctx, flows)
		return err
	}); err != nil {
		fail(flows, err)
		rep.Aborted = true
		return rep, errors.Join(err, cleanup(func(ctx context.Context) error { return src.Thaw(ctx, flows) }))
	}
	var quiesced []Flow
	for i, f := range flows {
		if i < len(quiesceErrs) && quiesceErrs[i] != nil {
			rep.Failed[f] = &PhaseError{Phase: PhaseQuiesce, Err: quiesceErrs[i]}
			continue
		}
		quiesced = append(quiesced, f)
	}
	if len(quiesced) == 0 {
		rep.Aborted = true
		return rep, &PhaseError{Phase: PhaseQuiesce, Err: errors.New("no application gave up its connection")}
	}
	if err := phase(PhaseHold, func(ctx context.Context) error { return st.Hold(ctx, quiesced) }); err != nil {
		fail(quiesced, err)
		rep.Aborted = true
		return rep, errors.Join(err, stay(quiesced, false))
	}

	var cleanupErr error
	var items []Item
	var perFlow []error
	if err := phase(PhaseCapture, func(ctx context.Context) (err error) {
		items, perFlow, err = src.Capture(ctx, quiesced)
		return err
	}); err != nil {
		fail(quiesced, err)
		rep.Aborted = true
		return rep, errors.Join(err, cleanupErr, stay(quiesced, false))
	}
	var notCaptured []Flow
	for i, err := range perFlow {
		if err != nil && i < len(quiesced) {
			rep.Failed[quiesced[i]] = &PhaseError{Phase: PhaseCapture, Err: err}
			notCaptured = append(notCaptured, quiesced[i])
		}
	}
	if len(notCaptured) > 0 {
		cleanupErr = errors.Join(cleanupErr, stay(notCaptured, false))
	}
	if len(items) == 0 {
		rep.Aborted = true
		return rep, errors.Join(&PhaseError{Phase: PhaseCapture, Err: errors.New("no connection could be captured")}, cleanupErr)
	}

	var restoreErrs []error
	if err := phase(PhaseTransfer, func(ctx context.Context) (err error) {
		restoreErrs, err = tgt.Transfer(ctx, items)
		return err
	}); err != nil {
		moving := FlowsOf(items)
		fail(moving, err)
		rep.Aborted = true
		return rep, errors.Join(err, cleanupErr, stay(moving, true))
	}
	var moving, refused []Flow
	for i, it := range items {
		if i < len(restoreErrs) && restoreErrs[i] != nil {
			rep.Failed[it.Flow] = &PhaseError{Phase: PhaseTransfer, Err: fmt.Errorf("target %s: %w", tgt.Name(), restoreErrs[i])}
			refused = append(refused, it.Flow)
			continue
		}
		moving = append(moving, it.Flow)
	}
	if len(refused) > 0 {
		cleanupErr = errors.Join(cleanupErr, stay(refused, false))
	}
	if len(moving) == 0 {
		rep.Aborted = true
		return rep, errors.Join(&PhaseError{Phase: PhaseTransfer, Err: errors.New("the target restored no connection")}, cleanupErr)
	}

	// From here on the caller can no longer cancel (an operator's Ctrl-C,
	// a policy's timeout, a daemon stopping): a switch given up half-way
	// may have sent the flows to the target all the same, and a commit
	// given up would lose them. Each phase keeps its own deadline.
	base = context.WithoutCancel(ctx)

	// The switch is the point of no return: once the steering point sends
	// the flows to the target, the target owns them. Where the target
	// rewrites its own replies, the commit that brings them to life goes
	// out with the switch: from then on too, the target owns them.
	switchTo := func(ctx context.Context, addr func(family int) netip.Addr) error {
		var errs []error
		for fam, fs := range ByFamily(moving) {
			errs = append(errs, st.Switch(ctx, fs, addr(fam)))
		}
		return errors.Join(errs...)
	}
	switchFlows := func(ctx context.Context) error { return switchTo(ctx, tgt.Addr) }
	// lose reports flows past the point of no return as failed in phase
	// p, each with the error errOf gives it: moved, but maybe not alive.
	// A flow whose switch failed stays failed at the switch, whatever
	// else failed too (the commit's error is added): its caller switches
	// it again (the target owns it), which a commit's failure alone does
	// not call for.
	lose := func(fs []Flow, p Phase, errOf func(Flow) error) {
		timings.Lock()
		defer timings.Unlock()
		gone := make(map[Flow]bool, len(fs))
		for _, f := range fs {
			gone[f] = true
			e := &PhaseError{Phase: p, Err: errOf(f)}
			if prev, ok := rep.Failed[f].(*PhaseError); ok && (prev.Phase == PhaseSwitch) != (p == PhaseSwitch) {
				if p == PhaseSwitch {
					e.Err = errors.Join(e.Err, prev)
				} else {
					e = &PhaseError{Phase: PhaseSwitch, Err: errors.Join(prev.Err, e)}
				}
			}
			rep.Failed[f] = e
		}
		// Not in place: rep.Moved may be moving, which is shared.
		rep.Moved = slices.DeleteFunc(slices.Clone(rep.Moved), func(f Flow) bool { return gone[f] })
	}
	commit := func(ctx context.Context) error {
		err := tgt.Commit(ctx, moving)
		var fe FlowErrors
		switch {
		case errors.As(err, &fe):
			// Lost: past the switch the source has let them go.
			lose(slices.Collect(maps.Keys(fe)), PhaseCommit, func(f Flow) error { return fmt.Errorf("commit on %s: %w", tgt.Name(), fe[f]) })
		case err != nil:
			// No answer (a connection lost, a deadline), or a refusal
			// for them all: the target may have brought them to life or
			// not.
			lose(moving, PhaseCommit, func(Flow) error {
				return fmt.Errorf("commit on %s failed: the connection may be lost: %w", tgt.Name(), err)
			})
		}
		return err
	}
	// switchAgain switches the flows, and tries once more if that fails:
	// the steering point may have sent some of them on already (another
	// steering point, a reply lost), so a failed switch is not simply
	// rolled back.
	switchAgain := func() error {
		err := phase(PhaseSwitch, switchFlows)
		if err != nil && cleanup(switchFlows) == nil {
			return nil
		}
		return err
	}
	// loseSwitched reports the flows lost when the switch failed twice
	// after the commit went out (or with it): they are the target's, with
	// their packets held at the steering point.
	loseSwitched := func(err error) {
		if err != nil {
			lose(moving, PhaseSwitch, func(Flow) error {
				return fmt.Errorf("switch to %s failed twice: its client's packets may not reach it: %w", tgt.Name(), err)
			})
		}
	}
	discard := func(ctx context.Context) error { return src.Discard(ctx, moving) }
	// After the switch: the target commits while the source discards its
	// frozen copies, neither waiting for the other.
	commitAndDiscard := func(ctx context.Context) error {
		discarded := make(chan error, 1)
		go func() { discarded <- discard(ctx) }()
		return errors.Join(commit(ctx), <-discarded)
	}
	if st.RepliesNeedSwitch() {
		rep.CommitAfterSwitch = true
		if err := switchAgain(); err != nil {
			// The steering point may have switched some flows all the
			// same (a reply lost, a family of two, holds it could not
			// lift): lifting the hold would not bring them back, and
			// the target's aborted sockets would answer them with
			// resets. Only once the flows are switched back to the
			// source is it safe to resume them there.
			if back := cleanup(func(ctx context.Context) error { return switchTo(ctx, src.Addr) }); back != nil {
				err = fmt.Errorf("%w; switching them back to the source failed too: %w", err, back)
			}
			fail(moving, err)
			rep.Aborted = true
			return rep, errors.Join(err, cleanupErr, stay(moving, true))
		}
		rep.Moved = moving
		return rep, errors.Join(phase(PhaseCommit, commitAndDiscard), cleanupErr)
	}
	rep.Moved = moving
	if receiving(items, moving) {
		// The commit waits for the switch, but as with the commit going
		// out at once, a failed switch is not rolled back: Unhold would
		// not take back what it may have sent on.
		rep.CommitAfterSwitch = true
		err := switchAgain()
		loseSwitched(err)
		return rep, errors.Join(err, phase(PhaseCommit, commitAndDiscard), cleanupErr)
	}
	// The commit is what the client waits for: it goes out from this
	// goroutine, the switch from another.
	switched := make(chan error, 1)
	go func() {
		// The target may be live already, so there is no going back.
		err := switchAgain()
		loseSwitched(err)
		// The source lets go of its frozen copies once the steering
		// point sends it nothing more of them (or, if the switch
		// failed, holds their packets).
		switched <- errors.Join(err, within(PhaseCommit, discard))
	}()
	err := phase(PhaseCommit, commit)
	return rep, errors.Join(<-switched, err, cleanupErr)
}

// receiving reports whether any of the items whose flows are in moving was
// receiving data when captured. Such a client's segments may still be in
// the steering point's queue when the switch lifts the hold, and its new
// ones, no longer held, can overtake them. A target that is live already
// would see the gap and report it (SACK): the client would resend segments
// that are only late, stamped with a newer timestamp, and the target would
// then discard the late originals as old (PAWS, RFC 7323) and leave the
// client waiting for its retransmission timeout. Committed after the
// switch, the target takes the late segments in while it still sends
// nothing, and acknowledges them in order.
func receiving(items []Item, moving []Flow) bool {
	m := make(map[Flow]bool, len(moving))
	for _, f := range moving {
		m[f] = true
	}
	for _, it := range items {
		if it.Receiving && m[it.Flow] {
			return true
		}
	}
	return false
}

// ByFamily groups flows by the address family (4 or 6) of their service
// address, as [Target.Addr] takes it.
func ByFamily(fs []Flow) map[int][]Flow {
	out := map[int][]Flow{}
	for _, f := range fs {
		fam := 4
		if f.Service.Addr().Is6() {
			fam = 6
		}
		out[fam] = append(out[fam], f)
	}
	return out
}

// FlowsOf returns the flows of items, in order.
func FlowsOf(items []Item) []Flow {
	fs := make([]Flow, len(items))
	for i, it := range items {
		fs[i] = it.Flow
	}
	return fs
}

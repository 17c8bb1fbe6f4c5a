package migrate

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// world is an in-process pool: it records every call in order and fails
// where a test asks it to.
type world struct {
	mu        *sync.Mutex
	calls     []string
	failAt    string          // "party.method" that fails as a whole
	blockAt   string          // "party.method" that waits for its deadline
	refuse    map[Flow]bool   // flows the target cannot restore
	noCapture map[Flow]bool   // flows the source cannot capture
	noQuiesce map[Flow]bool   // flows whose application refuses to let go
	where     map[Flow]string // "src" or "tgt": who owns each flow
	gateway   bool            // the steering's RepliesNeedSwitch
	receiving map[Flow]bool   // flows captured while their client was sending
	lost      map[Flow]bool   // flows the target fails to commit
	// cancelAt cancels the caller's context (cancel) when that call
	// comes; a call whose context is done fails.
	cancelAt string
	cancel   context.CancelFunc

	// switched counts the switches done or failed; committedEarly is
	// set by a commit that came before any. If concurrent is set, a switch waits
	// (a while) for a commit to begin before it returns, and notes in
	// serialized if none did.
	switched       int
	committedEarly bool
	concurrent     bool
	commitBegun    chan struct{}
	serialized     bool
}

func (w *world) call(ctx context.Context, name string, fs []Flow) error {
	w.mu.Lock()
	keys := make([]string, len(fs))
	for i, f := range fs {
		keys[i] = fmt.Sprint(f.Client.Port())
	}
	w.calls = append(w.calls, name+"("+strings.Join(keys, ",")+")")
	w.mu.Unlock()
	if w.cancelAt == name {
		defer w.cancel()
	} else if err := ctx.Err(); err != nil {
		return err
	}
	if w.blockAt == name {
		<-ctx.Done()
		return ctx.Err()
	}
	if w.failAt == name {
		return errors.New(name + " failed")
	}
	return nil
}

type fakeSource struct{ *world }

func (s fakeSource) Quiesce(ctx context.Context, fs []Flow) ([]error, error) {
	if err := s.call(ctx, "src.Quiesce", fs); err != nil {
		return nil, err
	}
	errs := make([]error, len(fs))
	for i, f := range fs {
		if s.noQuiesce[f] {
			errs[i] = errors.New("app refused")
		}
	}
	return errs, nil
}

func (s fakeSource) Capture(ctx context.Context, fs []Flow) ([]Item, []error, error) {
	if err := s.call(ctx, "src.Capture", fs); err != nil {
		return nil, nil, err
	}
	var items []Item
	errs := make([]error, len(fs))
	for i, f := range fs {
		if s.noCapture[f] {
			errs[i] = errors.New("app refused")
			continue
		}
		items = append(items, Item{Flow: f, App: ":7000", State: []byte("state"), Snapshot: []byte("snap"), Receiving: s.receiving[f]})
	}
	return items, errs, nil
}

func (s fakeSource) Thaw(ctx context.Context, fs []Flow) error { return s.call(ctx, "src.Thaw", fs) }

func (s fakeSource) Discard(ctx context.Context, fs []Flow) error {
	return s.call(ctx, "src.Discard", fs)
}

func (s fakeSource) Addr(family int) netip.Addr { return netip.MustParseAddr("10.77.2.11") }

type fakeTarget struct{ *world }

func (t fakeTarget) Name() string               { return "s2" }
func (t fakeTarget) Addr(family int) netip.Addr { return netip.MustParseAddr("10.77.2.12") }
func (t fakeTarget) Prepare(ctx context.Context, n int) error {
	return t.call(ctx, "tgt.Prepare", nil)
}

func (t fakeTarget) Transfer(ctx context.Context, items []Item) ([]error, error) {
	if err := t.call(ctx, "tgt.Transfer", FlowsOf(items)); err != nil {
		return nil, err
	}
	errs := make([]error, len(items))
	for i, it := range items {
		if t.refuse[it.Flow] {
			errs[i] = errors.New("restore failed")
		}
	}
	return errs, nil
}

func (t fakeTarget) Commit(ctx context.Context, fs []Flow) error {
	t.mu.Lock()
	if t.switched == 0 {
		t.committedEarly = true
	}
	if t.commitBegun != nil {
		close(t.commitBegun)
		t.commitBegun = nil
	}
	t.mu.Unlock()
	if err := t.call(ctx, "tgt.Commit", fs); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	fe := FlowErrors{}
	for _, f := range fs {
		if t.lost[f] {
			fe[f] = errors.New("no application took it")
			continue
		}
		t.where[f] = "tgt"
	}
	if len(fe) > 0 {
		return fe
	}
	return nil
}

func (t fakeTarget) Abort(ctx context.Context, fs []Flow) error { return t.call(ctx, "tgt.Abort", fs) }

type fakeSteering struct{ *world }

func (s fakeSteering) Hold(ctx context.Context, fs []Flow) error { return s.call(ctx, "st.Hold", fs) }
func (s fakeSteering) Switch(ctx context.Context, fs []Flow, to netip.Addr) error {
	name := "st.Switch"
	if to == (fakeSource{}).Addr(4) {
		name = "st.SwitchBack"
	}
	if err := s.call(ctx, name, fs); err != nil {
		s.mu.Lock()
		s.switched++
		s.mu.Unlock()
		return err
	}
	s.mu.Lock()
	begun := s.commitBegun
	s.mu.Unlock()
	if s.concurrent && begun != nil {
		select {
		case <-begun:
		case <-time.After(2 * time.Second):
			s.mu.Lock()
			s.serialized = true
			s.mu.Unlock()
		}
	}
	s.mu.Lock()
	s.switched++
	s.mu.Unlock()
	return nil
}
func (s fakeSteering) Unhold(ctx context.Context, fs []Flow) error {
	return s.call(ctx, "st.Unhold", fs)
}
func (s fakeSteering) RepliesNeedSwitch() bool { return s.gateway }

func flows(n int) []Flow {
	fs := make([]Flow, n)
	for i := range fs {
		fs[i] = Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("10.77.1.2"), uint16(40001+i)),
			Service: netip.MustParseAddrPort("10.77.2.11:7000")}
	}
	return fs
}

func TestRun(t *testing.T) {
	fs := flows(3)
	const QH = "src.Quiesce(40001,40002,40003)\x00st.Hold(40001,40002,40003)"
	for _, tc := range []struct {
		name      string
		w         world
		wantErr   Phase // "" = success
		wantMoved int
		wantCalls []string
	}{
		{name: "all move", wantMoved: 3, wantCalls: []string{
			"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
			"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)",
			"tgt.Commit(40001,40002,40003)", "src.Discard(40001,40002,40003)"}},
		{name: "target refuses", w: world{failAt: "tgt.Prepare"}, wantErr: PhasePrepare,
			wantCalls: []string{"tgt.Prepare()"}},
		{name: "hold fails", w: world{failAt: "st.Hold"}, wantErr: PhaseHold,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		// Nothing was held yet: the source thaws what it had quiesced.
		{name: "quiesce fails", w: world{failAt: "src.Quiesce"}, wantErr: PhaseQuiesce,
			wantCalls: []string{"tgt.Prepare()", "src.Quiesce(40001,40002,40003)", "src.Thaw(40001,40002,40003)"}},
		{name: "one flow not quiesced", w: world{noQuiesce: map[Flow]bool{fs[2]: true}}, wantMoved: 2,
			wantCalls: []string{"tgt.Prepare()", "src.Quiesce(40001,40002,40003)", "st.Hold(40001,40002)", "src.Capture(40001,40002)",
				"tgt.Transfer(40001,40002)", "st.Switch(40001,40002)", "tgt.Commit(40001,40002)", "src.Discard(40001,40002)"}},
		{name: "capture fails", w: world{failAt: "src.Capture"}, wantErr: PhaseCapture,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		{name: "target dies mid-transfer", w: world{failAt: "tgt.Transfer"}, wantErr: PhaseTransfer,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "tgt.Abort(40001,40002,40003)",
				"src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		{name: "transfer times out", w: world{blockAt: "tgt.Transfer"}, wantErr: PhaseTransfer,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "tgt.Abort(40001,40002,40003)",
				"src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		// The steering point may have switched them all the same: tried
		// once more, then switched back to the source before the source
		// takes them up again.
		{name: "switch fails", w: world{failAt: "st.Switch", gateway: true}, wantErr: PhaseSwitch,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)", "st.Switch(40001,40002,40003)",
				"st.SwitchBack(40001,40002,40003)", "tgt.Abort(40001,40002,40003)",
				"src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		{name: "switch times out", w: world{blockAt: "st.Switch", gateway: true}, wantErr: PhaseSwitch,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)", "st.Switch(40001,40002,40003)",
				"st.SwitchBack(40001,40002,40003)", "tgt.Abort(40001,40002,40003)",
				"src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		// With forward steering the commit went out with the switch (or
		// waits for it, for a sending client): either way the switch is
		// tried once more and not rolled back, as it may have sent some
		// flows on already, and the flows are the target's.
		{name: "switch fails, target committing", w: world{failAt: "st.Switch"}, wantErr: PhaseSwitch, wantMoved: 0,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)", "tgt.Commit(40001,40002,40003)",
				"st.Switch(40001,40002,40003)", "src.Discard(40001,40002,40003)"}},
		// Past the transfer the caller's giving up (Ctrl-C, a policy's
		// timeout, a daemon stopping) no longer stops the migration.
		{name: "caller gives up after the transfer", w: world{cancelAt: "tgt.Transfer"}, wantMoved: 3, wantCalls: []string{
			"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
			"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)",
			"tgt.Commit(40001,40002,40003)", "src.Discard(40001,40002,40003)"}},
		// Before, it aborts the migration.
		{name: "caller gives up at the capture", w: world{cancelAt: "src.Capture"}, wantErr: PhaseTransfer, wantCalls: []string{
			"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
			"tgt.Transfer(40001,40002,40003)", "tgt.Abort(40001,40002,40003)",
			"src.Thaw(40001,40002,40003)", "st.Unhold(40001,40002,40003)"}},
		{name: "one flow not restored", w: world{refuse: map[Flow]bool{fs[1]: true}}, wantMoved: 2,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "src.Thaw(40002)", "st.Unhold(40002)",
				"st.Switch(40001,40003)", "tgt.Commit(40001,40003)", "src.Discard(40001,40003)"}},
		// The one client that was sending stays: the others need not
		// wait for the switch.
		{name: "receiving flow not restored", w: world{refuse: map[Flow]bool{fs[1]: true}, receiving: map[Flow]bool{fs[1]: true}}, wantMoved: 2,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "src.Thaw(40002)", "st.Unhold(40002)",
				"st.Switch(40001,40003)", "tgt.Commit(40001,40003)", "src.Discard(40001,40003)"}},
		{name: "one flow not captured", w: world{noCapture: map[Flow]bool{fs[0]: true}}, wantMoved: 2,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"src.Thaw(40001)", "st.Unhold(40001)", "tgt.Transfer(40002,40003)",
				"st.Switch(40002,40003)", "tgt.Commit(40002,40003)", "src.Discard(40002,40003)"}},
		// Past the point of no return: lost, and reported failed.
		{name: "one flow lost at commit", w: world{lost: map[Flow]bool{fs[1]: true}}, wantErr: PhaseCommit, wantMoved: 2,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)",
				"tgt.Commit(40001,40002,40003)", "src.Discard(40001,40002,40003)"}},
		// No answer to the commit: the outcome is unknown, and the flows
		// are not reported moved.
		{name: "commit fails after switch", w: world{failAt: "tgt.Commit"}, wantErr: PhaseCommit, wantMoved: 0,
			wantCalls: []string{"tgt.Prepare()", QH, "src.Capture(40001,40002,40003)",
				"tgt.Transfer(40001,40002,40003)", "st.Switch(40001,40002,40003)",
				"tgt.Commit(40001,40002,40003)", "src.Discard(40001,40002,40003)"}},
	} {
		// "receiving": forward steering, with every client sending when
		// captured: the commit waits for the switch as with gateway
		// steering. A case that names its own receiving flows runs with
		// forward steering only; a case with w.gateway set, with gateway
		// steering only.
		for _, mode := range []string{"forward", "gateway", "receiving"} {
			switch {
			case tc.w.gateway && mode != "gateway", strings.HasSuffix(tc.name, "committing") && mode == "gateway",
				tc.w.receiving != nil && mode != "forward":
				continue // the case is for one kind of commit only
			}
			w := tc.w
			w.gateway = mode == "gateway"
			if mode == "receiving" {
				w.receiving = map[Flow]bool{}
				for _, f := range fs {
					w.receiving[f] = true
				}
			}
			t.Run(tc.name+"/"+mode, func(t *testing.T) {
				runCase(t, fs, &w, tc.wantErr, tc.wantMoved, tc.wantCalls)
			})
		}
	}
}

// TestSwitchFailureKept: the switch fails twice and the commit loses a
// flow too (a client was sending, so the commit came after the switch):
// every flow is still reported failed at the switch, which is what has
// the caller switch them again (the daemon's lostAtSwitch), and the
// commit's error is kept beside it.
func TestSwitchFailureKept(t *testing.T) {
	fs := flows(3)
	w := &world{mu: new(sync.Mutex), where: map[Flow]string{}, failAt: "st.Switch",
		lost: map[Flow]bool{fs[1]: true}, receiving: map[Flow]bool{fs[0]: true, fs[1]: true, fs[2]: true}}
	d := Deadlines{Transfer: 20 * time.Millisecond, Switch: 20 * time.Millisecond, Commit: 200 * time.Millisecond}
	rep, err := Run(context.Background(), fs, fakeSource{w}, fakeSteering{w}, fakeTarget{w}, d)
	if err == nil {
		t.Fatal("Run succeeded with a switch that failed twice")
	}
	for _, f := range fs {
		var pe *PhaseError
		if !errors.As(rep.Failed[f], &pe) || pe.Phase != PhaseSwitch {
			t.Errorf("flow %v failed with %v, want a switch failure", f.Client, rep.Failed[f])
		}
	}
	if msg := fmt.Sprint(rep.Failed[fs[1]]); !strings.Contains(msg, "no application took it") || !strings.Contains(msg, "st.Switch failed") {
		t.Errorf("the flow lost at the commit too: %q, want both errors", msg)
	}
}

// runCase runs one case of TestRun. After the transfer the switch, the
// commit and the discard may run at the same time (the switch and the
// commit only with forward steering and no client sending): their order
// is not compared, only that the discard comes after a switch, that a
// commit that must wait for the switch does, and that one that need not
// does not.
func runCase(t *testing.T, fs []Flow, w *world, wantErr Phase, wantMoved int, wantCalls []string) {
	w.where = map[Flow]string{}
	w.mu = new(sync.Mutex)
	ordered := w.gateway
	for _, f := range fs {
		ordered = ordered || w.receiving[f] && !w.refuse[f] && !w.noCapture[f] && !w.noQuiesce[f]
	}
	// A commit that goes out with the switch must not wait for it.
	w.concurrent = !ordered && w.failAt != "st.Switch"
	w.commitBegun = make(chan struct{})
	d := Deadlines{Transfer: 20 * time.Millisecond, Switch: 20 * time.Millisecond, Commit: 200 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w.cancel = cancel
	rep, err := Run(ctx, fs, fakeSource{w}, fakeSteering{w}, fakeTarget{w}, d)
	var pe *PhaseError
	switch {
	case wantErr == "" && err != nil:
		t.Fatalf("Run: %v", err)
	case wantErr != "" && (!errors.As(err, &pe) || pe.Phase != wantErr):
		t.Fatalf("Run error = %v, want a %s failure", err, wantErr)
	}
	if len(rep.Moved) != wantMoved || len(rep.Moved)+len(rep.Failed) != len(fs) {
		t.Fatalf("moved %d, failed %d; want %d moved of %d", len(rep.Moved), len(rep.Failed), wantMoved, len(fs))
	}
	var want []string
	for _, c := range wantCalls {
		want = append(want, strings.Split(c, "\x00")...)
	}
	got := slices.Clone(w.calls)
	// A flow that stays is thawed before its hold is lifted: what the
	// hold queued must meet a live socket, not a frozen, quiet one.
	for u, c := range got {
		if args, ok := strings.CutPrefix(c, "st.Unhold("); ok {
			if th := slices.Index(got, "src.Thaw("+args); th < 0 || th > u {
				t.Fatalf("%s without src.Thaw(%s before it: %q", c, args, got)
			}
		}
	}
	if wantMoved > 0 || slices.ContainsFunc(wantCalls, func(c string) bool { return strings.Contains(c, "tgt.Commit") }) {
		i := slices.IndexFunc(got, func(c string) bool { return strings.HasPrefix(c, "tgt.Transfer") })
		j := slices.IndexFunc(got, func(c string) bool { return strings.HasPrefix(c, "src.Discard") })
		k := slices.IndexFunc(got, func(c string) bool { return strings.HasPrefix(c, "st.Switch") })
		if j >= 0 && (k < 0 || k > j) {
			t.Fatalf("the source discarded before the switch: %q", got)
		}
		if rep.CommitAfterSwitch != ordered {
			t.Fatalf("CommitAfterSwitch %v, want %v", rep.CommitAfterSwitch, ordered)
		}
		if ordered && w.committedEarly {
			t.Fatalf("committed before the switch was done: %q", got)
		}
		if w.serialized {
			t.Fatalf("the commit waited for the switch: %q", got)
		}
		if i >= 0 {
			slices.Sort(got[i+1:])
			wi := slices.IndexFunc(want, func(c string) bool { return strings.HasPrefix(c, "tgt.Transfer") })
			slices.Sort(want[wi+1:])
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("calls:\n got %q\nwant %q", got, want)
	}
	if w.blockAt != "" && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a timed-out phase should say so: %v", err)
	}
}

//go:build linux

package nat

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestOpenIdempotent opens the table twice in a fresh namespace and checks
// with `nft list ruleset` that the second Open installs nothing twice and
// keeps the elements; that Destroy removes everything; and that the root
// namespace's ruleset is untouched throughout.
func TestOpenIdempotent(t *testing.T) {
	skipUnlessRoot(t)
	rootBefore := ruleset(t, "")
	ns := newNamespace(t, "idem")

	t1 := openIn(t, ns, Options{})
	first := ruleset(t, ns)
	for _, want := range []string{
		"table inet mtcp", "chain prerouting", "priority raw", "chain postrouting", "priority srcnat",
		"set hold4", "set hold6", "map fwd4", "map fwd6", "map reply4", "map reply6", "map gwreply4", "map gwreply6",
		"meta mark & 0x10000000 == 0x00000000 ip saddr . tcp sport . ip daddr . tcp dport @hold4",
		"meta mark & 0x20000000 != 0x00000000 counter packets 0 bytes 0 drop",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("ruleset after Open lacks %q:\n%s", want, first)
		}
	}
	if n := strings.Count(first, "\n\t\tmeta "); n != 9 {
		t.Errorf("ruleset after Open has %d rules; want 9:\n%s", n, first)
	}

	var b Batch
	b.Forward(f4, netip.MustParseAddr("10.77.2.12"))
	if err := t1.Apply(&b); err != nil {
		t.Fatal(err)
	}
	withElem := stripVolatile(ruleset(t, ns))

	t2 := openIn(t, ns, Options{})
	if got := stripVolatile(ruleset(t, ns)); got != withElem {
		t.Errorf("second Open changed the ruleset:\nbefore:\n%s\nafter:\n%s", withElem, got)
	}
	es, err := t2.Flows()
	if err != nil || len(es) != 1 || es[0].Kind != KindForward || es[0].Flow != f4 {
		t.Errorf("Flows after the second Open = %v, %v; want the forward of %v", es, err, f4)
	}

	if err := t2.Destroy(); err != nil {
		t.Fatal(err)
	}
	if got := ruleset(t, ns); strings.TrimSpace(got) != "" {
		t.Errorf("ruleset after Destroy:\n%s\nwant empty", got)
	}
	if err := t2.Apply(&b); !errors.Is(err, ErrClosed) {
		t.Errorf("Apply after Destroy: %v; want ErrClosed", err)
	}
	// t1's socket is still open: its table is gone.
	if err := t1.Apply(&b); err == nil || !errors.Is(err, syscall.ENOENT) {
		t.Errorf("Apply on a destroyed table: %v; want ENOENT", err)
	}
	if err := t1.Destroy(); err != nil {
		t.Errorf("Destroy of an absent table: %v; want nil", err)
	}
	if got := ruleset(t, ""); got != rootBefore {
		t.Errorf("root namespace ruleset changed:\nbefore:\n%s\nafter:\n%s", rootBefore, got)
	}
}

// stripVolatile removes what changes by itself: element expiry times.
func stripVolatile(s string) string {
	return regexp.MustCompile(`expires [0-9hms]+`).ReplaceAllString(s, "expires X")
}

// TestApplyMalformed checks that a malformed flow makes Apply fail with a
// clear error and change nothing, even if other changes of the batch are
// fine.
func TestApplyMalformed(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "bad")
	tb := openIn(t, ns, Options{})
	var good Batch
	good.Hold(f4)
	if err := tb.Apply(&good); err != nil {
		t.Fatal(err)
	}
	before := stripVolatile(ruleset(t, ns))
	target := netip.MustParseAddr("10.77.2.12")
	for _, tc := range []struct {
		name  string
		build func(b *Batch)
		want  string
	}{
		{"mixed families", func(b *Batch) { b.Hold(Flow{Client: f4.Client, Service: f6.Service}) }, "different families"},
		{"zero port", func(b *Batch) {
			b.Forward(Flow{Client: netip.AddrPortFrom(f4.Client.Addr(), 0), Service: f4.Service}, target)
		}, "port 0"},
		{"forward to other family", func(b *Batch) { b.Forward(f4, netip.MustParseAddr("fd77:2::12")) }, "not of the flow's family"},
		{"zero target", func(b *Batch) { b.GatewayReply(f4, netip.Addr{}) }, "no target address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b Batch
			b.Unhold(f4) // a valid change that must not happen either
			b.Forward(f6, netip.MustParseAddr("fd77:2::12"))
			tc.build(&b)
			err := tb.Apply(&b)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Apply = %v; want ErrInvalid saying %q", err, tc.want)
			}
			t.Logf("error: %v", err)
			if got := stripVolatile(ruleset(t, ns)); got != before {
				t.Fatalf("ruleset changed:\nbefore:\n%s\nafter:\n%s", before, got)
			}
		})
	}
}

// TestReconcile installs elements of every kind, keeps some, and checks
// that Reconcile deleted exactly the others.
func TestReconcile(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "reconcile")
	tb := openIn(t, ns, Options{})
	var b Batch
	var all []Flow
	for i := range 4 {
		f := Flow{Client: netip.AddrPortFrom(f4.Client.Addr(), uint16(40000+i)), Service: f4.Service}
		g := Flow{Client: netip.AddrPortFrom(f6.Client.Addr(), uint16(40000+i)), Service: f6.Service}
		all = append(all, f, g)
		for _, fl := range []Flow{f, g} {
			tgt := netip.MustParseAddr("10.77.2.12")
			if fl.Is6() {
				tgt = netip.MustParseAddr("fd77:2::12")
			}
			b.Hold(fl)
			b.Forward(fl, tgt)
			b.ReplyFrom(fl, netip.AddrPortFrom(tgt, fl.Service.Port()))
			b.GatewayReply(fl, tgt)
		}
	}
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	keep := func(e Entry) bool { return e.Flow.Client.Port()%2 == 0 || e.Kind == KindHold }
	if err := tb.Reconcile(keep); err != nil {
		t.Fatal(err)
	}
	es, err := tb.Flows()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, e := range es {
		if !keep(e) {
			t.Errorf("Reconcile kept %v", e)
		}
		got[fmt.Sprint(e.Kind, e.Flow)] = true
	}
	for _, f := range all {
		for _, k := range []Kind{KindHold, KindForward, KindReplyFrom, KindGatewayReply} {
			if keep(Entry{Flow: f, Kind: k}) && !got[fmt.Sprint(k, f)] {
				t.Errorf("Reconcile deleted %v %v", k, f)
			}
		}
	}
	// Removing the kept flows leaves the holds of the odd ones only.
	b.Reset()
	for _, f := range all {
		if f.Client.Port()%2 == 0 {
			b.Remove(f)
		}
	}
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	es, _ = tb.Flows()
	for _, e := range es {
		if e.Kind != KindHold || e.Flow.Client.Port()%2 == 0 {
			t.Errorf("after Remove: %v left", e)
		}
	}
	if len(es) != len(all)/2 {
		t.Errorf("after Remove: %d elements; want %d holds", len(es), len(all)/2)
	}
}

// TestRemoveAfterExpiry checks that Unhold and Remove of elements the
// kernel has already timed out do not fail the batch.
func TestRemoveAfterExpiry(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "expiry")
	tb := openIn(t, ns, Options{Idle: 50 * time.Millisecond, HoldIdle: 50 * time.Millisecond})
	var b Batch
	b.Hold(f4)
	b.ReplyFrom(f6, netip.MustParseAddrPort("[fd77:2::12]:7001"))
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := ruleset(t, ns)
		if !strings.Contains(out, "elements") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("elements did not time out:\n%s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Reset()
	b.Unhold(f4)
	b.Remove(f6)
	b.Remove(f4)
	if err := tb.Apply(&b); err != nil {
		t.Fatalf("removing expired elements: %v", err)
	}
}

// TestPrune checks that Prune drops from the index the elements the
// kernel timed out, over several chunks, and keeps those it holds.
func TestPrune(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "prune")
	const idle = 300 * time.Millisecond
	tb := openIn(t, ns, Options{Idle: idle})
	old := manyFlows(2*lockChunk + 10)
	var b Batch
	for _, f := range old {
		b.ReplyFrom(f, netip.MustParseAddrPort("10.77.2.12:7001"))
	}
	b.GatewayReply(f6, netip.MustParseAddr("fd77:2::12"))
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	if n, err := tb.Prune(); err != nil || n != 0 {
		t.Fatalf("Prune with every element there: %d dropped, %v; want 0", n, err)
	}
	time.Sleep(idle + 200*time.Millisecond)
	b.Reset()
	b.ReplyFrom(f4, netip.MustParseAddrPort("10.77.2.13:7001"))
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	n, err := tb.Prune()
	if err != nil {
		t.Fatal(err)
	}
	if want := len(old) + 1; n != want {
		t.Errorf("Prune dropped %d elements; want %d", n, want)
	}
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if len(tb.idx.reply) != 1 || len(tb.idx.gw) != 0 {
		t.Errorf("index after Prune: %d flows with reply rewrites, %d with gateway replies; want 1 and 0", len(tb.idx.reply), len(tb.idx.gw))
	}
	if _, ok := tb.idx.reply[f4]; !ok {
		t.Errorf("index after Prune lost %v, whose element is there", f4)
	}
}

// TestApply10k applies 10,000 Forward elements in one batch, lists them and
// removes them in one batch.
func TestApply10k(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "10k")
	tb := openIn(t, ns, Options{})
	flows := manyFlows(10000)
	var b Batch
	for _, f := range flows {
		b.Forward(f, netip.MustParseAddr("10.77.2.12"))
	}
	start := time.Now()
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	t.Logf("Apply of 10,000 Forwards: %v", time.Since(start))
	start = time.Now()
	es, err := tb.Flows()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Flows of 10,000 elements: %v", time.Since(start))
	got := make([]Flow, 0, len(es))
	for _, e := range es {
		got = append(got, e.Flow)
	}
	if len(got) != len(flows) {
		t.Fatalf("Flows returned %d elements; want %d", len(got), len(flows))
	}
	cmp := func(a, b Flow) int { return strings.Compare(a.String(), b.String()) }
	slices.SortFunc(got, cmp)
	want := slices.Clone(flows)
	slices.SortFunc(want, cmp)
	if !slices.Equal(got, want) {
		uniq := len(slices.CompactFunc(slices.Clone(got), func(a, b Flow) bool { return a == b }))
		es2, _ := tb.Flows()
		t.Fatalf("Flows returned other flows than the batch installed: %d unique of %d; a second Flows returned %d", uniq, len(got), len(es2))
	}
	b.Reset()
	for _, f := range flows {
		b.Remove(f)
	}
	start = time.Now()
	if err := tb.Apply(&b); err != nil {
		t.Fatal(err)
	}
	t.Logf("Remove of 10,000 flows: %v", time.Since(start))
	if es, err := tb.Flows(); err != nil || len(es) != 0 {
		t.Fatalf("after Remove: %d elements, %v", len(es), err)
	}
}

// manyFlows returns n distinct IPv4 flows to one service.
func manyFlows(n int) []Flow {
	out := make([]Flow, n)
	for i := range out {
		c := netip.AddrFrom4([4]byte{10, 77, byte(1 + i/60000), 2})
		out[i] = Flow{Client: netip.AddrPortFrom(c, uint16(1024+i%60000)), Service: f4.Service}
	}
	return out
}

// BenchmarkApply10k measures one Apply of 10,000 Forward elements, each
// replacing the same element of the previous iteration (so every element
// is a destroy plus an add in the transaction).
func BenchmarkApply10k(b *testing.B) {
	skipUnlessRoot(b)
	ns := newNamespace(b, "bench")
	tb := openIn(b, ns, Options{})
	var batch Batch
	for _, f := range manyFlows(10000) {
		batch.Forward(f, netip.MustParseAddr("10.77.2.12"))
	}
	for b.Loop() {
		if err := tb.Apply(&batch); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSwitchOne measures the nftables transactions of one flow's
// migration at its steering point: hold, then switch (remove the hold and
// forward), then remove — three Applies per op.
func BenchmarkSwitchOne(b *testing.B) {
	skipUnlessRoot(b)
	ns := newNamespace(b, "bench1")
	tb := openIn(b, ns, Options{})
	f := manyFlows(1)[0]
	to := netip.MustParseAddr("10.77.2.12")
	for b.Loop() {
		var hold, sw, rm Batch
		hold.Hold(f)
		sw.Remove(f)
		sw.Forward(f, to)
		rm.Remove(f)
		for _, x := range []*Batch{&hold, &sw, &rm} {
			if err := tb.Apply(x); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// TestLateSweep plays packets that were evaluated across a removal's
// commit and put their elements back after Apply's own sweep had looked
// (the late race of TestRemoveUnderTraffic, which traffic alone hits too
// rarely to test). An element re-created behind Apply's back must be
// removed once a wait that began after its removal has passed,
// and not earlier; a flow that a later batch added back must keep its
// element.
func TestLateSweep(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "late")
	tb := openIn(t, ns, Options{})
	// Each wait says it began, then waits for the test.
	began, release := make(chan struct{}, 16), make(chan struct{})
	tb.mu.Lock()
	tb.lateWait = func() { began <- struct{}{}; <-release }
	tb.mu.Unlock()
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) }) // before Close, which waits for the sweeper
	to := netip.MustParseAddr("192.0.2.7")
	flow := func(port uint16) Flow {
		return Flow{Client: netip.AddrPortFrom(f4.Client.Addr(), port), Service: f4.Service}
	}
	first, second, back := flow(40001), flow(40002), flow(40003)

	apply := func(fill func(*Batch)) {
		t.Helper()
		var b Batch
		fill(&b)
		if err := tb.Apply(&b); err != nil {
			t.Fatal(err)
		}
	}
	// A packet's refresh: the flows' elements, as the rule's dynset would
	// insert them, with no batch of the Table's.
	recreate := func(fs ...Flow) {
		t.Helper()
		var add [numSets]setChanges
		for _, f := range fs {
			add[setOf(KindForward, false)].add = append(add[setOf(KindForward, false)].add, setElem{key: flowKey(f), data: to.AsSlice(), timeout: tb.opts.Idle})
		}
		tb.mu.Lock()
		err := tb.nft.commit(tb.nft.elemReqs(add))
		tb.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	wait := func(what string, c <-chan struct{}) {
		t.Helper()
		select {
		case <-c:
		case <-time.After(10 * time.Second):
			t.Fatalf("the late sweep: %s did not come", what)
		}
	}
	forwards := func() (fs []Flow) {
		t.Helper()
		es, err := tb.Flows()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range es {
			if e.Kind == KindForward {
				fs = append(fs, e.Flow)
			}
		}
		slices.SortFunc(fs, func(a, b Flow) int { return int(a.Client.Port()) - int(b.Client.Port()) })
		return fs
	}

	apply(func(b *Batch) { b.Forward(first, to); b.Forward(second, to); b.Forward(back, to) })
	apply(func(b *Batch) { b.Remove(first); b.Remove(back) })
	wait("the first wait", began)
	// Removed while that wait runs: it does not cover them.
	apply(func(b *Batch) { b.Remove(second) })
	apply(func(b *Batch) { b.Forward(back, to) }) // wanted again
	recreate(first, second)

	release <- struct{}{}
	wait("the second wait", began) // the first round is done
	if got, want := forwards(), []Flow{second, back}; !slices.Equal(got, want) {
		t.Errorf("after the first round: forwards %v, want %v (only the first removal's wait has passed)", got, want)
	}
	tb.mu.Lock()
	done := tb.lateDone
	tb.mu.Unlock()
	once.Do(func() { close(release) }) // every wait from now on
	wait("its end", done)
	if got, want := forwards(), []Flow{back}; !slices.Equal(got, want) {
		t.Errorf("after the late sweep: forwards %v, want %v", got, want)
	}
	tb.mu.Lock()
	removed := tb.lateRemoved
	tb.mu.Unlock()
	if removed != 2 {
		t.Errorf("the late sweep removed %d elements, want 2", removed)
	}
}

// TestLateSweepClose checks that Close waits for the late sweep's round
// under way only, not for a table that goes on removing elements.
func TestLateSweepClose(t *testing.T) {
	skipUnlessRoot(t)
	ns := newNamespace(t, "lateclose")
	tb := openIn(t, ns, Options{})
	tb.mu.Lock()
	tb.lateWait = func() { time.Sleep(time.Millisecond) }
	tb.mu.Unlock()
	stop := make(chan struct{})
	removing := make(chan struct{})
	go func() {
		defer close(removing)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// A flow removed every time, so that the sweep always has
			// one to look for.
			var b Batch
			b.Remove(Flow{Client: netip.AddrPortFrom(f4.Client.Addr(), uint16(1024+i%60000)), Service: f4.Service})
			if tb.Apply(&b) != nil {
				return // closed
			}
		}
	}()
	time.Sleep(20 * time.Millisecond)
	closed := make(chan error, 1)
	go func() { closed <- tb.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Error(err)
		}
	case <-time.After(5 * time.Second):
		close(stop)
		<-removing
		<-closed
		t.Fatal("Close waited for the late sweep while Applies went on removing")
	}
	<-removing
}

package daemon

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
)

// TestSteerAuthority: who may steer a flow at its steering point s1, as
// switches move it around the pool, after the undo window, after a
// restart, and for refreshes.
func TestSteerAuthority(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	d := &Daemon{steered: map[migrate.Flow]steered{}, cfg: &Config{Name: "s1", ServiceAddrs: []netip.Addr{a("10.0.0.1")},
		Peers: []PeerConfig{{Name: "s2", ServiceAddrs: []netip.Addr{a("10.0.0.2")}}, {Name: "s3", ServiceAddrs: []netip.Addr{a("10.0.0.3")}}}}}
	f := migrate.Flow{Client: netip.MustParseAddrPort("10.9.0.1:40000"), Service: netip.MustParseAddrPort("10.0.0.1:7000")}
	g := migrate.Flow{Client: netip.MustParseAddrPort("10.9.0.1:40001"), Service: netip.MustParseAddrPort("10.0.0.1:7000")}
	fs := []migrate.Flow{f}
	may := func(from string, want bool) {
		t.Helper()
		err := d.maySteer(from, peer.SteerHold, fs)
		if (err == nil) != want {
			t.Fatalf("%s may steer %v: %v, want allowed %v", from, f, err, want)
		}
		if err != nil && !strings.Contains(err.Error(), "serves that connection") {
			t.Fatalf("refusal %q does not say who serves the connection", err)
		}
	}
	// At home on s1: no peer steers it.
	may("s2", false)
	may("s3", false)
	// s1 switches it to s2: s2 serves it.
	d.noteSwitched("", fs, a("10.0.0.2"))
	may("s2", true)
	may("s3", false)
	// A failed switch is not recorded (steerLocal records it only when
	// switched says so); one whose holds stay in is.
	if switched(nat.ErrClosed) {
		t.Fatal("a switch whose transaction failed counts as switched")
	}
	may("s3", false)
	if !switched(&nat.OpError{Op: "apply", Err: fmt.Errorf("%w, but: %w", nat.ErrApplied, nat.ErrHoldsKept)}) {
		t.Fatal("a switch whose holds stay in does not count as switched")
	}
	if switched(&nat.OpError{Op: "apply", Err: nat.ErrHoldsKept}) {
		t.Fatal("holds that stay in after a batch that did not go in count as a switch")
	}
	d.noteSwitched("s2", fs, a("10.0.0.3"))
	may("s3", true)
	// Switched back and forth.
	d.noteSwitched("s3", fs, a("10.0.0.2"))
	may("s2", true)
	d.noteSwitched("s2", fs, a("10.0.0.3"))
	// s2 switched it away: it may undo that for a while, then not.
	may("s2", true)
	st := d.steered[f]
	st.when = st.when.Add(-switchUndoWindow)
	d.steered[f] = st
	may("s2", false)
	may("s3", true)
	// Refreshes: only of the flows the sender serves, and they keep
	// the record alive.
	d.noteSwitched("s3", []migrate.Flow{g}, a("10.0.0.1")) // g: s3 sends it home
	if got := d.servedBy("s3", []migrate.Flow{f, g}); len(got) != 1 || got[0] != f {
		t.Fatalf("s3 serves %v of f and g, want f alone", got)
	}
	old := time.Now().Add(-time.Hour)
	st = d.steered[f]
	st.seen = old
	d.steered[f] = st
	d.noteRefreshed("s2", fs)
	if !d.steered[f].seen.Equal(old) {
		t.Fatal("a refresh from s2, which does not serve f, kept its record alive")
	}
	d.noteRefreshed("s3", fs)
	if time.Since(d.steered[f].seen) > time.Minute {
		t.Fatal("a refresh from s3, which serves f, did not keep its record alive")
	}
	// Pruning: g, home again, once its undo window is over; f once not
	// refreshed for longer than its rules live.
	d.pruneSteered(time.Now(), time.Hour)
	if _, ok := d.steered[g]; !ok {
		t.Fatal("g forgotten within its undo window")
	}
	d.pruneSteered(time.Now().Add(switchUndoWindow), 2*switchUndoWindow)
	if _, ok := d.steered[g]; ok {
		t.Fatal("g, back home, still recorded after its undo window")
	}
	if _, ok := d.steered[f]; !ok {
		t.Fatal("f, served by s3 and refreshed, forgotten")
	}
	d.pruneSteered(time.Now().Add(2*time.Hour), time.Hour)
	if _, ok := d.steered[f]; ok {
		t.Fatal("f still recorded two hours after its last refresh, with rules living an hour")
	}
	may("s3", false)
	// After a restart, the forward entries tell who serves their flows.
	d.relearnSteered([]nat.Entry{{Flow: nat.Flow{Client: f.Client, Service: f.Service}, Kind: nat.KindForward, Addr: a("10.0.0.2")}})
	may("s2", true)
	may("s3", false)
}

package daemon

import (
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
	d.noteSteered("", peer.SteerSwitch, fs, a("10.0.0.2"), nil)
	may("s2", true)
	may("s3", false)
	// A failed switch changes nothing; one whose holds stay in does.
	d.noteSteered("s2", peer.SteerSwitch, fs, a("10.0.0.3"), nat.ErrClosed)
	may("s3", false)
	d.noteSteered("s2", peer.SteerSwitch, fs, a("10.0.0.3"), &nat.OpError{Op: "apply", Err: nat.ErrHoldsKept})
	may("s3", true)
	// So does one whose queued packets could not be sent on.
	d.noteSteered("s3", peer.SteerSwitch, fs, a("10.0.0.2"), &steeredError{nat.ErrClosed})
	may("s2", true)
	d.noteSteered("s2", peer.SteerSwitch, fs, a("10.0.0.3"), &nat.OpError{Op: "apply", Err: nat.ErrHoldsKept})
	// s2 switched it away: it may undo that for a while, then not.
	may("s2", true)
	st := d.steered[f]
	st.when = st.when.Add(-switchUndoWindow)
	d.steered[f] = st
	may("s2", false)
	may("s3", true)
	// Refreshes: only of the flows the sender serves, and they keep
	// the record alive.
	d.noteSteered("s3", peer.SteerSwitch, []migrate.Flow{g}, a("10.0.0.1"), nil) // g: s3 sends it home
	if got := d.servedBy("s3", []migrate.Flow{f, g}); len(got) != 1 || got[0] != f {
		t.Fatalf("s3 serves %v of f and g, want f alone", got)
	}
	old := time.Now().Add(-time.Hour)
	st = d.steered[f]
	st.seen = old
	d.steered[f] = st
	d.noteSteered("s2", peer.SteerRefresh, fs, netip.Addr{}, nil)
	if !d.steered[f].seen.Equal(old) {
		t.Fatal("a refresh from s2, which does not serve f, kept its record alive")
	}
	d.noteSteered("s3", peer.SteerRefresh, fs, netip.Addr{}, nil)
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

package daemon

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mtcp-dev/mtcp/migrate"
)

// TestObservePhases: each failed connection is counted under the phase
// it failed in, not under the phase of the transaction's error.
func TestObservePhases(t *testing.T) {
	flow := func(port uint16) migrate.Flow {
		return migrate.Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("10.77.1.2"), port), Service: netip.MustParseAddrPort("10.77.2.11:7000")}
	}
	count := func(phase string) float64 { return testutil.ToFloat64(migrations.WithLabelValues("failed", phase)) }
	before := map[string]float64{}
	for _, p := range []string{"quiesce", "transfer", "commit", "partial"} {
		before[p] = count(p)
	}
	rep := &migrate.Report{Moved: []migrate.Flow{flow(1)}, Failed: map[migrate.Flow]error{
		flow(2): &migrate.PhaseError{Phase: migrate.PhaseQuiesce, Err: errors.New("app refused")},
		flow(3): &migrate.PhaseError{Phase: migrate.PhaseTransfer, Err: errors.New("restore failed")},
		flow(4): &migrate.PhaseError{Phase: migrate.PhaseTransfer, Err: errors.New("restore failed")},
		flow(5): errors.New("no phase"),
	}}
	observe(rep, 0)
	for p, want := range map[string]float64{"quiesce": 1, "transfer": 2, "commit": 0, "partial": 1} {
		if got := count(p) - before[p]; got != want {
			t.Errorf("failed in %s: counted %v, want %v", p, got, want)
		}
	}
}

package daemon

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/policy"
	dto "github.com/prometheus/client_model/go"
)

func TestPolicyConfig(t *testing.T) {
	c, err := ParseConfig([]byte(goodConfig + "policy: /etc/mtcp/policy.yaml\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Load.Scope != LoadScopeHost || c.Policy != "/etc/mtcp/policy.yaml" {
		t.Fatalf("load %+v policy %q", c.Load, c.Policy)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"bad scope", goodConfig + "load: {scope: cgroup}\n", `load: scope "cgroup" is not host or netns`},
		{"unknown load key", goodConfig + "load:\n  scope: netns\n  every: 1s\n", "line 12: field every not found"},
		{"policy on a gateway", goodConfig + "role: gateway\npolicy: /p.yaml\n", "only a server runs a policy"},
	} {
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want it to mention %q", tc.name, err, tc.want)
		}
	}
}

// TestFigures: what a daemon reports in its heartbeats is what its
// peers' engines read back.
func TestFigures(t *testing.T) {
	v4 := netip.MustParsePrefix("10.77.1.0/24")
	v6 := netip.MustParsePrefix("fd77:1::/64")
	conns := []policy.Conn{
		{Client: netip.MustParseAddrPort("10.77.1.2:1"), RTT: 3 * time.Millisecond},
		{Client: netip.MustParseAddrPort("10.77.1.9:2"), RTT: 90 * time.Millisecond},
		{Client: netip.MustParseAddrPort("10.77.1.2:3"), RTT: 5 * time.Millisecond},
		{Client: netip.MustParseAddrPort("[fd77:1::2]:4"), RTT: 7 * time.Millisecond},
		{Client: netip.MustParseAddrPort("[fd77:1::2]:5")}, // no RTT yet: ignored
	}
	d := &Daemon{pol: &policyState{load: policy.Load{CPU: 0.5, RunQueue: 2, Memory: 0.25, MemoryPressure: 0.01}, paths: medianPaths(conns)}}
	f := d.figures()
	if got := loadOf(f); got != (policy.Load{CPU: 0.5, RunQueue: 2, Memory: 0.25, MemoryPressure: 0.01}) {
		t.Fatalf("load %+v from %v", got, f)
	}
	paths := pathsOf(f)
	if len(paths) != 2 || paths[v4] != 5*time.Millisecond || paths[v6] != 7*time.Millisecond {
		t.Fatalf("paths %v from %v (want the medians 5ms and 7ms)", paths, f)
	}
}

// TestPolicyReloadAfterReadError: a policy file that disappears and comes
// back with the content it had is read again, and the reload metric says
// so.
func TestPolicyReloadAfterReadError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	good := []byte("rules:\n  - name: hot\n    when: {cpu: {above: 0.5}}\n    migrate: {count: 3, by: cpu, margin: 0.1}\n")
	if err := os.WriteFile(path, good, 0o600); err != nil {
		t.Fatal(err)
	}
	ps, err := newPolicyState(&Config{Policy: path}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ok := func() float64 {
		var m dto.Metric
		if err := policyOK.Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetGauge().GetValue()
	}
	if got := ok(); got != 1 {
		t.Fatalf("reload_ok %v after the start, want 1", got)
	}
	os.Remove(path)
	ps.reload("change", false)
	if got := ok(); got != 0 {
		t.Fatalf("reload_ok %v with the file gone, want 0", got)
	}
	if err := os.WriteFile(path, good, 0o600); err != nil {
		t.Fatal(err)
	}
	ps.reload("change", false)
	if got := ok(); got != 1 {
		t.Fatalf("reload_ok %v once the same file is back, want 1", got)
	}
}

// TestPolicyReloadDecidesAnew: a reloaded policy decides at the next
// tick, not once the old interval has run out.
func TestPolicyReloadDecidesAnew(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte("interval: 10m\nrules: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ps, err := newPolicyState(&Config{Policy: path}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ps.nextDecide = time.Now().Add(10 * time.Minute) // as after a decision
	if err := os.WriteFile(path, []byte("interval: 1s\nrules: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ps.reload("change", false) // seen changed: taken at the next look
	ps.reload("change", false)
	if ps.engine.Policy().Interval.D() != time.Second {
		t.Fatalf("interval %v after the reload, want 1s", ps.engine.Policy().Interval.D())
	}
	if time.Now().Before(ps.nextDecide) {
		t.Fatalf("next decision in %v after the reload, want at the next tick", time.Until(ps.nextDecide).Round(time.Second))
	}
}

// TestPolicyChangeSettles: a changed policy file is taken only once it
// reads the same at two looks in a row, so that one caught half written
// (which may parse, without its limits, say) is not; SIGHUP takes it at
// once.
func TestPolicyChangeSettles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	full := "limits: {rate: 5}\nrules: []\n"
	write(full)
	ps, err := newPolicyState(&Config{Policy: path}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	rate := func() int { return ps.engine.Policy().Limits.Rate }
	write("rules: []\n") // half way through a rewrite: no limits
	ps.reload("change", false)
	if rate() != 5 {
		t.Fatalf("rate limit %d after a look at a file being rewritten, want 5 still", rate())
	}
	write("limits: {rate: 7}\nrules: []\n") // the rewrite done
	ps.reload("change", false)
	if rate() != 5 {
		t.Fatalf("rate limit %d at the first look at the new file, want 5 still", rate())
	}
	ps.reload("change", false)
	if rate() != 7 {
		t.Fatalf("rate limit %d once the file read the same twice, want 7", rate())
	}
	write("limits: {rate: 9}\nrules: []\n")
	ps.reload("sighup", true)
	if rate() != 9 {
		t.Fatalf("rate limit %d after SIGHUP, want 9", rate())
	}
}

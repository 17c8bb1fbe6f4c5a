package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPolicyCheckPool: policy check refuses a policy naming a server
// outside the pool of the mtcpd configuration it is given, as mtcpd would
// at start, and says when it had no configuration to check against.
func TestPolicyCheckPool(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	config := write("mtcpd.yaml", "name: s1\npeers:\n  - {name: s2, addr: 10.77.3.12:7700}\n")
	good := write("good.yaml", "maintenance: [s2]\nrules:\n  - name: drain\n    when: {maintenance: true}\n")
	bad := write("bad.yaml", "rules:\n  - name: w\n    when: {conns: {above: 5}}\n    migrate: {to: weighted, weights: {s2: 1, s3: 1}}\n")
	mtcpctl := func(args ...string) (int, string, string) {
		var out, errs bytes.Buffer
		code := run(context.Background(), args, &out, &errs)
		return code, out.String(), errs.String()
	}
	if code, out, errs := mtcpctl("policy", "check", good, "--config", config); code != ExitOK || !strings.Contains(out, "in the pool of "+config) {
		t.Errorf("good policy: exit %d, %q %q", code, out, errs)
	}
	if code, out, errs := mtcpctl("policy", "check", bad, "--config", config); code != ExitFailure || !strings.Contains(errs, "not in the pool (s1, s2): s3") {
		t.Errorf("policy naming s3: exit %d, %q %q; want it refused, naming s3", code, out, errs)
	}
	if code, out, errs := mtcpctl("policy", "check", bad, "--config", filepath.Join(dir, "missing.yaml")); code != ExitFailure || !strings.Contains(errs, "missing.yaml") {
		t.Errorf("missing configuration: exit %d, %q %q", code, out, errs)
	}
	if _, err := os.Stat(defaultConfig); err == nil {
		t.Skipf("%s exists: the check without --config would use it", defaultConfig)
	}
	if code, out, errs := mtcpctl("policy", "check", bad); code != ExitOK || !strings.Contains(out, "were not checked") {
		t.Errorf("no configuration: exit %d, %q %q; want OK, saying the servers were not checked", code, out, errs)
	}
}

package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestIssueRefusesCANames: a member named after the CA's files would
// overwrite the pool CA's certificate and key, even with --force.
func TestIssueRefusesCANames(t *testing.T) {
	dir := t.TempDir()
	mtcpctl := func(args ...string) (int, string) {
		var out, errs bytes.Buffer
		code := run(context.Background(), args, &out, &errs)
		return code, errs.String()
	}
	if code, errs := mtcpctl("certs", "init", "--dir", dir, "--name", "test-pool"); code != ExitOK {
		t.Fatalf("certs init: exit %d: %s", code, errs)
	}
	read := func() string {
		var b strings.Builder
		for _, f := range []string{"ca.pem", "ca-key.pem"} {
			data, err := os.ReadFile(filepath.Join(dir, f))
			if err != nil {
				t.Fatal(err)
			}
			b.Write(data)
		}
		return b.String()
	}
	before := read()
	for _, name := range []string{"ca", "ca-key"} {
		code, errs := mtcpctl("certs", "issue", "--dir", dir, "--name", name, "--force")
		if code != ExitUsage || !strings.Contains(errs, "CA's files") {
			t.Errorf("certs issue --name %s --force: exit %d, %q; want a usage error", name, code, errs)
		}
	}
	if read() != before {
		t.Fatal("the CA's certificate or key changed")
	}
	if code, errs := mtcpctl("certs", "issue", "--dir", dir, "--name", "s1"); code != ExitOK {
		t.Fatalf("certs issue --name s1 after the refusals: exit %d: %s", code, errs)
	}
}

package cli

import (
	"os/exec"
	"strings"
	"testing"
)

// TestReachesDaemonOnlyThroughAdmin: mtcpctl talks to mtcpd through the
// admin package and never touches sockets' TCP state, CRIU or nftables
// itself.
func TestReachesDaemonOnlyThroughAdmin(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/mtcp-dev/mtcp/cmd/mtcpctl").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"/repair", "/criu", "/nat", "/daemon", "/migrate"} {
			if strings.HasPrefix(dep, "github.com/mtcp-dev/mtcp"+banned) {
				t.Errorf("mtcpctl depends on %s", dep)
			}
		}
	}
}

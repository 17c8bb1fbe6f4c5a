//go:build linux

package nat

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/nat/netns"
)

func skipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and nftables tables (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s in PATH (the test oracle): %v", tool, err)
		}
	}
}

// newNamespace creates a throwaway namespace named like testbed's test
// beds (mtt<pid>x<hex>-name, swept by testbed.Sweep if the process dies)
// with lo up, and deletes it when the test ends.
func newNamespace(t testing.TB, name string) string {
	t.Helper()
	var b [2]byte
	rand.Read(b[:])
	ns := fmt.Sprintf("mtt%dx%s-%s", os.Getpid(), hex.EncodeToString(b[:]), name)
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	return ns
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, ee.Stderr)
		}
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return string(out)
}

// ruleset is `nft list ruleset` in namespace ns ("" = the root namespace).
// Its warnings (a table using xtables targets is "managed by
// iptables-nft") go to stderr and are left out.
func ruleset(t testing.TB, ns string) string {
	t.Helper()
	if ns == "" {
		return run(t, "nft", "list", "ruleset")
	}
	return run(t, "ip", "netns", "exec", ns, "nft", "list", "ruleset")
}

// in runs fn in namespace ns.
func in(t testing.TB, ns string, fn func() error) {
	t.Helper()
	if err := netns.Do(netns.Path(ns), fn); err != nil {
		t.Fatalf("in %s: %v", ns, err)
	}
}

// openIn opens a Table in namespace ns, closed when the test ends.
func openIn(t testing.TB, ns string, o Options) *Table {
	t.Helper()
	var tb *Table
	in(t, ns, func() (err error) { tb, err = Open(o); return err })
	t.Cleanup(func() { tb.Close() })
	return tb
}

// netnsDo runs fn in namespace ns and returns its error.
func netnsDo(ns string, fn func() error) error { return netns.Do(netns.Path(ns), fn) }

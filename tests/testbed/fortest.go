package testbed

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// SkipReason returns why beds cannot be built here ("" if they can): not
// root, or ip, nft, sysctl or nsenter missing from PATH.
func SkipReason() string {
	if os.Geteuid() != 0 {
		return "testbed: needs root to create network namespaces"
	}
	for _, tool := range []string{"ip", "nft", "sysctl", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "testbed: needs " + tool + " in PATH: " + err.Error()
		}
	}
	return ""
}

// ForTest brings up a fresh bed for the test and removes it when the test
// and its other cleanups are done.
//
// It skips the test (with the reason) unless the process is root and ip,
// nft, sysctl and nsenter are installed. It first calls [Sweep], so beds of
// earlier test runs that were killed do not accumulate. The bed's prefix is
// a fresh test prefix mtt<pid>x<hex>. The cleanup calls [Bed.Down] and
// fails the test if [Leftovers] reports anything (a namespace or a process
// still in one). Tests may call ForTest several times for several beds.
func ForTest(t testing.TB) *Bed {
	t.Helper()
	if reason := SkipReason(); reason != "" {
		t.Skip(reason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := Sweep(ctx); err != nil {
		// Another run's debris must not fail this test; say so and go on.
		t.Logf("testbed: sweeping beds of dead test processes: %v", err)
	}
	b, err := Up(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// t.Context is already canceled when cleanups run.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := b.Down(ctx); err != nil {
			t.Error(err)
		}
		left, err := Leftovers(ctx, b.Prefix)
		if err != nil {
			t.Errorf("testbed: checking what %s left: %v", b.Prefix, err)
		}
		if len(left) > 0 {
			t.Errorf("testbed: bed %s left behind: %s", b.Prefix, strings.Join(left, "; "))
		}
	})
	return b
}

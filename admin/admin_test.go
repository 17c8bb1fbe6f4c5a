package admin

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNoDaemonErrors: mtcpctl says whether the admin socket is missing or
// left over from an earlier run, rather than one message for both.
func TestNoDaemonErrors(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	if err := os.WriteFile(stale, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, want string }{
		{filepath.Join(dir, "missing.sock"), "no admin socket at"},
		{stale, "nothing answers on"},
	} {
		_, err := NewClient(tc.path).Status(context.Background())
		if !errors.Is(err, ErrNoDaemon) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrNoDaemon saying %q", filepath.Base(tc.path), err, tc.want)
		}
	}
}

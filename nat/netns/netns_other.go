//go:build !linux

package netns

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
)

// Dir is where `ip netns add` bind-mounts named network namespaces.
const Dir = "/run/netns"

// Path returns the file of the named network namespace NAME, /run/netns/NAME,
// as created by `ip netns add NAME`.
func Path(name string) string {
	return filepath.Join(Dir, name)
}

// Do runs fn inside the network namespace at path. Network namespaces exist
// only on Linux: elsewhere Do does not call fn and returns an error wrapping
// [errors.ErrUnsupported].
func Do(path string, fn func() error) error {
	return fmt.Errorf("netns: enter %s: network namespaces are not supported on %s: %w", path, runtime.GOOS, errors.ErrUnsupported)
}

//go:build !linux

package ucred

import (
	"errors"
	"net"
)

// ErrUnsupported is returned where peer credentials do not exist.
var ErrUnsupported = errors.New("peer credentials are only available on Linux")

// Peer returns ErrUnsupported: SO_PEERCRED is a Linux feature.
func Peer(uc *net.UnixConn) (pid int, uid uint32, err error) {
	return 0, 0, ErrUnsupported
}

// FileOwner reports no owner.
func FileOwner(path string) (uint32, bool) { return 0, false }

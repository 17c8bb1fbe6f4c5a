//go:build !linux

package app

import (
	"errors"
	"net"
)

var errUnsupported = errors.New("mtcp app: peer credentials are only available on Linux")

// peerCred reports that SO_PEERCRED is a Linux feature. Registry.Serve
// refuses every peer without it; an application does not check its
// daemon.
func peerCred(uc *net.UnixConn) (pid int, uid uint32, err error) {
	return 0, 0, errUnsupported
}

// fileOwner reports no owner.
func fileOwner(path string) (uint32, bool) { return 0, false }

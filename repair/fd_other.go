//go:build !linux

package repair

import (
	"fmt"
	"net"
	"os"
)

// TakeFD copies another process's descriptor. It needs Linux's
// pidfd_getfd(2); elsewhere it fails with an *OpError wrapping
// ErrUnsupported.
func TakeFD(pid, fd int) (*os.File, error) {
	return nil, &OpError{Op: fmt.Sprintf("take fd %d of pid %d (pidfd_getfd)", fd, pid), Err: ErrUnsupported}
}

// TakeConn copies another process's TCP socket. It needs Linux's
// pidfd_getfd(2); elsewhere it fails with an *OpError wrapping
// ErrUnsupported.
func TakeConn(pid, fd int) (*net.TCPConn, error) {
	return nil, &OpError{Op: fmt.Sprintf("take fd %d of pid %d (pidfd_getfd)", fd, pid), Err: ErrUnsupported}
}

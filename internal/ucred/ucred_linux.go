package ucred

import (
	"errors"
	"net"
	"os"
	"syscall"
)

// ErrUnsupported is returned where peer credentials do not exist.
var ErrUnsupported = errors.New("peer credentials are only available on Linux")

// Peer returns the pid and uid of the process at the other end of uc, as
// they were when it connected.
func Peer(uc *net.UnixConn) (pid int, uid uint32, err error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *syscall.Ucred
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		cred, gerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if gerr != nil {
		return 0, 0, os.NewSyscallError("getsockopt SO_PEERCRED", gerr)
	}
	return int(cred.Pid), cred.Uid, nil
}

// FileOwner returns the uid owning the file at path.
func FileOwner(path string) (uint32, bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Uid, true
}

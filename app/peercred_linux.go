package app

import (
	"net"
	"os"
	"syscall"
)

// peerCred returns the pid and uid of the process at the other end of a
// unix socket, as the kernel recorded them at connect(2) (SO_PEERCRED):
// the peer cannot lie about them.
func peerCred(uc *net.UnixConn) (pid int, uid uint32, err error) {
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

// fileOwner returns the uid owning the file at path.
func fileOwner(path string) (uint32, bool) {
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

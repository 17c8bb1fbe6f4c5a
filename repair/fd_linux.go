package repair

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// TakeFD returns a copy of descriptor fd of process pid, made with
// pidfd_open(2) and pidfd_getfd(2) (Linux 5.6 or later). The copy refers to
// the same open file description as the original, as after dup(2): both
// processes now hold the socket, and it lives until both have closed it.
// The returned descriptor is close-on-exec.
//
// The caller needs ptrace rights over pid (PTRACE_MODE_ATTACH_REALCREDS):
// root or CAP_SYS_PTRACE, or the same user where Yama's ptrace_scope allows
// it. Errors wrap the errno, so errors.Is(err, unix.ESRCH) (no such process),
// unix.EBADF (no such descriptor) and unix.EPERM (not allowed) work; they
// are *OpError with Op "take fd FD of pid PID".
func TakeFD(pid, fd int) (*os.File, error) {
	f, err := takeFD(pid, fd)
	if err != nil {
		return nil, takeErr(pid, fd, err)
	}
	return f, nil
}

func takeErr(pid, fd int, err error) error {
	return &OpError{Op: fmt.Sprintf("take fd %d of pid %d", fd, pid), Err: err}
}

func takeFD(pid, fd int) (*os.File, error) {
	if pid <= 0 || fd < 0 {
		return nil, fmt.Errorf("pid must be positive and fd non-negative: %w", unix.EINVAL)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, explainTakeFD("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	nfd, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return nil, explainTakeFD("pidfd_getfd", err)
	}
	return os.NewFile(uintptr(nfd), fmt.Sprintf("pid %d fd %d", pid, fd)), nil
}

// explainTakeFD turns the errno of pidfd_open/pidfd_getfd into a message
// that says what the user can do.
func explainTakeFD(call string, err error) error {
	var why string
	switch {
	case errors.Is(err, unix.ESRCH):
		why = "the process does not exist (it may have exited)"
	case errors.Is(err, unix.EBADF):
		why = "the process has no such file descriptor"
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		why = "not permitted: copying another process's descriptors needs ptrace rights over it (run as root or with CAP_SYS_PTRACE)"
	case errors.Is(err, unix.ENOSYS):
		why = "the kernel lacks " + call + " (Linux 5.6 or later is needed)"
	default:
		why = call + " failed"
	}
	return fmt.Errorf("%s: %w", why, err)
}

// TakeConn copies descriptor fd of process pid as TakeFD does and returns
// it as a *net.TCPConn. It fails, wrapping ErrNotTCP, ErrMPTCP or
// ErrListening, unless the descriptor is a TCP stream socket (IPv4 or IPv6)
// that is not listening.
//
// The descriptor shares its open file description, and so its file status
// flags, with the owner's: net.FileConn switches it to non-blocking mode,
// and the owning process sees that change too. That is harmless for an
// owner whose sockets are already non-blocking (any Go, libuv or epoll
// based server) and for one that is about to be frozen, but a blocking
// owner may then see EAGAIN.
func TakeConn(pid, fd int) (*net.TCPConn, error) {
	f, err := TakeFD(pid, fd)
	if err != nil {
		return nil, err
	}
	defer f.Close() // net.FileConn works on its own dup
	if err := checkTCPSocket(f); err != nil {
		return nil, takeErr(pid, fd, err)
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, takeErr(pid, fd, err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, takeErr(pid, fd, fmt.Errorf("net.FileConn made a %T: %w", c, ErrNotTCP))
	}
	return tc, nil
}

// checkTCPSocket reports why f is not a non-listening TCP socket, or nil.
func checkTCPSocket(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var domain, typ, proto, listening int
	var soErr error
	err = rc.Control(func(s uintptr) {
		fd := int(s)
		if domain, soErr = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); soErr != nil {
			return
		}
		if typ, soErr = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); soErr != nil {
			return
		}
		if proto, soErr = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL); soErr != nil {
			return
		}
		listening, soErr = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	})
	if err == nil {
		err = soErr
	}
	if errors.Is(err, unix.ENOTSOCK) {
		return fmt.Errorf("%w: not a socket", ErrNotTCP)
	}
	if err != nil {
		return err
	}
	switch {
	case domain != unix.AF_INET && domain != unix.AF_INET6:
		return fmt.Errorf("%w: socket of address family %d, want AF_INET or AF_INET6", ErrNotTCP, domain)
	case typ != unix.SOCK_STREAM:
		return fmt.Errorf("%w: socket of type %d, want SOCK_STREAM", ErrNotTCP, typ)
	case proto == unix.IPPROTO_MPTCP:
		return fmt.Errorf("%w: the descriptor is an MPTCP socket, which TCP_REPAIR cannot capture", ErrMPTCP)
	case proto != unix.IPPROTO_TCP:
		return fmt.Errorf("%w: stream socket of protocol %d", ErrNotTCP, proto)
	case listening != 0:
		return fmt.Errorf("%w: the descriptor is a listening socket", ErrListening)
	}
	return nil
}

package app

import (
	"errors"
	"sync"
	"syscall"
)

// Socket is a socket descriptor the daemon received from an application:
// an exported connection's (see [Exported]). It is a plain descriptor,
// unlike an *os.File not registered with Go's network poller: the daemon
// never reads or writes an exported socket, it only freezes, captures and
// closes it, and registering and unregistering every one of a drain's ten
// thousand sockets with epoll cost three system calls each.
type Socket struct {
	mu sync.RWMutex // Close waits for a Control in progress
	fd int          // -1 once closed
}

func newSocket(fd int) *Socket { return &Socket{fd: fd} }

// errSocketClosed is returned for a closed Socket.
var errSocketClosed = errors.New("mtcp registry: socket already closed")

// Fd returns the descriptor, or -1 once the Socket is closed. It stays
// valid only until Close.
func (s *Socket) Fd() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.fd
}

// SyscallConn gives access to the descriptor (for repair.Freeze and the
// like) through [syscall.RawConn.Control]. Its Read and Write fail: the
// descriptor is not polled, so they could not wait.
func (s *Socket) SyscallConn() (syscall.RawConn, error) {
	if s == nil {
		return nil, syscall.EINVAL
	}
	return rawSocket{s}, nil
}

// Close closes the descriptor; later calls return an error.
func (s *Socket) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return errSocketClosed
	}
	err := syscall.Close(s.fd)
	s.fd = -1
	return err
}

type rawSocket struct{ s *Socket }

func (r rawSocket) Control(f func(fd uintptr)) error {
	r.s.mu.RLock()
	defer r.s.mu.RUnlock()
	if r.s.fd < 0 {
		return errSocketClosed
	}
	f(uintptr(r.s.fd))
	return nil
}

var errNotPolled = errors.New("mtcp registry: an exported socket is not for reading or writing")

func (rawSocket) Read(func(fd uintptr) bool) error  { return errNotPolled }
func (rawSocket) Write(func(fd uintptr) bool) error { return errNotPolled }

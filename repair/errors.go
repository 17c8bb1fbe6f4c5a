package repair

import "errors"

// Errors a caller can test for with errors.Is. They arrive wrapped in an
// [*OpError] or with details appended.
var (
	// ErrMPTCP: the socket is multipath TCP, which TCP_REPAIR does not
	// support. Go ≥ 1.24 listeners are MPTCP by default where the kernel
	// enables it.
	ErrMPTCP = errors.New("socket is MPTCP, which TCP_REPAIR cannot migrate: create the listener with net.ListenConfig.SetMultipathTCP(false) or run the server with GODEBUG=multipathtcp=0")
	// ErrULP: an upper-layer protocol (TCP_ULP, such as kernel TLS) is
	// attached; its state lives outside the TCP socket and would be lost.
	ErrULP = errors.New("socket has an upper-layer protocol attached (TCP_ULP, e.g. kernel TLS), whose state cannot be migrated")
	// ErrListening: listening sockets hold no connection to migrate.
	ErrListening = errors.New("socket is listening: only connected sockets can be migrated")
	// ErrNotTCP: the socket is not an IPv4 or IPv6 TCP stream socket.
	ErrNotTCP = errors.New("not an IPv4/IPv6 TCP socket")
	// ErrState: the connection is in a state that cannot be migrated (for
	// example SYN_SENT or TIME_WAIT).
	ErrState = errors.New("TCP state cannot be migrated")
	// ErrUrgent: the connection received urgent (out-of-band, MSG_OOB)
	// data the application has not read past. TCP_REPAIR cannot set an
	// urgent mark, so the bytes from the mark on would be lost: the
	// connection stays where it is.
	ErrUrgent = errors.New("urgent (out-of-band) data is pending, which TCP_REPAIR cannot carry: the connection cannot move until the application has read past it")
	// ErrMalformed: an encoded State is truncated, corrupted or
	// inconsistent. Nothing was installed.
	ErrMalformed = errors.New("malformed connection state")
	// ErrVersion: an encoded State has a format version this build does
	// not know. Upgrade the older side of the pool.
	ErrVersion = errors.New("unsupported connection state version")
	// ErrUnsupported: TCP_REPAIR is only available on Linux.
	ErrUnsupported = errors.New("TCP_REPAIR is supported on Linux only")
	// ErrDone: the handle was already thawed, discarded, committed or
	// aborted.
	ErrDone = errors.New("socket already released")
)

// OpError is the error type of this package's socket operations: Op names
// the step that failed ("freeze", "capture", "restore: connect", ...), Err
// says why.
type OpError struct {
	Op  string
	Err error
}

// Error names the operation and what went wrong.
func (e *OpError) Error() string { return "repair: " + e.Op + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e *OpError) Unwrap() error { return e.Err }

func opErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &OpError{Op: op, Err: err}
}

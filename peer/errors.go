package peer

import (
	"errors"
	"fmt"
)

var (
	// ErrClosed is wrapped by the errors of calls on a connection that is
	// closed or was lost. The connection cannot be used again: Dial anew.
	ErrClosed = errors.New("peer connection closed")
	// ErrProtocol is wrapped by errors about frames that break the wire
	// protocol. The connection they arrived on is closed.
	ErrProtocol = errors.New("peer protocol error")
	// ErrFrameTooLarge is wrapped by the error of a request that does not
	// fit in one frame of the peer's MaxFrame: split it (for a Transfer,
	// fewer items per request).
	ErrFrameTooLarge = errors.New("frame too large")
	// ErrInvalidName is wrapped by the errors of [CA.Issue] for a member
	// name or DNS name that cannot go in a certificate, and for an
	// invalid IP address.
	ErrInvalidName = errors.New("invalid name")
)

// OpError is the error of an operation with a peer that failed on this
// side or on the way: dialling, the TLS handshake, a request that could
// not be sent or got no answer in time. Errors.Is sees through it, e.g.
// to [context.DeadlineExceeded] or [ErrClosed].
type OpError struct {
	Peer string // the peer's name
	Op   string // "dial", "TLS handshake", "hello", or the request: "Prepare", "Transfer", ...
	Err  error
}

// Error reads "peer NAME: OP: cause".
func (e *OpError) Error() string { return fmt.Sprintf("peer %s: %s: %v", e.Peer, e.Op, e.Err) }

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

// RemoteError is the error a peer's [Handler] returned for a request: the
// peer received the request and refused or failed it.
type RemoteError struct {
	Peer string // the peer's name
	Op   string // the request: "Prepare", "Transfer", ...
	Msg  string // the handler's error text
}

// Error reads "peer NAME: OP failed there: message".
func (e *RemoteError) Error() string {
	return fmt.Sprintf("peer %s: %s failed there: %s", e.Peer, e.Op, e.Msg)
}

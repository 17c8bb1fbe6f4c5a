//go:build !linux

package repair

import "context"

// List returns this network namespace's TCP connections. It needs Linux's
// sock_diag; elsewhere it fails with an *OpError wrapping ErrUnsupported.
func List(ctx context.Context, o ListOptions) ([]Conn, error) {
	return nil, &OpError{Op: "list (sock_diag)", Err: ErrUnsupported}
}

// Package ucred tells who is at the other end of a local unix socket, as
// the kernel recorded it at connect(2) (SO_PEERCRED): mtcpd's admin socket
// serves root only, and its application socket root and its owner. The
// peer cannot lie about these credentials. Elsewhere than on Linux every
// call fails with ErrUnsupported.
package ucred

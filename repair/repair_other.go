//go:build !linux

package repair

import (
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
)

// Frozen is a socket in repair mode. TCP_REPAIR exists on Linux only.
type Frozen struct{}

// Freeze reports ErrUnsupported: TCP_REPAIR exists on Linux only.
func Freeze(c syscall.Conn) (*Frozen, error) { return nil, opErr("freeze", ErrUnsupported) }

// InRepair returns an error wrapping ErrUnsupported.
func InRepair(c syscall.Conn) (bool, error) { return false, opErr("in repair", ErrUnsupported) }

// Capture reports ErrUnsupported.
func (f *Frozen) Capture() (*State, error) { return nil, opErr("capture", ErrUnsupported) }

// Quiet would add the quiet bit to the frozen socket's mark; TCP_REPAIR
// exists on Linux only.
func (f *Frozen) Quiet(m Marks) error { return opErr("quiet", ErrUnsupported) }

// SinceData reports how long before the last Capture the socket last
// received data; never here.
func (f *Frozen) SinceData() (d time.Duration, ok bool) { return 0, false }

// Thaw reports ErrUnsupported.
func (f *Frozen) Thaw() error { return opErr("thaw", ErrUnsupported) }

// Discard reports ErrUnsupported.
func (f *Frozen) Discard() error { return opErr("discard", ErrUnsupported) }

// Blank is a socket made ahead of a restore. TCP_REPAIR exists on Linux only.
type Blank struct{}

// NewBlank reports ErrUnsupported.
func NewBlank(v6 bool) (*Blank, error) { return nil, opErr("blank", ErrUnsupported) }

// Close does nothing.
func (b *Blank) Close() error { return nil }

// Restored is a socket rebuilt from a State. TCP_REPAIR exists on Linux only.
type Restored struct{}

// Restore reports ErrUnsupported: TCP_REPAIR exists on Linux only.
func Restore(st *State, o RestoreOptions) (*Restored, error) {
	return nil, opErr("restore", ErrUnsupported)
}

// Sockopts returns the zero Sockopts.
func (r *Restored) Sockopts() Sockopts { return Sockopts{} }

// Local returns the zero address.
func (r *Restored) Local() netip.AddrPort { return netip.AddrPort{} }

// Remote returns the zero address.
func (r *Restored) Remote() netip.AddrPort { return netip.AddrPort{} }

// Commit reports ErrUnsupported.
func (r *Restored) Commit() error { return opErr("commit", ErrUnsupported) }

// File reports ErrUnsupported.
func (r *Restored) File() (*os.File, error) { return nil, opErr("file", ErrUnsupported) }

// Conn reports ErrUnsupported.
func (r *Restored) Conn() (*net.TCPConn, error) { return nil, opErr("conn", ErrUnsupported) }

// Abort reports ErrUnsupported.
func (r *Restored) Abort() error { return opErr("abort", ErrUnsupported) }

// Injector sends segments to restored sockets. TCP_REPAIR exists on Linux
// only.
type Injector struct{}

// NewInjector reports ErrUnsupported.
func NewInjector(m Marks) (*Injector, error) { return nil, opErr("injector", ErrUnsupported) }

// Close does nothing.
func (i *Injector) Close() error { return nil }

// LimitUnsent reports ErrUnsupported.
func LimitUnsent(c syscall.Conn, bytes int) error { return opErr("limit unsent", ErrUnsupported) }

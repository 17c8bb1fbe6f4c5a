//go:build !linux

package criu

import (
	"context"
	"errors"
	"fmt"
	"io"
)

var errNotLinux = fmt.Errorf("%w: CRIU runs only on Linux: %w", ErrUnavailable, errors.ErrUnsupported)

// Check reports that CRIU is unavailable: it runs only on Linux.
func Check(ctx context.Context, o Options) (Version, error) {
	return Version{}, &OpError{Op: "version", Err: errNotLinux}
}

// Dump reports that CRIU is unavailable: it runs only on Linux.
func Dump(ctx context.Context, o DumpOptions) (*DumpResult, error) {
	return nil, &OpError{Op: "dump", Err: errNotLinux}
}

// PageServerOptions say where ServePages puts the pages.
type PageServerOptions struct {
	Options
	Dir  string
	Conn io.ReadWriter
}

// ServePages reports that CRIU is unavailable: it runs only on Linux.
func ServePages(ctx context.Context, o PageServerOptions) error {
	return &OpError{Op: "page server", Err: errNotLinux}
}

// Restore reports that CRIU is unavailable: it runs only on Linux.
func Restore(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	return nil, &OpError{Op: "restore", Err: errNotLinux}
}

// LazyPages stands for a lazy-pages daemon, which never runs here.
type LazyPages struct{}

// StartLazyPages reports that CRIU is unavailable: it runs only on Linux.
func StartLazyPages(ctx context.Context, o LazyOptions) (*LazyPages, error) {
	return nil, &OpError{Op: "lazy pages", Err: errNotLinux}
}

// Wait returns at once.
func (lp *LazyPages) Wait(ctx context.Context) error { return nil }

// Kill does nothing.
func (lp *LazyPages) Kill() {}

// Stats reports nothing: the daemon never runs here.
func (lp *LazyPages) Stats() LazyStats { return LazyStats{} }

// CheckLazyRestore reports that CRIU is unavailable: it runs only on Linux.
func CheckLazyRestore(ctx context.Context, o Options) error {
	return &OpError{Op: "feature check", Err: errNotLinux}
}

// PreparedDump stands for a prepared dump, which never runs here.
type PreparedDump struct{}

// PrepareDump reports that CRIU is unavailable: it runs only on Linux.
func PrepareDump(o DumpOptions) (*PreparedDump, error) {
	return nil, &OpError{Op: "dump", Err: errNotLinux}
}

// Run reports that CRIU is unavailable.
func (p *PreparedDump) Run(ctx context.Context) (*DumpResult, error) {
	return nil, &OpError{Op: "dump", Err: errNotLinux}
}

// Close does nothing.
func (p *PreparedDump) Close() {}

// PreparedRestore stands for a prepared restore, which never runs here.
type PreparedRestore struct{}

// PrepareRestore reports that CRIU is unavailable: it runs only on Linux.
func PrepareRestore(o Options) (*PreparedRestore, error) {
	return nil, &OpError{Op: "restore", Err: errNotLinux}
}

// Run reports that CRIU is unavailable.
func (p *PreparedRestore) Run(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	return nil, &OpError{Op: "restore", Err: errNotLinux}
}

// Close does nothing.
func (p *PreparedRestore) Close() {}

// Room reports that CRIU is unavailable: it runs only on Linux.
func Room(dir string) (int64, error) { return 0, &OpError{Op: "room", Err: errNotLinux} }

//go:build linux

package netns

import (
	"fmt"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// Dir is where `ip netns add` bind-mounts named network namespaces.
const Dir = "/run/netns"

// Path returns the file of the named network namespace NAME, /run/netns/NAME,
// as created by `ip netns add NAME`.
func Path(name string) string {
	return filepath.Join(Dir, name)
}

// threadNetNS is the current thread's network namespace. /proc/self would
// name the thread group leader's namespace, which is not the one this
// (locked) thread is in while Do runs.
const threadNetNS = "/proc/thread-self/ns/net"

// Do runs fn on a locked OS thread that has joined the network namespace at
// path (for example /run/netns/NAME, see [Path]), then returns the thread to
// the namespace it had and returns fn's error.
//
// Sockets created inside fn belong to that namespace for their whole life:
// they can be used from any goroutine after Do returns. Goroutines started
// by fn do NOT run in the namespace: they run on other threads of the
// process, in the process's namespace. The same holds for work a library
// hands to another goroutine or thread (cgo DNS lookups, for instance), so
// create sockets directly in fn, not in goroutines it starts.
//
// fn runs on a fresh goroutine wired to its own OS thread, so the caller's
// thread is never moved. If fn panics, the thread is restored and the panic
// is re-raised in the caller. If the thread cannot be returned to its
// original namespace, it is left locked so that the Go runtime destroys it
// when the goroutine exits instead of reusing a thread in the wrong
// namespace; Do then reports that error.
//
// Entering needs CAP_SYS_ADMIN. Only the network namespace is joined.
func Do(path string, fn func() error) error {
	type result struct {
		err      error
		panicked bool
		panicVal any
	}
	done := make(chan result, 1)
	go func() {
		var r result
		defer func() { done <- r }()
		// Never unlocked unless the thread is back where it started: a
		// goroutine that exits while locked takes its thread with it.
		runtime.LockOSThread()

		orig, err := unix.Open(threadNetNS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			r.err = fmt.Errorf("netns: open current namespace %s: %w", threadNetNS, err)
			return
		}
		defer unix.Close(orig)

		target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			r.err = fmt.Errorf("netns: enter %s: %w", path, err)
			return
		}
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			unix.Close(target)
			runtime.UnlockOSThread()
			r.err = fmt.Errorf("netns: enter %s: setns: %w (is it a network namespace? joining one needs CAP_SYS_ADMIN)", path, err)
			return
		}
		unix.Close(target)

		func() {
			defer func() {
				if v := recover(); v != nil {
					r.panicked, r.panicVal = true, v
				}
			}()
			r.err = fn()
		}()

		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: the runtime discards it on exit.
			restoreErr := fmt.Errorf("netns: leave %s: restore the thread's namespace: %w", path, err)
			if r.err != nil {
				r.err = fmt.Errorf("%w (and %v)", r.err, restoreErr)
			} else {
				r.err = restoreErr
			}
			return
		}
		runtime.UnlockOSThread()
	}()
	r := <-done
	if r.panicked {
		panic(r.panicVal)
	}
	return r.err
}

package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"time"
)

// cleanupTimeout bounds each cleanup function, so that one that hangs
// cannot keep the demo from removing the testbed.
const cleanupTimeout = 2 * time.Minute

// runner is the demo's [pool.TB]: what a test's testing.T does for the
// pool harness, for a program.
//
//   - Logf prints only with -v.
//   - Cleanup registers functions that run, last registered first, when
//     the demo exits, however it exits (see exit). A function registered
//     once the exit has begun runs at once.
//   - Fatalf prints the error and exits with status 1 after the cleanups.
//   - TempDir makes a directory under $TMPDIR, which the demo points to a
//     directory of its own that one cleanup removes.
//
// Like testing.T.Fatalf, Fatalf does not return to its caller.
type runner struct {
	verbose bool
	stdout  io.Writer
	stderr  io.Writer
	outMu   sync.Mutex // serializes writes to stdout and stderr

	mu       sync.Mutex
	cleanups []func()
	exiting  bool
	exitCode int // exit's code, once exiting
	status   int // raised by cleanups that fail (see failed)

	// onExit, if set, is called once the exit has begun, before the
	// cleanups: the demo cancels its context there, so that work in
	// progress (testbed.Up) stops.
	onExit func()
	// exitFn ends the process; tests replace it.
	exitFn func(code int)
}

func newRunner(verbose bool, stdout, stderr io.Writer) *runner {
	return &runner{verbose: verbose, stdout: stdout, stderr: stderr, exitFn: os.Exit}
}

// Helper does nothing: the demo's messages carry no file positions.
func (r *runner) Helper() {}

// Logf prints a line of the pool's log with -v.
func (r *runner) Logf(format string, args ...any) {
	if r.verbose {
		r.printf("  | "+format+"\n", args...)
	}
}

// printf writes to stdout.
func (r *runner) printf(format string, args ...any) {
	r.outMu.Lock()
	defer r.outMu.Unlock()
	fmt.Fprintf(r.stdout, format, args...)
}

// errorf writes a line to stderr.
func (r *runner) errorf(format string, args ...any) {
	r.outMu.Lock()
	defer r.outMu.Unlock()
	fmt.Fprintf(r.stderr, "mtcp-demo: "+format+"\n", args...)
}

// Cleanup registers f to run when the demo exits.
func (r *runner) Cleanup(f func()) {
	r.mu.Lock()
	if r.exiting {
		r.mu.Unlock()
		// Made while the demo is going down (a process the pool
		// started as the interrupt came): undo it now.
		runCleanup(r, f)
		return
	}
	r.cleanups = append(r.cleanups, f)
	r.mu.Unlock()
}

// TempDir returns a new directory, removed at exit with the demo's
// temporary directory.
func (r *runner) TempDir() string {
	d, err := os.MkdirTemp("", "pool-")
	if err != nil {
		r.Fatalf("temporary directory: %v", err)
	}
	return d
}

// Fatalf reports the error and exits with status 1 once the cleanups are
// done. It does not return.
func (r *runner) Fatalf(format string, args ...any) {
	r.exit(1, fmt.Sprintf(format, args...))
}

// Errorf reports what the pool's cleanups find wrong (a process that
// crashed or would not stop): the demo fails. While the demo exits on a
// signal, such reports are its consequences (the terminal's interrupt
// reaches the pool's processes too), printed with -v only.
func (r *runner) Errorf(format string, args ...any) {
	r.mu.Lock()
	signalled := r.exiting && r.exitCode >= 128
	r.mu.Unlock()
	if signalled {
		if r.verbose {
			r.errorf("while exiting: "+format, args...)
		}
		return
	}
	r.failed(format, args...)
}

// failed records that the demo failed even if it otherwise exits with 0 (a
// cleanup that finds something left behind).
func (r *runner) failed(format string, args ...any) {
	r.errorf(format, args...)
	r.mu.Lock()
	r.status = 1
	r.mu.Unlock()
}

// exit prints msg (if any) as an error, runs the cleanups (last registered
// first, each on a goroutine of its own) and ends the process with code,
// or 1 if code is 0 and a cleanup failed.
//
// Only the first call exits. A later one — the main goroutine running
// into a Fatalf because an interrupt is tearing the pool down under it, or
// a cleanup calling Fatalf — ends its own goroutine, as testing.T.FailNow
// does, while the first call finishes; its message is printed with -v
// only.
func (r *runner) exit(code int, msg string) {
	r.mu.Lock()
	if r.exiting {
		r.mu.Unlock()
		// Most likely a consequence of the exit (a process the pool
		// waits for was stopped): noise, unless asked for.
		if msg != "" && r.verbose {
			r.errorf("while exiting: %s", msg)
		}
		runtime.Goexit()
	}
	r.exiting, r.exitCode = true, code
	fs := r.cleanups
	r.cleanups = nil
	r.mu.Unlock()
	if msg != "" {
		r.errorf("%s", msg)
	}
	if r.onExit != nil {
		r.onExit()
	}
	for i := len(fs) - 1; i >= 0; i-- {
		runCleanup(r, fs[i])
	}
	r.mu.Lock()
	if code == 0 {
		code = r.status
	}
	r.mu.Unlock()
	r.exitFn(code)
}

// runCleanup runs f on a goroutine of its own, so that a Fatalf (which
// ends its goroutine) or a panic inside it does not stop the other
// cleanups, and waits for it at most cleanupTimeout.
func runCleanup(r *runner, f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer func() {
			if p := recover(); p != nil {
				r.failed("cleanup panicked: %v", p)
			}
		}()
		f()
	}()
	select {
	case <-done:
	case <-time.After(cleanupTimeout):
		r.failed("a cleanup did not finish within %v; going on", cleanupTimeout)
	}
}

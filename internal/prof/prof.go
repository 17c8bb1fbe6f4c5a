package prof

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"syscall"
)

// Env is the environment variable naming the directory for CPU profiles.
const Env = "MTCP_CPUPROFILE"

// Start starts a CPU profile in $MTCP_CPUPROFILE/NAME-PID-0.pprof when the
// variable is set, and returns the function that stops it and closes the
// file; call it before the process exits. Each SIGUSR2 ends the current
// profile and starts the next (NAME-PID-1.pprof, ...), so that a
// benchmark can profile just the window it measures. Without the variable
// it does nothing. A profile that cannot start is reported on stderr and
// the process goes on without one.
func Start(name string) (stop func()) {
	dir := os.Getenv(Env)
	if dir == "" {
		return func() {}
	}
	var (
		mu  sync.Mutex
		f   *os.File
		seq int
	)
	next := func() {
		if f != nil {
			pprof.StopCPUProfile()
			f.Close()
			f = nil
		}
		nf, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d-%d.pprof", name, os.Getpid(), seq)))
		seq++
		if err == nil {
			err = pprof.StartCPUProfile(nf)
			if err != nil {
				nf.Close()
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: no CPU profile: %v\n", name, err)
			return
		}
		f = nf
	}
	mu.Lock()
	next()
	mu.Unlock()
	sig := make(chan os.Signal, 1)
	done := make(chan struct{})
	signal.Notify(sig, syscall.SIGUSR2)
	go func() {
		for {
			select {
			case <-sig:
				mu.Lock()
				next()
				mu.Unlock()
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(sig)
		close(done)
		mu.Lock()
		defer mu.Unlock()
		if f != nil {
			pprof.StopCPUProfile()
			f.Close()
			f = nil
		}
	}
}

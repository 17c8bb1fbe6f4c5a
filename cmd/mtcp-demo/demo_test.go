package main

import (
	"bytes"
	"io"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/tests/pool"
)

var _ pool.TB = (*runner)(nil)

func TestFlags(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"--help"}, io.Discard, &stderr); code != 0 {
		t.Errorf("--help: exit %d, want 0", code)
	}
	for _, flag := range []string{"--migrations", "--interval", "--v6", "-v"} {
		if !strings.Contains(stderr.String(), strings.TrimLeft(flag, "-")) {
			t.Errorf("--help does not mention %s:\n%s", flag, stderr.String())
		}
	}
	for _, args := range [][]string{{"extra"}, {"--bogus"}, {"--migrations", "-1"}, {"--interval", "-1s"}, {"--interval", "soon"}} {
		if code := run(args, io.Discard, io.Discard); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
}

// exitRecorder makes r's exit record its code and end the goroutine,
// instead of ending the process.
func exitRecorder(r *runner) <-chan int {
	codes := make(chan int, 1)
	r.exitFn = func(code int) {
		codes <- code
		runtime.Goexit()
	}
	return codes
}

func waitCode(t *testing.T, codes <-chan int) int {
	t.Helper()
	select {
	case c := <-codes:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("the runner did not exit")
		return 0
	}
}

// TestRunnerFatalf checks that Fatalf, from any goroutine, prints the
// error, runs every cleanup (last registered first, one that panics or
// calls Fatalf itself included) and exits with 1, and that Fatalf does not
// return to its caller.
func TestRunnerFatalf(t *testing.T) {
	var out, errs bytes.Buffer
	r := newRunner(false, &out, &errs)
	codes := exitRecorder(r)
	var mu sync.Mutex
	var order []int
	note := func(i int) { mu.Lock(); order = append(order, i); mu.Unlock() }
	r.Cleanup(func() { note(1) })
	r.Cleanup(func() { note(2); panic("boom") })
	r.Cleanup(func() { note(3); r.Fatalf("cleanup failed") })
	r.Cleanup(func() { note(4) })
	returned := make(chan bool, 1)
	go func() {
		defer func() { returned <- false }()
		r.Fatalf("pool broke: %d", 42)
		returned <- true
	}()
	if code := waitCode(t, codes); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	if <-returned {
		t.Error("Fatalf returned to its caller")
	}
	if want := []int{4, 3, 2, 1}; !slices.Equal(order, want) {
		t.Errorf("cleanups ran in order %v, want %v", order, want)
	}
	if !strings.Contains(errs.String(), "mtcp-demo: pool broke: 42") || !strings.Contains(errs.String(), "boom") {
		t.Errorf("stderr = %q, want the error and the panicking cleanup", errs.String())
	}

	// Registered once the exit has begun: runs at once.
	ran := false
	r.Cleanup(func() { ran = true })
	if !ran {
		t.Error("a cleanup registered during the exit did not run")
	}
}

// TestRunnerExitStatus checks that a clean exit keeps its code unless a
// cleanup reports a failure, and that Logf prints only when verbose.
func TestRunnerExitStatus(t *testing.T) {
	for _, fail := range []bool{false, true} {
		var out bytes.Buffer
		r := newRunner(false, &out, io.Discard)
		codes := exitRecorder(r)
		r.Logf("quiet %d", 1)
		r.Cleanup(func() {
			if fail {
				r.failed("something was left behind")
			}
		})
		go r.exit(0, "")
		want := 0
		if fail {
			want = 1
		}
		if code := waitCode(t, codes); code != want {
			t.Errorf("failing cleanup %v: exit code %d, want %d", fail, code, want)
		}
		if out.Len() != 0 {
			t.Errorf("Logf printed without -v: %q", out.String())
		}
	}
	var out bytes.Buffer
	newRunner(true, &out, io.Discard).Logf("loud %d", 2)
	if !strings.Contains(out.String(), "loud 2") {
		t.Errorf("Logf with -v printed %q", out.String())
	}
}

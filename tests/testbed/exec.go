package testbed

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// lockedBuffer collects stdout and stderr in the order they arrive; exec
// copies them from two goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// run runs a command and returns its standard output. The error names the
// command and carries its combined output.
func run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	return runAs(ctx, stdin, cmdline(name, args), name, args...)
}

// runAs is run with the command shown in errors as shown.
func runAs(ctx context.Context, stdin []byte, shown, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout bytes.Buffer
	var combined lockedBuffer
	cmd.Stdout = io.MultiWriter(&stdout, &combined)
	cmd.Stderr = &combined
	// Never wait forever for pipes held open by a grandchild.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(combined.b.String())
		if msg == "" {
			return stdout.Bytes(), fmt.Errorf("%s: %w", shown, err)
		}
		return stdout.Bytes(), fmt.Errorf("%s: %w: %s", shown, err, msg)
	}
	return stdout.Bytes(), nil
}

func cmdline(name string, args []string) string {
	if len(args) > 8 {
		args = append(args[:8:8], "...")
	}
	return strings.Join(append([]string{name}, args...), " ")
}

// poll calls check until it reports done, ctx ends or timeout passes; the
// interval grows from 2 ms to 100 ms. check returns why it is not done yet,
// which the timeout error reports.
func poll(ctx context.Context, timeout time.Duration, what string, check func(context.Context) (done bool, notYet string, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	interval := 2 * time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	notYet := ""
	for {
		select {
		case <-ctx.Done():
			if notYet == "" {
				notYet = ctx.Err().Error()
			}
			return fmt.Errorf("waiting for %s: gave up after %v: %s", what, timeout, notYet)
		case <-t.C:
		}
		done, n, err := check(ctx)
		if err != nil {
			if ctx.Err() != nil && notYet != "" {
				return fmt.Errorf("waiting for %s: gave up after %v: %s", what, timeout, notYet)
			}
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		if done {
			return nil
		}
		notYet = n
		t.Reset(interval)
		interval = min(2*interval, 100*time.Millisecond)
	}
}

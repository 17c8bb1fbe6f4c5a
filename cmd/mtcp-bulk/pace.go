package main

import (
	"context"
	"time"
)

// fineWait is the longest wait pace sleeps through with nanosleep(2).
// Go's timers wake a sleeper on Linux no sooner than a millisecond after
// it asked (the runtime polls with millisecond timeouts), which would
// turn a stream paced in 4 KiB writes into a burst every millisecond.
const fineWait = 2 * time.Millisecond

// pace waits until due or until ctx ends, whichever comes first, and
// returns ctx's cause if it ended. Short waits block the goroutine's
// thread in nanosleep(2), which keeps the kernel's high-resolution
// timing (on Linux; see sleepFine); longer ones use a Go timer and stay
// cancellable.
func pace(ctx context.Context, due time.Time) error {
	wait := time.Until(due)
	if wait <= 0 {
		return nil
	}
	if wait <= fineWait {
		sleepFine(wait)
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

package main

import (
	"time"

	"golang.org/x/sys/unix"
)

// sleepFine blocks the calling thread in nanosleep(2) for d, which the
// kernel times to the microsecond, unlike Go's timers on Linux.
func sleepFine(d time.Duration) {
	ts := unix.NsecToTimespec(int64(d))
	for unix.Nanosleep(&ts, &ts) == unix.EINTR {
	}
}

//go:build !linux

package main

import "time"

// sleepFine sleeps for d. Elsewhere than Linux mtcp-bulk only serves
// (mtcpd, which migrates its connections, is Linux only), and Go's own
// sleep is fine enough.
func sleepFine(d time.Duration) { time.Sleep(d) }

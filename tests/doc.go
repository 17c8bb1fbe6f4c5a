// Package tests holds mtcp's end-to-end tests. They run on the
// network-namespace testbed of package tests/testbed: a client, a gateway
// and three servers (s1, s2, s3) on a server LAN, plus a control network
// between the servers, all inside namespaces the tests create and delete.
//
// The tests need root (they create namespaces and nftables tables, and use
// TCP_REPAIR) and skip with a reason otherwise. Every test asserts what the
// client sees: every byte exactly once and in order in both directions, no
// RST sent or received (nftables counters in the client's namespace), no
// error, and nothing left behind when it ends.
//
// The harness fails a test, whatever the test itself checks, when a
// process it started (mtcpd, an application) exits before the test ends
// without the test having stopped it or injected its crash, prints a Go
// panic, fatal error or data race, or does not stop within 5 s of SIGTERM
// (tests/pool), and when a process is still running in the testbed's
// namespaces once the test's own cleanups have run (tests/testbed).
//
// Run them with `go test ./tests/...` as root.
package tests

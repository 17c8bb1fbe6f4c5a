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
// Run them with `go test ./tests/...` as root.
package tests

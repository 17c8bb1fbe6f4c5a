// Command mtcp-demo shows mtcp at work on one machine: it builds a
// testbed of network namespaces (a client, a gateway and three servers
// s1, s2, s3; see package tests/testbed), starts mtcpd and the mtcp-bulk
// streaming server on every server (package tests/pool), connects a
// client that streams from s1's address and verifies every byte, and
// moves that one connection around the pool, s1 -> s2 -> s3 -> s1 ...,
// while printing what the client sees: the bytes verified, errors (there
// must be none) and, for each migration, the pause (the largest gap
// between two consecutive reads at the client around it). It ends with a
// summary that includes the TCP resets the client sent or received,
// counted by nftables in the client's namespace (there must be none).
//
// Usage:
//
//	sudo mtcp-demo [--migrations N] [--interval D] [--v6] [-v]
//
// It needs root, Linux with network namespaces and nftables, ip(8), nft(8),
// sysctl(8), nsenter(1) and ethtool(8) (tests/setup.sh installs them),
// and Go with the mtcp source tree it was built from: it builds mtcpd and
// mtcp-bulk from that tree with `go build` when it starts (Go in PATH or
// in /usr/local/go/bin).
//
// The testbed's namespaces are named mtcpdemo-HOST. Everything the demo
// makes (namespaces, processes, temporary files) is removed when it ends,
// also on Ctrl-C or SIGTERM; a bed left by a demo killed with SIGKILL is
// removed by the next run. Only one demo runs at a time.
//
// Exit status: 0 if every byte was verified and the client saw no error
// and no reset; 1 otherwise, or if the demo could not run; 2 for bad
// usage; 130 (143) when interrupted by SIGINT (SIGTERM).
package main

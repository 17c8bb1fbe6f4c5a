// Package cli implements the mtcpctl command line: a cobra command tree
// whose root is built by newRootCmd in root.go, one file per group of
// subcommands, each with a newXxxCmd constructor. main calls [Run].
//
// mtcpctl reaches the mtcpd daemon only through a client package, never by
// importing mtcp's kernel-facing packages (repair/, criu/, nat/) itself.
// The testbed commands use tests/testbed, which only runs ip, nft and
// sysctl.
//
// Exit status: 0 on success, 1 when the command failed, 2 on a usage error
// (unknown command or flag, bad flag value, missing subcommand), 3 when a
// migrate or drain moved some connections and not others.
//
// # Privileges
//
// `mtcpctl testbed up` and `down` need root (they create and delete network
// namespaces); `testbed status` only reads /run/netns and works without.
//
// # Tests
//
// The testbed commands are thin wrappers over tests/testbed, whose tests
// cover building, repairing, sweeping and removing beds. This package's
// tests run the command tree against fake admin sockets and files (conns'
// table, drain's outcomes, policy check, certs); the end-to-end tests
// under tests/ run mtcpctl against real daemons.
package cli

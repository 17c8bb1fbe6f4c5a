// Package netns runs Go code inside a Linux network namespace.
//
// mtcp's daemon and tests need sockets that live in another network
// namespace: a daemon serving one host of the namespace testbed, a test
// client on the testbed's client host, a socket restored on the target
// server. [Do] locks the calling work onto one OS thread, moves that thread
// into the namespace with setns(2), runs a function there and moves the
// thread back. A socket is bound to the namespace it was created in for its
// whole life, so a listener or connection created inside the function keeps
// working in that namespace after Do returns.
//
// Only the network namespace is entered (CLONE_NEWNET), never the mount
// namespace. `ip netns exec` also unshares a mount namespace, and CRIU
// refuses to dump a process whose mounts are set up that way ("has
// unreachable sharing"); entering only the network namespace is what
// `nsenter --net` does and what mtcp needs.
//
// Raw syscalls are confined to repair/ and nat/ (see DESIGN.md); this
// package is where the rest of mtcp gets namespace switching from.
//
// # Privileges
//
// Joining a network namespace needs CAP_SYS_ADMIN (in practice: root).
// Without it Do returns an error wrapping EPERM. On systems other than Linux,
// Do returns an error wrapping [errors.ErrUnsupported].
//
// # Tests
//
// The tests need root and skip with a reason otherwise. They create a
// throwaway namespace with `ip netns add`, check the thread's namespace
// inode inside and after Do (including every thread of the process after
// many calls), listen on a TCP socket inside and find it with
// `ip netns exec NAME ss -ltn`, and remove the namespace with t.Cleanup.
package netns

// Package repair freezes, captures and restores established TCP sockets
// with the kernel's TCP_REPAIR facility, and finds the sockets a network
// namespace holds.
//
// A migration moves one socket in four steps. [Freeze] puts a live socket
// into repair mode: from then on its application can neither read nor
// write it, and closing it sends neither FIN nor RST. The kernel still
// acknowledges what reaches it, and its timers and arriving
// acknowledgements may still send what was queued: [Frozen.Quiet] marks
// it so that a firewall drops all that (mtcpd's table does), and a hold
// keeps the peer's segments from reaching it.
// [Frozen.Capture] reads everything the peer could notice — sequence
// numbers, the bytes queued in both directions, the options negotiated in
// the handshake, the window, the options the application set — into a
// [State], a plain value with a versioned binary encoding
// ([State.MarshalBinary], [Decode]). [Restore] builds a new socket from a
// State, possibly on another host and with other addresses, still in repair
// mode; [Restored.Commit] brings it to life. On the abort path
// [Frozen.Thaw] lets the original socket carry on as if nothing happened.
//
// Half-closed connections (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING) are
// captured with their FINs accounted for and rebuilt at commit: an outbound
// FIN by shutdown(2), an inbound one by a FIN segment injected through a raw
// socket ([Injector]), in the order the state machine needs. An outbound
// FIN that went out (FIN_WAIT1 with its data all sent, FIN_WAIT2) is not
// sent again: at [Restore] already, the socket shuts down still in repair
// mode, which counts the FIN as sent (it goes out again only if the peer
// turns out not to have it), and in FIN_WAIT2 an injected acknowledgement
// of it moves the socket on; a peer's segments that acknowledge that FIN
// are then taken in from the switch on, before the commit.
//
// A restored socket in repair mode acknowledges what reaches it.
// [RestoreOptions.Quiet] marks a restored socket so that a
// firewall can drop those acknowledgements until the socket's address
// rewrite is in; if it took anything in meanwhile, [Restored.Commit] makes
// it acknowledge again, with a stale segment injected from the peer, which
// the kernel answers with an acknowledgement of what it holds.
//
// MPTCP sockets (the default for Go ≥ 1.24 listeners), sockets with an
// upper-layer protocol such as kTLS, listening sockets and anything that is
// not TCP are refused with errors that say why ([ErrMPTCP], [ErrULP],
// [ErrListening], [ErrNotTCP]).
//
// [List] enumerates the namespace's TCP connections through sock_diag, and
// [TakeFD] copies another process's socket descriptor with pidfd_getfd.
//
// Process mode moves memory post-copy with userfaultfd(2): [UFFD] wraps
// the descriptor CRIU's restore hands over, reads its page-fault and
// memory-map events and fills pages in (UFFDIO_COPY). It lives here
// because this package keeps the raw system calls.
//
// Privileges: TCP_REPAIR needs CAP_NET_ADMIN in the socket's network
// namespace, the injected segments a raw socket (CAP_NET_RAW), TakeFD ptrace
// rights over the target. All TCP_REPAIR socket options are issued from one
// file (sockopt_linux.go); the rest of the package speaks in State values.
//
// Tests run as root against real sockets: loopback pairs for unit cases,
// and the tests/ package moves sockets between network namespaces. The
// decoder has a native fuzz target (FuzzDecode).
package repair

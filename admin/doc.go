// Package admin is the local administration API between mtcpctl and mtcpd:
// its wire types, the root-only unix socket it runs on, and the client
// mtcpctl uses. It imports nothing that touches sockets' TCP state or
// nftables, so mtcpctl reaches the daemon only through it.
//
// The API is HTTP/1.1 with JSON bodies on a unix socket. The socket file is
// created mode 0600 in a directory of mode 0700, both owned by the daemon's
// user (root), so only root can connect; and the server ([NewServer])
// serves a connection only if the kernel says its process runs as root
// (SO_PEERCRED), whatever the file's mode. Tests without privileges run a
// handler and the client on a temporary socket.
package admin

// Package admin is the local administration API between mtcpctl and mtcpd:
// its wire types, the root-only unix socket it runs on, and the client
// mtcpctl uses. It imports nothing that touches sockets' TCP state or
// nftables, so mtcpctl reaches the daemon only through it.
//
// The API is HTTP/1.1 with JSON bodies on a unix socket. The socket file is
// created mode 0600 in a directory of mode 0700, both owned by the daemon's
// user (root), so only root can connect. Tests run the server and client on
// a temporary socket without privileges.
package admin

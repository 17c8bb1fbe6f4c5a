// Package app is Migratory TCP's export/import API: the library through
// which an application opts in to connection-mode migration, and its
// daemon-side counterpart, the Registry that mtcpd runs.
//
// # Application side
//
// An application serves a service with [Serve] and a [Handler]. Serve
// listens, registers the service with mtcpd over its application socket
// ([DefaultDaemonSocket]), and serves every connection, accepted here or
// migrated in from another server, with the handler. When mtcpd moves a
// connection away, the handler's context is cancelled (its cause is
// [ErrMigrating]) and the connection's Reads and Writes fail with
// ErrMigrating; the handler returns its per-connection state as a
// snapshot. The library passes the socket and the snapshot to mtcpd and
// waits for the verdict: "gone" (another server owns the connection now;
// the library closes its descriptor, which sends nothing because mtcpd
// froze the socket in repair mode) or "resume" (the migration aborted;
// the handler is called again on the same connection with its snapshot).
// On the other server the handler is called with the migrated socket and
// the snapshot, and the client notices nothing.
//
// # Daemon side
//
// A [Registry] accepts the applications' connections on the application
// socket, checking with SO_PEERCRED that each is root or the socket's
// owner. mtcpd asks it for a connection with [Registry.Export] (one) or
// [Registry.ExportAll] (a drain), gets the socket and snapshot, freezes
// and moves the socket, and settles the export with [Exported.Finish].
// On the receiving server it hands the restored socket and the snapshot
// to the application with [Registry.Import]. [Registry.Conns] lists the
// connections the applications report.
//
// # Protocol
//
// The application socket is a unix stream socket carrying length-prefixed
// JSON messages (4-byte big-endian length, at most 2 MiB); descriptors
// travel as SCM_RIGHTS with the message that announces them. Requests
// carry an id that their answer repeats:
//
//	app → daemon  register{version, service, pid}      → registered | error
//	daemon → app  export{id, service, tuple}           → exported{id, snapshot} + fd | exported{id, error}
//	daemon → app  verdict{id, gone|resume}             → finished{id}
//	daemon → app  import{id, service, snapshot} + fd   → imported{id} | imported{id, error}
//	app → daemon  opened{service, tuple}, closed{service, tuple}
//
// Malformed input closes the connection that carried it, never the
// process. Snapshots are limited to [MaxSnapshot] bytes.
//
// # Privileges and tests
//
// The library needs no privileges of its own; mtcpd, which freezes and
// restores the sockets with TCP_REPAIR, runs as root, and so must the
// applications that talk to it (or run as the owner of the socket). The
// package's tests run unprivileged on loopback: two Serve instances, each
// with its own in-process Registry, pass a live socket from one to the
// other (a "local migration", no TCP_REPAIR involved), which exercises
// every step of the library but the freeze. Package
// [github.com/mtcp-dev/mtcp/app/apptest] packages that set-up for the
// tests of applications.
package app

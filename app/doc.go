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
// owner. mtcpd asks it for connections with [Registry.ExportMany] (or
// [Registry.Export] for one, [Registry.ExportAll] for a drain), gets the
// sockets and snapshots, freezes and moves the sockets, and settles the
// exports with [FinishMany] (or [Exported.Finish]). On the receiving
// server it hands the restored sockets and the snapshots to the
// application with [Registry.ImportMany] (or [Registry.Import]). The
// batched forms move any number of connections in a handful of messages
// and report per connection. [Registry.Conns] lists the connections the
// applications report.
//
// # Protocol
//
// The application socket is a unix stream socket carrying length-prefixed
// JSON messages (4-byte big-endian length, at most 2 MiB); descriptors
// travel as SCM_RIGHTS with the message that announces them. Requests
// carry an id that their answer repeats. Version 1 has one request per
// connection:
//
//	app → daemon  register{version, max_version, service, pid} → registered{version} | error
//	daemon → app  export{id, service, tuple}           → exported{id, snapshot} + fd | exported{id, error}
//	daemon → app  verdict{id, gone|resume}             → finished{id}
//	daemon → app  import{id, service, snapshot} + fd   → imported{id} | imported{id, error}
//	app → daemon  opened{service, tuple}, closed{service, tuple}
//
// Version 2 adds batches of up to 250 connections per message (SCM_RIGHTS
// passes at most 253 descriptors per sendmsg), each item with its own id
// and result: export-many, verdict-many, import-many and their answers,
// and opened/closed with a list of tuples. An application answers a
// batched export in one or more messages, sending the connections that
// are ready without waiting for a slow handler. The versions are
// negotiated at registration, so that applications built against version
// 1 keep working (one request per connection) and new applications work
// with a version-1 daemon. Version 3 has the messages of version 2, but
// once the registration is answered every frame is binary instead of
// JSON (binwire.go), which a drain of thousands of connections notices.
// Version 4 adds to an import the connection's TCP_NODELAY and keepalive
// settings where they are not Go's, which the application sets again on
// the connection it adopts (net.FileConn imposes Go's).
// wire.go has the details.
//
// Malformed input closes the connection that carried it, and every
// descriptor received on it, never the process. Snapshots are limited to
// [MaxSnapshot] bytes.
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

// Package apptest runs migratory applications against in-process
// daemons, for tests: each [Server] is an [app.Serve] on 127.0.0.1 with its
// own [app.Registry], like one server of a pool with its own mtcpd.
// [Migrate] moves a live connection from one Server to another by passing
// the very socket between them (a "local migration": no TCP_REPAIR, no
// root), which exercises the whole export/import path of an application.
package apptest

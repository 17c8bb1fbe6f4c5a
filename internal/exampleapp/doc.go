// Package exampleapp is the command line the example servers built on
// package app (mtcp-kv, mtcp-bulk) share: the common flags, logging,
// signals and exit status, so that each command only says what is its
// own.
package exampleapp

// Command mtcpd is mtcp's daemon: one runs on every server of the pool
// (and on the gateway, with gateway steering). See package daemon.
package main

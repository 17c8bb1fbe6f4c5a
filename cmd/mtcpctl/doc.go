// Command mtcpctl controls mtcp, Migratory TCP for Linux. See package
// github.com/mtcp-dev/mtcp/cmd/mtcpctl/cli, or run `mtcpctl --help`.
package main

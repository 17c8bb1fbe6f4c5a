// Package pool runs a whole mtcp pool on a testbed: certificates from a
// throwaway CA, mtcpd on every server (and on the gateway with gateway
// steering), and an application on every server. The end-to-end tests and
// the demo (cmd/mtcp-demo) share it. It needs root, like the testbed.
package pool

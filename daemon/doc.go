// Package daemon is mtcpd: the daemon each server of the pool (and the
// gateway, in gateway steering) runs. It ties the pieces together:
//
//   - package app's Registry, where applications register their services
//     and through which they give away and adopt connections;
//   - package repair, which freezes, captures and restores the sockets;
//   - package nat, which holds, steers and rewrites flows with nftables;
//   - package peer, the mutual-TLS control channel to the other daemons;
//   - package migrate, the transaction that moves a batch of flows;
//   - package admin, the root-only API mtcpctl uses.
//
// Every flow has a steering point: with forward steering, the host that
// owns the address the client dialled (it forwards the flow to wherever
// the connection lives now); with gateway steering, the gateway. Holding
// and switching a flow happen there, whichever server the connection
// currently lives on.
//
// The daemon runs in the network namespace of the server it manages and
// needs CAP_NET_ADMIN and CAP_NET_RAW there (root). Its end-to-end tests
// live in tests/.
package daemon

package peer

import (
	"net/netip"
	"time"
)

// FlowID names one TCP connection by its two ends as the client sees them:
// the client's address and the service address it connected to. It stays
// the same wherever the server end of the connection lives.
type FlowID struct {
	Client  netip.AddrPort // the client's address and port
	Service netip.AddrPort // the address and port the client connected to
}

// Item is one connection in a [TransferRequest].
type Item struct {
	// Flow is the connection.
	Flow FlowID
	// Service names the application on the target that receives the
	// connection, e.g. ":7000".
	Service string
	// State is the captured TCP state of the socket (the repair
	// package's encoding), opaque here. It travels as raw bytes, up to
	// tens of MiB (the socket's queues).
	State []byte
	// App is the application's own snapshot of the connection, opaque
	// here; nil when the application keeps none.
	App []byte
}

// ItemResult is the target's answer for one item of a Transfer or one
// connection of a Commit.
type ItemResult struct {
	OK    bool   // the item was restored (Transfer) or released (Commit)
	Error string // why not, when !OK
}

// PrepareRequest asks a target whether it can take Count connections of
// Service, carrying Bytes of state in total. It is phase 1 (prepare) of a
// migration transaction.
type PrepareRequest struct {
	TxID    uint64 // the transaction, chosen by the source
	Service string // the receiving application, e.g. ":7000"
	Count   int    // how many connections
	Bytes   int64  // their state in bytes (0 if unknown)
}

// PrepareReply is a target's answer to a [PrepareRequest].
type PrepareReply struct {
	OK     bool   // the target is ready to receive the connections
	Reason string // why not, when !OK
}

// TransferRequest carries captured connections to the target, which
// restores them in repair mode and installs their rewrite rules before
// answering (phases transfer and restore). One request carries many
// items: migrating N connections costs one round trip, not N.
type TransferRequest struct {
	TxID  uint64 // the transaction, as in its PrepareRequest
	Items []Item // the connections
}

// TransferReply has one result per item of the [TransferRequest], in the
// same order.
type TransferReply struct {
	Results []ItemResult // one per item
}

// CommitRequest tells the target that the source has switched the
// transaction's flows to it: the target takes its sockets out of repair
// mode and owns the flows from now on.
type CommitRequest struct {
	TxID uint64 // the transaction
}

// CommitReply has one result per connection the target committed.
type CommitReply struct {
	Results []ItemResult // one per connection of the transaction
}

// AbortRequest tells the target to discard, silently, what it restored for
// the transaction: the connections go on at the source.
type AbortRequest struct {
	TxID   uint64 // the transaction
	Reason string // for the target's log
}

// StatusRequest is the (empty) body of a status request, sent by
// [Client.Status] for heartbeats and `mtcpctl status`.
type StatusRequest struct{}

// StatusReply describes a pool member.
type StatusReply struct {
	Name     string    // the member's name
	Load     float64   // its load (e.g. the one-minute load average)
	Conns    int       // connections it serves
	Services []string  // applications that can receive connections, e.g. ":7000"
	Time     time.Time // its clock, when it answered
	// Figures are its measured load and path costs by name, for the
	// policy engine: "cpu", "run_queue", "memory", "memory_pressure"
	// (see package policy's Load) and "rtt:<client network>" (the median
	// RTT, in seconds, of its connections from that network). Nil from
	// members that report none.
	Figures map[string]float64
}

// Steering operations of a [SteerRequest].
const (
	SteerHold   = "hold"   // queue the flows' client packets
	SteerSwitch = "switch" // send the flows to SteerRequest.To and re-deliver queued packets
	SteerUnhold = "unhold" // let the flows' packets go where they went before, re-delivering queued ones
	// SteerRefresh restarts the idle timeout of the flows' rules: their
	// connections live on, silent, at the member that asks.
	SteerRefresh = "refresh"
)

// SteerRequest asks the member that steers some flows (the owner of their
// service address, or the gateway) to hold or switch them: the hold and
// switch phases of a migration when the source is not the steering point.
// A [Handler] that serves it implements [Steerer].
type SteerRequest struct {
	Op    string     // SteerHold, SteerSwitch, SteerUnhold or SteerRefresh
	Flows []FlowID   // the flows, changed in one batch
	To    netip.Addr // the new server, for SteerSwitch
}

package nat

import (
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"regexp"
	"time"
)

// Defaults for the zero values of [Options].
const (
	// DefaultTable is the table name used when Options.Table is "".
	DefaultTable = "mtcp"
	// DefaultQueue is the NFQUEUE number used when Options.Queue is 0.
	DefaultQueue uint16 = 7
	// DefaultIdle is the element idle timeout used when Options.Idle is 0.
	DefaultIdle = 10 * time.Minute
	// DefaultHoldIdle is the timeout of holds used when Options.HoldIdle
	// is 0.
	DefaultHoldIdle = 10 * time.Minute
	// DefaultQueueMaxLen is the kernel queue length used when
	// Options.QueueMaxLen is 0.
	DefaultQueueMaxLen uint32 = 4096
)

// The default mark bits of Options.InjectMark and Options.QuietMark: bits
// 28 and 29, clear of the bits kube-proxy (0x4000, 0x8000), Cilium's magic
// values (0x0f00) and the small marks of policy routing use. (Cilium
// carries a security identity in the upper 16 bits of some of its marks,
// which may have them set: on such a host, choose others.) They must equal
// repair.DefaultMarks; nat does not import repair, so they are kept equal
// by hand.
const (
	DefaultInjectMark uint32 = 1 << 28
	DefaultQuietMark  uint32 = 1 << 29
)

// Flow is one TCP connection as its client sees it: the client's address and
// the service address it dialled (the original server's).
//
// Both addresses must be of the same family, have no IPv6 zone, and both
// ports must be non-zero. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, as a
// dual-stack socket reports them) are taken as the IPv4 address.
type Flow struct {
	Client, Service netip.AddrPort
}

// String formats f as "client->service".
func (f Flow) String() string { return f.Client.String() + "->" + f.Service.String() }

// Is6 reports whether f is an IPv6 flow.
func (f Flow) Is6() bool { return f.Client.Addr().Unmap().Is6() }

// Check reports what makes f unfit for the table (an error wrapping
// ErrInvalid), or nil: the checks every Batch method makes.
func (f Flow) Check() error {
	_, err := f.normalize()
	return err
}

// normalize unmaps IPv4-mapped addresses and checks f.
func (f Flow) normalize() (Flow, error) {
	c := netip.AddrPortFrom(f.Client.Addr().Unmap(), f.Client.Port())
	s := netip.AddrPortFrom(f.Service.Addr().Unmap(), f.Service.Port())
	n := Flow{Client: c, Service: s}
	switch {
	case !c.Addr().IsValid() || !s.Addr().IsValid():
		return n, fmt.Errorf("flow %s: %w: both the client and the service address must be set", f, ErrInvalid)
	case c.Addr().Is4() != s.Addr().Is4():
		return n, fmt.Errorf("flow %s: %w: the client and the service address are of different families (IPv4 and IPv6); a flow is one family end to end", f, ErrInvalid)
	case c.Addr().Zone() != "" || s.Addr().Zone() != "":
		return n, fmt.Errorf("flow %s: %w: IPv6 zones are not supported; use global or unique-local addresses", f, ErrInvalid)
	case c.Addr().IsUnspecified() || s.Addr().IsUnspecified():
		return n, fmt.Errorf("flow %s: %w: unspecified address (0.0.0.0 or ::)", f, ErrInvalid)
	case c.Port() == 0 || s.Port() == 0:
		return n, fmt.Errorf("flow %s: %w: port 0; give the connection's real ports", f, ErrInvalid)
	}
	return n, nil
}

// checkAddr checks an address given with a flow (a forward target, a local
// address) against the flow's family.
func checkAddr(f Flow, what string, a netip.Addr) (netip.Addr, error) {
	a = a.Unmap()
	switch {
	case !a.IsValid() || a.IsUnspecified():
		return a, fmt.Errorf("flow %s: %w: no %s address given", f, ErrInvalid, what)
	case a.Is4() != f.Client.Addr().Is4():
		return a, fmt.Errorf("flow %s: %w: %s address %s is not of the flow's family", f, ErrInvalid, what, a)
	case a.Zone() != "":
		return a, fmt.Errorf("flow %s: %w: %s address %s has an IPv6 zone, which is not supported", f, ErrInvalid, what, a)
	}
	return a, nil
}

// Kind is what an element of the table does to a flow.
type Kind uint8

// Element kinds. The zero Kind is invalid.
const (
	// KindHold queues the client's packets to NFQUEUE (source host).
	KindHold Kind = iota + 1
	// KindForward rewrites the destination of the client's packets
	// (source host or gateway).
	KindForward
	// KindReplyFrom rewrites the source of the target's replies back to
	// the service address, in postrouting (target host).
	KindReplyFrom
	// KindGatewayReply rewrites the source of the target's replies back
	// to the service address, in prerouting (gateway).
	KindGatewayReply
)

// String returns the kind's name as in the Batch method that installs it.
func (k Kind) String() string {
	switch k {
	case KindHold:
		return "Hold"
	case KindForward:
		return "Forward"
	case KindReplyFrom:
		return "ReplyFrom"
	case KindGatewayReply:
		return "GatewayReply"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Entry is one element of the table, as [Table.Flows] reports it.
type Entry struct {
	// Flow is the flow the element belongs to.
	Flow Flow
	// Kind is what the element does.
	Kind Kind
	// Addr is the element's address: for KindForward the new
	// destination, for KindReplyFrom the local (restored socket's)
	// address, for KindGatewayReply the target. Zero for KindHold.
	Addr netip.Addr
	// LocalPort is, for KindReplyFrom, the local port of the restored
	// socket (normally Flow.Service.Port()). Zero for the other kinds.
	LocalPort uint16
	// Expires is how long the element has left before the kernel removes
	// it on its own (see Options.Idle). Zero if the kernel did not say.
	Expires time.Duration
}

// String formats e for logs.
func (e Entry) String() string {
	switch e.Kind {
	case KindHold:
		return fmt.Sprintf("%s %s", e.Kind, e.Flow)
	case KindReplyFrom:
		return fmt.Sprintf("%s %s from %s", e.Kind, e.Flow, netip.AddrPortFrom(e.Addr, e.LocalPort))
	}
	return fmt.Sprintf("%s %s via %s", e.Kind, e.Flow, e.Addr)
}

// Options configures [Open] and [OpenQueue]. The zero value is ready to use.
type Options struct {
	// Table names mtcp's nftables table, of family inet. "" means
	// DefaultTable ("mtcp"). Letters, digits, '_', '-' and '.', at most
	// 64 characters.
	Table string
	// Queue is the NFQUEUE number that held packets go to. 0 means
	// DefaultQueue (7), so queue 0 cannot be chosen. Open (the hold rule)
	// and OpenQueue (the reader) of one host must use the same number.
	Queue uint16
	// Idle is the idle timeout given to every rewrite element: the
	// kernel removes an element that has not matched a packet for this
	// long (see the package documentation), unless [Table.Refresh]
	// restarts it. 0 means DefaultIdle (10 minutes). At least a
	// millisecond; Open rejects negative values.
	Idle time.Duration
	// HoldIdle is the timeout of holds, which traffic does not refresh:
	// a hold left by a crashed daemon ends after it. It must outlast the
	// longest hold a migration needs. 0 means DefaultHoldIdle (10
	// minutes). At least a millisecond.
	HoldIdle time.Duration
	// QueueMaxLen bounds how many packets the kernel keeps queued for
	// OpenQueue's reader; packets beyond it are dropped (never delivered
	// to a frozen socket). 0 means DefaultQueueMaxLen (4096).
	QueueMaxLen uint32
	// InjectMark is the packet mark bit (SO_MARK, "meta mark") that lets
	// a packet past the holds: the segments repair injects into restored
	// sockets carry it, and [Queue] sets it, over the packet's own mark,
	// on the packets it releases. One bit; 0 means DefaultInjectMark. It
	// must be repair's Marks.Inject, and the same for Open and
	// OpenQueue.
	InjectMark uint32
	// QuietMark is the mark bit of sockets that must not be heard yet:
	// the table drops what they send. A target sets it on a restored
	// socket until its commit, for a socket in repair mode acknowledges
	// the segments that reach it, and from the host's own address (its
	// reply rewrite may not be in yet) the client would answer with a
	// RST. One bit, not InjectMark's; 0 means DefaultQuietMark. It must
	// be repair's Marks.Quiet.
	QuietMark uint32
}

var tableNameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`)

// withDefaults fills the zero values of o and checks it.
// Check reports what Open and OpenQueue would refuse in o (an error
// wrapping ErrInvalid), without touching the system.
func (o Options) Check() error {
	_, err := o.withDefaults()
	return err
}

func (o Options) withDefaults() (Options, error) {
	if o.Table == "" {
		o.Table = DefaultTable
	}
	if !tableNameRE.MatchString(o.Table) {
		return o, fmt.Errorf("nat: table name %q: %w: use 1 to 64 letters, digits, '_', '-' or '.'", o.Table, ErrInvalid)
	}
	if o.Queue == 0 {
		o.Queue = DefaultQueue
	}
	switch {
	case o.Idle == 0:
		o.Idle = DefaultIdle
	case o.Idle < time.Millisecond:
		return o, fmt.Errorf("nat: idle timeout %v: %w: use at least 1ms, or 0 for the default (%v)", o.Idle, ErrInvalid, DefaultIdle)
	}
	switch {
	case o.HoldIdle == 0:
		o.HoldIdle = DefaultHoldIdle
	case o.HoldIdle < time.Millisecond:
		return o, fmt.Errorf("nat: hold timeout %v: %w: use at least 1ms, or 0 for the default (%v)", o.HoldIdle, ErrInvalid, DefaultHoldIdle)
	}
	if o.QueueMaxLen == 0 {
		o.QueueMaxLen = DefaultQueueMaxLen
	}
	if o.InjectMark == 0 {
		o.InjectMark = DefaultInjectMark
	}
	if o.QuietMark == 0 {
		o.QuietMark = DefaultQuietMark
	}
	for _, m := range []struct {
		name string
		bit  uint32
	}{{"inject", o.InjectMark}, {"quiet", o.QuietMark}} {
		if bits.OnesCount32(m.bit) != 1 {
			return o, fmt.Errorf("nat: %s mark %#x: %w: give one bit (a power of two, such as %#x)", m.name, m.bit, ErrInvalid, DefaultInjectMark)
		}
	}
	if o.InjectMark == o.QuietMark {
		return o, fmt.Errorf("nat: inject and quiet mark are both %#x: %w: give two different bits", o.InjectMark, ErrInvalid)
	}
	return o, nil
}

// Errors wrapped by this package's errors; test with errors.Is.
var (
	// ErrInvalid reports a malformed flow, address or option. A batch
	// holding one is refused as a whole: nothing is changed.
	ErrInvalid = errors.New("invalid argument")
	// ErrHoldsKept is wrapped by the error of an Apply whose holds could
	// not be lifted, even after a few tries: the batch's other changes
	// are in, and the holds go on queueing their flows' packets until a
	// later batch lifts them or they time out (Options.HoldIdle).
	// [Queue.Pass] keeps such flows' packets going meanwhile.
	ErrHoldsKept = errors.New("holds still in")
	// ErrApplied is wrapped by the error of an Apply whose changes went
	// in, all but the holds it lifts if the error also wraps
	// ErrHoldsKept, when a step after them failed: the caller's step
	// ([Table.ApplyThen]), the lifting of the holds, or the second look
	// for elements that a packet put back.
	ErrApplied = errors.New("the batch went in")
	// ErrClosed reports use of a Table or Queue after Close or Destroy.
	ErrClosed = errors.New("already closed")
	// ErrUnsupported reports a system without nftables/NFQUEUE (anything
	// but Linux). It wraps errors.ErrUnsupported.
	ErrUnsupported = fmt.Errorf("nat: nftables and NFQUEUE exist only on Linux: %w", errors.ErrUnsupported)
)

// OpError is the error returned by the Table and Queue methods: which
// operation failed, and why.
type OpError struct {
	// Op is the operation: "open", "apply", "flows", "reconcile",
	// "destroy", "close", "open queue", "release", ...
	Op string
	// Table is the nftables table, or for queue operations "queue N".
	Table string
	// Err is the cause.
	Err error
}

// Error implements error.
func (e *OpError) Error() string {
	return "nat: " + e.Op + " " + e.Table + ": " + e.Err.Error()
}

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

// Batch is a change to the table built by the caller and applied by
// [Table.Apply] as one atomic nftables transaction (two when it lifts holds
// together with other changes). The zero value is an
// empty batch ready to use. Methods record the change only; flows are
// checked by Apply, which refuses the whole batch if one is malformed.
//
// Within a batch the last change of an element wins: Hold(f) then
// Unhold(f) leaves f unheld; Unhold(f) then Forward(f, b) switches f from
// held to forwarded in one step. A Batch is not safe for concurrent use.
type Batch struct {
	ops []op
}

type opKind uint8

const (
	opHold opKind = iota + 1
	opUnhold
	opForward
	opReplyFrom
	opGatewayReply
	opRemove
	opDeleteEntry // Reconcile: one exact element
)

type op struct {
	kind  opKind
	flow  Flow
	addr  netip.Addr // Forward: new destination; ReplyFrom: local address; GatewayReply: target
	port  uint16     // ReplyFrom: local port
	entry Entry      // opDeleteEntry
}

// Len returns how many changes b records.
func (b *Batch) Len() int { return len(b.ops) }

// Reset empties b for reuse.
func (b *Batch) Reset() { b.ops = b.ops[:0] }

// Hold queues f's client→service packets to NFQUEUE instead of delivering
// them (source host, from before the freeze until the switch). Packets
// whose mark has the Options.InjectMark bit are never held.
func (b *Batch) Hold(f Flow) { b.ops = append(b.ops, op{kind: opHold, flow: f}) }

// Unhold removes f's hold. Queued packets stay queued until
// [Queue.Release].
func (b *Batch) Unhold(f Flow) { b.ops = append(b.ops, op{kind: opUnhold, flow: f}) }

// Forward rewrites the destination of f's client→service packets to to
// (source host whose service moved, or gateway). It replaces an earlier
// Forward of f.
func (b *Batch) Forward(f Flow, to netip.Addr) {
	b.ops = append(b.ops, op{kind: opForward, flow: f, addr: to})
}

// ReplyFrom rewrites the source address of packets local→f.Client to
// f.Service.Addr(), in postrouting (target host, where the restored socket
// has local as its address). The source port is left alone: it is
// local.Port(), normally f.Service.Port(). It replaces an earlier ReplyFrom
// of f.
func (b *Batch) ReplyFrom(f Flow, local netip.AddrPort) {
	b.ops = append(b.ops, op{kind: opReplyFrom, flow: f, addr: local.Addr(), port: local.Port()})
}

// GatewayReply rewrites the source address of replies target:f.Service.Port()
// →f.Client to f.Service.Addr(), in prerouting (gateway, together with a
// Forward of f to target). It replaces an earlier GatewayReply of f.
func (b *Batch) GatewayReply(f Flow, target netip.Addr) {
	b.ops = append(b.ops, op{kind: opGatewayReply, flow: f, addr: target})
}

// Remove deletes every element of f, of any kind. Elements that do not
// exist (never added, or expired) are skipped without error. The
// ReplyFrom and GatewayReply elements of f are found through the Table's
// index (see [Table.Flows]).
func (b *Batch) Remove(f Flow) { b.ops = append(b.ops, op{kind: opRemove, flow: f}) }

// deleteEntry deletes exactly the element e describes (Reconcile).
func (b *Batch) deleteEntry(e Entry) {
	b.ops = append(b.ops, op{kind: opDeleteEntry, flow: e.Flow, entry: e})
}

package repair

import (
	"fmt"
	"math/bits"
	"net/netip"
)

// State is everything needed to bring an established TCP connection back to
// life on another socket, possibly on another host. It is a plain value: it
// holds no file descriptor and can be encoded with [State.MarshalBinary].
//
// Sequence numbers follow the kernel's TCP_QUEUE_SEQ view with the FINs taken
// out: SendSeq is the sequence number of SendQueue[0] (snd_una), RecvSeq the
// one of RecvQueue[0] (the next byte the application would read). Whether a
// FIN was sent or received is implied by TCPState.
type State struct {
	// Local and Remote are the connection's addresses as seen by the
	// captured socket. Both are IPv4 or both are IPv6.
	Local, Remote netip.AddrPort

	// TCPState is ESTABLISHED or one of the half-closed states.
	TCPState TCPState

	// SendSeq is the sequence number of the first byte of SendQueue.
	SendSeq uint32
	// RecvSeq is the sequence number of the first byte of RecvQueue.
	RecvSeq uint32

	// SendQueue holds the bytes the application wrote that the peer has not
	// acknowledged: first those already sent, then the last Unsent bytes,
	// which never left the host.
	SendQueue []byte
	// Unsent is how many bytes at the tail of SendQueue were never sent.
	Unsent uint32
	// RecvQueue holds the bytes received and acknowledged that the
	// application has not read yet.
	RecvQueue []byte
	// AckPending reports that some of what the socket received (data or
	// a FIN) reached it while it was quiet ([Frozen.Quiet]), so the peer
	// may never have heard it acknowledged: the restored socket
	// acknowledges on Commit.
	AckPending bool

	// MSS is the maximum segment size clamp negotiated in the handshake.
	MSS uint32
	// Options are the TCP options negotiated in the handshake.
	Options TCPOptions
	// SndWScale and RcvWScale are the window scale shifts for the windows
	// the peer advertises and the ones this end advertises. Meaningful only
	// with OptWindowScale.
	SndWScale, RcvWScale uint8
	// Timestamp is the socket's TCP timestamp clock (TCP_TIMESTAMP) at
	// capture. Meaningful only with OptTimestamps.
	Timestamp uint32

	// Window is the socket's window state (TCP_REPAIR_WINDOW).
	Window Window

	// Sockopts are the options the application set on the socket.
	Sockopts Sockopts
}

// TCPOptions is the set of TCP options negotiated in the handshake, with the
// bit values of tcp_info's tcpi_options (linux/tcp.h TCPI_OPT_*).
type TCPOptions uint8

// The options a [State] records.
const (
	OptTimestamps  TCPOptions = 1 // TCPI_OPT_TIMESTAMPS
	OptSACK        TCPOptions = 2 // TCPI_OPT_SACK
	OptWindowScale TCPOptions = 4 // TCPI_OPT_WSCALE

	knownOptions = OptTimestamps | OptSACK | OptWindowScale
)

// Window mirrors struct tcp_repair_window (linux/tcp.h).
type Window struct {
	SndWL1    uint32 // sequence number of the segment that last updated SndWnd
	SndWnd    uint32 // the peer's receive window, scaled
	MaxWindow uint32 // the largest window the peer ever advertised
	RcvWnd    uint32 // the window this end advertised last
	RcvWup    uint32 // RecvSeq-space point at which RcvWnd was advertised
}

// Sockopts are socket options an application may have set and would miss
// if the migration dropped them. Zero values mean what the kernel's defaults
// mean (option off, system default), except the buffer sizes, where zero
// means "leave the kernel default".
type Sockopts struct {
	NoDelay   bool // TCP_NODELAY
	Cork      bool // TCP_CORK
	KeepAlive bool // SO_KEEPALIVE
	// KeepIdle, KeepIntvl (seconds) and KeepCnt are TCP_KEEPIDLE,
	// TCP_KEEPINTVL and TCP_KEEPCNT.
	KeepIdle, KeepIntvl, KeepCnt uint32
	// UserTimeout is TCP_USER_TIMEOUT in milliseconds; 0 is the default.
	UserTimeout uint32
	// Congestion is the TCP_CONGESTION algorithm name, such as "cubic".
	Congestion string
	// RcvBuf and SndBuf are SO_RCVBUF and SO_SNDBUF as the kernel reports
	// them (twice the value passed to setsockopt), read when the
	// application set them (RcvBufLock, SndBufLock) or data is queued.
	// A restore gives the socket at most what a socket may have on the
	// target (twice net.core.[rw]mem_max, or tcp_[rw]mem's maximum if
	// larger), whatever the state says.
	RcvBuf, SndBuf uint32
	// RcvBufLock and SndBufLock report that the application set the
	// buffer's size, which turns the kernel's autotuning of it off
	// (SO_BUF_LOCK). Where they are false the restored socket's buffer
	// is left to autotuning too.
	RcvBufLock, SndBufLock bool
	// NotSentLowat is TCP_NOTSENT_LOWAT in bytes; 0 is the default.
	NotSentLowat uint32
	// TOS is IP_TOS for IPv4 or IPV6_TCLASS for IPv6.
	TOS uint8
	// Mark is SO_MARK.
	Mark uint32
	// Priority is SO_PRIORITY.
	Priority uint32
}

// Limits the decoder enforces, so that a malformed or hostile blob cannot
// make it allocate more than it holds.
const (
	// MaxQueueLen is the largest queue a State may carry, each way.
	MaxQueueLen = 256 << 20
	// minMSS is the smallest MSS clamp a State may carry: the kernel
	// sends no smaller segments (TCP_MIN_SND_MSS, the default of
	// net.ipv4.tcp_min_snd_mss).
	minMSS = 48
	// maxCongestionName mirrors TCP_CA_NAME_MAX (16, with the NUL).
	maxCongestionName = 15
)

// inboundFIN reports whether the peer's FIN has been received in state s.
func (s TCPState) inboundFIN() bool {
	return s == StateCloseWait || s == StateLastAck || s == StateClosing
}

// outboundFIN reports whether this end has queued its FIN in state s.
func (s TCPState) outboundFIN() bool {
	return s == StateFinWait1 || s == StateFinWait2 || s == StateLastAck || s == StateClosing
}

// migratable reports whether a socket in state s can be captured.
func (s TCPState) migratable() bool {
	return s == StateEstablished || s.inboundFIN() || s.outboundFIN()
}

// Validate reports whether st is internally consistent: a State that fails
// it cannot be restored. Decode calls it on everything it returns.
func (st *State) Validate() error {
	if !st.Local.IsValid() || !st.Remote.IsValid() {
		return fmt.Errorf("%w: missing address", ErrMalformed)
	}
	if st.Local.Addr().Is4() != st.Remote.Addr().Is4() {
		return fmt.Errorf("%w: local %v and remote %v are of different families", ErrMalformed, st.Local, st.Remote)
	}
	if st.Local.Addr().Is4In6() || st.Remote.Addr().Is4In6() {
		return fmt.Errorf("%w: v4-mapped IPv6 address", ErrMalformed)
	}
	if st.Local.Port() == 0 || st.Remote.Port() == 0 {
		return fmt.Errorf("%w: zero port", ErrMalformed)
	}
	if !st.TCPState.migratable() {
		return fmt.Errorf("%w: TCP state %v cannot be restored", ErrMalformed, st.TCPState)
	}
	if len(st.SendQueue) > MaxQueueLen || len(st.RecvQueue) > MaxQueueLen {
		return fmt.Errorf("%w: queue longer than %d bytes", ErrMalformed, MaxQueueLen)
	}
	if int64(st.Unsent) > int64(len(st.SendQueue)) {
		return fmt.Errorf("%w: %d unsent bytes in a send queue of %d", ErrMalformed, st.Unsent, len(st.SendQueue))
	}
	if st.TCPState == StateFinWait2 && len(st.SendQueue) != 0 {
		return fmt.Errorf("%w: FIN_WAIT2 with unacknowledged data", ErrMalformed)
	}
	if st.MSS < minMSS || st.MSS > 65535 {
		return fmt.Errorf("%w: MSS %d", ErrMalformed, st.MSS)
	}
	if st.Options&^knownOptions != 0 {
		return fmt.Errorf("%w: unknown TCP options %#x", ErrMalformed, uint8(st.Options))
	}
	if st.SndWScale > 14 || st.RcvWScale > 14 {
		return fmt.Errorf("%w: window scale above 14", ErrMalformed)
	}
	if st.Options&OptWindowScale == 0 && (st.SndWScale != 0 || st.RcvWScale != 0) {
		return fmt.Errorf("%w: window scale without the option", ErrMalformed)
	}
	if st.Options&OptTimestamps == 0 && st.Timestamp != 0 {
		return fmt.Errorf("%w: timestamp without the option", ErrMalformed)
	}
	if len(st.Sockopts.Congestion) > maxCongestionName {
		return fmt.Errorf("%w: congestion control name longer than %d", ErrMalformed, maxCongestionName)
	}
	for _, c := range []byte(st.Sockopts.Congestion) {
		if c <= ' ' || c > '~' {
			return fmt.Errorf("%w: congestion control name %q", ErrMalformed, st.Sockopts.Congestion)
		}
	}
	if st.Sockopts.KeepIdle > 32767 || st.Sockopts.KeepIntvl > 32767 || st.Sockopts.KeepCnt > 127 {
		return fmt.Errorf("%w: keepalive parameters out of range", ErrMalformed)
	}
	if st.Sockopts.RcvBuf > 1<<31-1 || st.Sockopts.SndBuf > 1<<31-1 ||
		st.Sockopts.UserTimeout > 1<<31-1 || st.Sockopts.NotSentLowat > 1<<31-1 || st.Sockopts.Priority > 1<<31-1 {
		return fmt.Errorf("%w: socket option out of range", ErrMalformed)
	}
	return nil
}

// String summarises st for logs: tuple, state and queue sizes.
func (st *State) String() string {
	return fmt.Sprintf("%v->%v %v snd=%d(%d unsent) rcv=%d", st.Local, st.Remote, st.TCPState,
		len(st.SendQueue), st.Unsent, len(st.RecvQueue))
}

// RestoreOptions adjusts a restore. The zero value restores the connection
// with the addresses it was captured with.
type RestoreOptions struct {
	// Local replaces the socket's local address; zero keeps State.Local.
	// Address rewriting restores on the target host's own address and
	// rewrites packets to and from the original one.
	Local netip.AddrPort
	// Remote replaces the peer's address; zero keeps State.Remote.
	Remote netip.AddrPort
	// Blank is a socket made ahead with NewBlank, so that the restore does
	// not create one while the connection is frozen; nil makes one.
	Blank *Blank
	// Quiet adds the bit Marks.Quiet to the socket's mark (SO_MARK) until
	// Commit, which sets the mark back to the captured one. A socket in repair mode sends
	// nothing of its own, but it acknowledges the segments that reach it;
	// a firewall that drops packets with that bit (package nat's table
	// does) keeps those acknowledgements from leaving before the rules
	// that rewrite them are in. If the socket took anything in meanwhile
	// (data or the peer's FIN), Commit makes it acknowledge that at once,
	// through the Injector, so that the peer need not retransmit it.
	Quiet bool
	// Injector sends the segments a restore needs from the peer (its FIN,
	// for a connection the peer had half-closed; what makes a quiet socket
	// acknowledge); it must be of the namespace the socket is restored in.
	// Nil makes one for this socket when it needs one, at a cost of a few
	// system calls: a caller restoring many sockets shares one.
	Injector *Injector
	// Marks are the mark bits mtcp uses; zero fields take DefaultMarks'.
	// A State whose mark has one of them set is refused: with it, the
	// socket's packets would pass the holds or never be heard.
	Marks Marks
}

// Marks are the two packet mark bits (SO_MARK, a firewall's "meta mark")
// mtcp uses for itself. Each is one bit, set over a packet's or socket's
// own mark, which is kept: a mark is often another tool's too (kube-proxy
// masquerades packets with bit 0x4000, policy routing matches small
// marks).
type Marks struct {
	// Inject is the bit of the segments an Injector sends, which holds
	// let through (package nat's Options.InjectMark).
	Inject uint32
	// Quiet is the bit a quiet socket carries until its Commit or Thaw:
	// package nat's table drops what such a socket sends (Options.QuietMark).
	Quiet uint32
}

// DefaultMarks are bits 28 and 29, clear of those kube-proxy (0x4000,
// 0x8000), Cilium (0x0f00) and the small marks of policy routing use.
// They equal package nat's DefaultInjectMark and DefaultQuietMark.
var DefaultMarks = Marks{Inject: 1 << 28, Quiet: 1 << 29}

// OrDefault returns m with its zero fields taken from DefaultMarks.
func (m Marks) OrDefault() Marks {
	if m.Inject == 0 {
		m.Inject = DefaultMarks.Inject
	}
	if m.Quiet == 0 {
		m.Quiet = DefaultMarks.Quiet
	}
	return m
}

// Check reports whether m (zero fields taken from DefaultMarks) is two
// different bits.
func (m Marks) Check() error {
	m = m.OrDefault()
	if bits.OnesCount32(m.Inject) != 1 || bits.OnesCount32(m.Quiet) != 1 {
		return fmt.Errorf("marks %#x and %#x: each must be one bit (a power of two, such as %#x)", m.Inject, m.Quiet, DefaultMarks.Inject)
	}
	if m.Inject == m.Quiet {
		return fmt.Errorf("inject and quiet mark are both %#x: give two different bits", m.Inject)
	}
	return nil
}

// checkMark refuses a state whose socket mark has one of m's bits.
func (m Marks) checkMark(st *State) error {
	if b := st.Sockopts.Mark & (m.Inject | m.Quiet); b != 0 {
		return fmt.Errorf("%w: SO_MARK %#x has bit %#x, which mtcp uses for itself (no captured socket has it)", ErrMalformed, st.Sockopts.Mark, b)
	}
	return nil
}

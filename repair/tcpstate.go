package repair

import (
	"fmt"
	"net/netip"
	"strconv"
	"time"
)

// TCPState is a TCP state as the kernel numbers it. The values mirror the
// enum in include/net/tcp_states.h, which is also what sock_diag reports in
// inet_diag_msg.idiag_state, what the idiag_states bitmask is indexed by
// and what tcp_info.tcpi_state holds.
type TCPState uint8

// TCP states (include/net/tcp_states.h).
const (
	StateEstablished TCPState = 1  // TCP_ESTABLISHED
	StateSynSent     TCPState = 2  // TCP_SYN_SENT
	StateSynRecv     TCPState = 3  // TCP_SYN_RECV
	StateFinWait1    TCPState = 4  // TCP_FIN_WAIT1
	StateFinWait2    TCPState = 5  // TCP_FIN_WAIT2
	StateTimeWait    TCPState = 6  // TCP_TIME_WAIT
	StateClose       TCPState = 7  // TCP_CLOSE
	StateCloseWait   TCPState = 8  // TCP_CLOSE_WAIT
	StateLastAck     TCPState = 9  // TCP_LAST_ACK
	StateListen      TCPState = 10 // TCP_LISTEN
	StateClosing     TCPState = 11 // TCP_CLOSING
)

var stateNames = [...]string{
	StateEstablished: "ESTABLISHED",
	StateSynSent:     "SYN_SENT",
	StateSynRecv:     "SYN_RECV",
	StateFinWait1:    "FIN_WAIT1",
	StateFinWait2:    "FIN_WAIT2",
	StateTimeWait:    "TIME_WAIT",
	StateClose:       "CLOSE",
	StateCloseWait:   "CLOSE_WAIT",
	StateLastAck:     "LAST_ACK",
	StateListen:      "LISTEN",
	StateClosing:     "CLOSING",
}

// String returns the kernel's name for the state without the TCP_ prefix
// ("ESTABLISHED", "FIN_WAIT1", ...), or "TCPState(N)" for a number the
// kernel does not use in replies.
func (s TCPState) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return "TCPState(" + strconv.Itoa(int(s)) + ")"
}

// Conn is one TCP connection as the kernel reports it.
type Conn struct {
	// Local and Remote are the connection's endpoints. IPv4 addresses
	// are 4-byte addresses even when the socket is a dual-stack AF_INET6
	// socket (which the kernel reports as v4-mapped ::ffff:a.b.c.d),
	// IPv6 addresses 16-byte ones.
	Local, Remote netip.AddrPort

	// State is the TCP state.
	State TCPState

	// Inode is the socket's inode number: the N of the "socket:[N]" link
	// in /proc/<pid>/fd, and what ties a connection to its owners.
	Inode uint64

	// UID is the owner's user id as seen from the socket's user
	// namespace (idiag_uid).
	UID uint32

	// RecvQ is the number of received bytes the application has not read
	// yet (idiag_rqueue); SendQ the number of bytes written but not yet
	// acknowledged by the peer (idiag_wqueue).
	RecvQ, SendQ uint32

	// Info holds the figures of the kernel's struct tcp_info. It is
	// zero for sockets that have none (TIME_WAIT, SYN_RECV).
	Info TCPInfo

	// ULP is the name of the upper-layer protocol attached to the
	// socket ("mptcp" for an MPTCP subflow, "tls" for kTLS), or "" when
	// there is none. The kernel only reports it to callers with
	// CAP_NET_ADMIN, so it is "" for unprivileged callers.
	ULP string

	// Owners are the processes holding a descriptor for the socket. It is
	// filled only when ListOptions.Owners is set; a socket can have
	// several (after fork or dup) or none (an orphaned socket that the
	// kernel is still closing).
	Owners []Owner
}

// TCPInfo holds the figures of struct tcp_info (linux/tcp.h) that matter
// for deciding whether and where to move a connection.
type TCPInfo struct {
	// RTT is the smoothed round-trip time, RTTVar its mean deviation and
	// MinRTT the smallest RTT seen over the kernel's windowed filter
	// (tcpi_rtt, tcpi_rttvar, tcpi_min_rtt; microsecond resolution).
	RTT, RTTVar, MinRTT time.Duration

	// Retransmits is the number of consecutive retransmission timeouts
	// of the segment currently at the head of the queue (tcpi_retransmits):
	// a non-zero value means the path is failing right now.
	Retransmits uint8

	// TotalRetrans counts every segment retransmitted over the
	// connection's life, Lost the segments currently presumed lost and
	// Unacked those sent but not acknowledged (in segments, not bytes).
	TotalRetrans, Lost, Unacked uint32

	// TotalRTO counts the connection's retransmission timeouts
	// (tcpi_total_rto, Linux 6.7 and later; zero before): the
	// retransmissions the connection waited a timeout for, as opposed to
	// fast retransmits and tail loss probes, which TotalRetrans counts too.
	TotalRTO uint16

	// SndCwnd is the congestion window in segments.
	SndCwnd uint32

	// DeliveryRate is the most recent goodput sample in bytes per second.
	DeliveryRate uint64

	// BytesAcked and BytesReceived count the bytes acknowledged by the
	// peer and received from it. On the side that connected, BytesAcked
	// includes the acknowledged SYN, one more than the payload.
	BytesAcked, BytesReceived uint64

	// SndMSS and RcvMSS are the current send and estimated receive
	// maximum segment sizes.
	SndMSS, RcvMSS uint32
}

// Owner is one process descriptor that refers to a socket.
type Owner struct {
	// PID is the process id in the caller's PID namespace.
	PID int
	// FD is the descriptor number inside that process, as TakeFD wants it.
	FD int
	// Comm is the process's command name (/proc/<pid>/comm).
	Comm string
}

// ListOptions selects the connections List returns. The zero value lists
// every established or half-closed connection without owners.
type ListOptions struct {
	// States are the TCP states to list. Nil means ESTABLISHED and the
	// half-closed states FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and
	// CLOSING, the states a socket can be migrated in. The kernel does
	// the filtering.
	States []TCPState

	// Owners also finds the processes holding each socket, by scanning
	// the /proc/<pid>/fd links for "socket:[inode]". The scan costs one
	// readlink per open descriptor on the host and needs root (or
	// CAP_SYS_PTRACE) to see other users' processes.
	Owners bool

	// OwnersAmong, when not nil, limits the scan of Owners to these
	// processes: a socket none of them holds is listed without owners.
	// It costs what their descriptors do, not the host's.
	OwnersAmong []int

	// Port, when non-zero, keeps only connections whose local port is
	// Port. The kernel does the filtering, so a busy host does not pay
	// for the connections it skips.
	Port uint16
}

// Migratable reports whether the connection can be captured with
// TCP_REPAIR: nil, or an error saying why not, wrapping ErrMPTCP, ErrULP,
// ErrListening or ErrState. ESTABLISHED and the half-closed states
// (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING) can be captured; SYN_SENT and
// SYN_RECV have no agreed sequence space yet, TIME_WAIT and CLOSE no full
// socket left. An MPTCP subflow is refused because TCP_REPAIR would move
// the subflow without the MPTCP connection-level state (data sequence
// numbers, keys) that the peer checks.
//
// The verdict is only as good as the listing: Conn.ULP is empty unless
// List ran with CAP_NET_ADMIN, and the socket may have changed state since.
func (c Conn) Migratable() error {
	var err error
	switch {
	case c.ULP == "mptcp":
		err = fmt.Errorf("%v -> %v is an MPTCP subflow: %w", c.Local, c.Remote, ErrMPTCP)
	case c.ULP != "":
		err = fmt.Errorf("%v -> %v has ULP %q: %w", c.Local, c.Remote, c.ULP, ErrULP)
	case c.State == StateListen:
		err = fmt.Errorf("%v: %w", c.Local, ErrListening)
	case !c.State.migratable():
		err = fmt.Errorf("%v -> %v is %v: %w", c.Local, c.Remote, c.State, ErrState)
	default:
		return nil
	}
	return &OpError{Op: "migratable", Err: err}
}

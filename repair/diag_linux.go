package repair

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// sock_diag message type (linux/sock_diag.h).
const sockDiagByFamily netlink.HeaderType = 20 // SOCK_DIAG_BY_FAMILY

// Attributes of a request (linux/inet_diag.h, enum INET_DIAG_REQ_*).
const inetDiagReqBytecode uint16 = 1 // INET_DIAG_REQ_BYTECODE

// Attributes of a reply (linux/inet_diag.h, enum INET_DIAG_*). The same
// numbers, minus one, are the bits of inet_diag_req_v2.idiag_ext that ask
// for an attribute.
type inetDiagAttr uint16

const (
	inetDiagInfo    inetDiagAttr = 2  // INET_DIAG_INFO: struct tcp_info
	inetDiagULPInfo inetDiagAttr = 19 // INET_DIAG_ULP_INFO: nested INET_ULP_INFO_*
)

// Attributes nested in INET_DIAG_ULP_INFO (linux/inet_diag.h, enum INET_ULP_INFO_*).
const inetULPInfoName uint16 = 1 // INET_ULP_INFO_NAME: NUL-terminated ULP name

// Bytecode filter opcodes (linux/inet_diag.h, enum INET_DIAG_BC_*).
type inetDiagBCOp uint8

const inetDiagBCSrcEq inetDiagBCOp = 11 // INET_DIAG_BC_S_EQ: local port == next op's "no"

// Wire sizes of the structures in linux/inet_diag.h.
const (
	sizeofInetDiagSockID = 48                            // struct inet_diag_sockid
	sizeofInetDiagReqV2  = 8 + sizeofInetDiagSockID      // struct inet_diag_req_v2
	sizeofInetDiagMsg    = 4 + sizeofInetDiagSockID + 20 // struct inet_diag_msg
	sizeofInetDiagBCOp   = 4                             // struct inet_diag_bc_op
)

// defaultStates is the idiag_states mask used when ListOptions.States is
// nil: every state in which TCPState.migratable holds.
var defaultStates = []TCPState{
	StateEstablished, StateFinWait1, StateFinWait2,
	StateCloseWait, StateLastAck, StateClosing,
}

// List returns this network namespace's TCP connections, as the kernel's
// sock_diag interface reports them, IPv4 first, then IPv6.
//
// "This network namespace" is the namespace of the calling thread, so a
// caller that has entered another namespace with setns (on a locked OS
// thread) lists that one. The ULP of a socket is reported by the kernel only
// to callers with CAP_NET_ADMIN; without it Conn.ULP stays empty, and
// Conn.Migratable cannot tell an MPTCP subflow from a plain TCP socket.
//
// The dump is not a snapshot: connections that open or close while it runs
// may or may not appear. The context bounds the whole call, /proc scan
// included.
//
// Errors are *OpError with Op "list".
func List(ctx context.Context, o ListOptions) ([]Conn, error) {
	conns, err := list(ctx, o)
	if err != nil {
		return nil, opErr("list", err)
	}
	return conns, nil
}

func list(ctx context.Context, o ListOptions) ([]Conn, error) {
	states := o.States
	if states == nil {
		states = defaultStates
	}
	var mask uint32
	for _, s := range states {
		if s < StateEstablished || s > StateClosing {
			return nil, fmt.Errorf("unknown TCP state %d in ListOptions.States", s)
		}
		mask |= 1 << s
	}
	if mask == 0 {
		return nil, nil // an empty, non-nil States asks for no state at all
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, nil)
	if err != nil {
		return nil, fmt.Errorf("open sock_diag netlink socket: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		if err := c.SetDeadline(dl); err != nil {
			return nil, err
		}
	}
	// A deadline in the past wakes a receive blocked in the poller; the
	// error it causes is then reported as the context's.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var conns []Conn
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		conns, err = dump(c, family, mask, o.Port, conns)
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return nil, ctxErr
			}
			return nil, err
		}
	}
	if o.Owners && len(conns) > 0 {
		if err := fillOwners(ctx, "/proc", conns, o.OwnersAmong); err != nil {
			return nil, err
		}
	}
	return conns, nil
}

// dump runs one SOCK_DIAG_BY_FAMILY dump and appends its connections to
// conns.
func dump(c *netlink.Conn, family uint8, states uint32, port uint16, conns []Conn) ([]Conn, error) {
	req, err := c.Send(netlink.Message{
		Header: netlink.Header{
			Type:  sockDiagByFamily,
			Flags: netlink.Request | netlink.Dump,
		},
		Data: marshalDiagRequest(family, states, port),
	})
	if err != nil {
		return conns, fmt.Errorf("send %s dump request: %w", familyName(family), err)
	}
	for m, err := range c.ReceiveIter() {
		if err != nil {
			return conns, fmt.Errorf("receive %s dump: %w", familyName(family), err)
		}
		if m.Header.Sequence != req.Header.Sequence || m.Header.Type != sockDiagByFamily {
			// Not a reply to this request (ReceiveIter has already
			// turned NLMSG_ERROR into err and swallowed NLMSG_DONE).
			continue
		}
		conn, err := parseDiagMsg(m.Data)
		if err != nil {
			return conns, fmt.Errorf("%s dump: %w", familyName(family), err)
		}
		// The kernel already filtered; this guards against a kernel that
		// ignored the bytecode.
		if port != 0 && conn.Local.Port() != port {
			continue
		}
		conns = append(conns, conn)
	}
	return conns, nil
}

func familyName(family uint8) string {
	if family == unix.AF_INET6 {
		return "AF_INET6"
	}
	return "AF_INET"
}

// marshalDiagRequest encodes struct inet_diag_req_v2 for a TCP dump of
// one family, followed, when port is non-zero, by a bytecode filter on
// the local port.
func marshalDiagRequest(family uint8, states uint32, port uint16) []byte {
	b := make([]byte, sizeofInetDiagReqV2)
	b[0] = family           // sdiag_family
	b[1] = unix.IPPROTO_TCP // sdiag_protocol
	// idiag_ext is a bitmask of (attribute - 1); INET_DIAG_ULP_INFO needs
	// no bit, tcp_diag adds it on its own for CAP_NET_ADMIN callers.
	b[2] = 1 << (inetDiagInfo - 1)
	binary.NativeEndian.PutUint32(b[4:], states) // idiag_states
	// id stays zero: a dump ignores it, apart from the cookie.
	if port == 0 {
		return b
	}

	// A one-instruction program: S_EQ compares the local port with the
	// "no" field of the op that follows it (host byte order). Jumping
	// "yes" bytes lands exactly on the end of the program, which accepts
	// the socket; jumping "no" lands 4 bytes past it, which rejects it
	// (inet_diag_bc_run accepts only when the remaining length is 0).
	bc := make([]byte, 2*sizeofInetDiagBCOp)
	bc[0] = byte(inetDiagBCSrcEq)
	bc[1] = 2 * sizeofInetDiagBCOp
	binary.NativeEndian.PutUint16(bc[2:], 3*sizeofInetDiagBCOp)
	binary.NativeEndian.PutUint16(bc[6:], port)

	// The program travels as one INET_DIAG_REQ_BYTECODE attribute: a
	// struct nlattr header and the ops, already 4-byte aligned.
	nla := make([]byte, 4, 4+len(bc))
	binary.NativeEndian.PutUint16(nla[0:], uint16(4+len(bc)))
	binary.NativeEndian.PutUint16(nla[2:], inetDiagReqBytecode)
	return append(append(b, nla...), bc...)
}

// parseDiagMsg decodes one struct inet_diag_msg and its attributes. It
// never panics: a reply too short for its fixed part, with an unknown
// address family or with malformed attributes is an error, and a tcp_info
// shorter than this package knows (an older kernel) leaves the missing
// figures zero.
func parseDiagMsg(b []byte) (Conn, error) {
	if len(b) < sizeofInetDiagMsg {
		return Conn{}, fmt.Errorf("inet_diag_msg truncated: %d bytes, want at least %d", len(b), sizeofInetDiagMsg)
	}
	family := b[0]
	c := Conn{State: TCPState(b[1])}
	// b[2] idiag_timer and b[3] idiag_retrans describe the pending timer
	// (retransmit, keepalive, zero window probe); tcp_info carries the same
	// and more.
	id := b[4 : 4+sizeofInetDiagSockID]
	sport := binary.BigEndian.Uint16(id[0:])
	dport := binary.BigEndian.Uint16(id[2:])
	switch family {
	case unix.AF_INET:
		c.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(id[4:8])), sport)
		c.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(id[20:24])), dport)
	case unix.AF_INET6:
		// A dual-stack socket talking IPv4 is AF_INET6 with v4-mapped
		// addresses; Unmap makes it compare equal to what net.Conn reports.
		c.Local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(id[4:20])).Unmap(), sport)
		c.Remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(id[20:36])).Unmap(), dport)
	default:
		return Conn{}, fmt.Errorf("inet_diag_msg has address family %d, want AF_INET or AF_INET6", family)
	}
	// id[36:40] idiag_if, id[40:48] idiag_cookie; then
	// idiag_expires, idiag_rqueue, idiag_wqueue, idiag_uid, idiag_inode.
	tail := b[4+sizeofInetDiagSockID:]
	c.RecvQ = binary.NativeEndian.Uint32(tail[4:])
	c.SendQ = binary.NativeEndian.Uint32(tail[8:])
	c.UID = binary.NativeEndian.Uint32(tail[12:])
	c.Inode = uint64(binary.NativeEndian.Uint32(tail[16:]))

	attrs := b[sizeofInetDiagMsg:]
	if len(attrs) == 0 {
		return c, nil
	}
	ad, err := netlink.NewAttributeDecoder(attrs)
	if err != nil {
		return Conn{}, fmt.Errorf("inet_diag_msg attributes for %v -> %v: %w", c.Local, c.Remote, err)
	}
	for ad.Next() {
		switch inetDiagAttr(ad.Type()) {
		case inetDiagInfo:
			ad.Do(func(b []byte) error {
				c.Info = parseTCPInfo(b)
				return nil
			})
		case inetDiagULPInfo:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					if nad.Type() == inetULPInfoName {
						c.ULP = nad.String()
					}
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		return Conn{}, fmt.Errorf("inet_diag_msg attributes for %v -> %v: %w", c.Local, c.Remote, err)
	}
	return c, nil
}

// Offsets into struct tcp_info (linux/tcp.h), taken from x/sys/unix's
// mirror of it. The kernel only ever appends fields, and copies
// min(its size, the attribute) bytes, so a field lies at the same offset
// on every kernel that has it.
const (
	offRetransmits  = unsafe.Offsetof(unix.TCPInfo{}.Retransmits)
	offSndMSS       = unsafe.Offsetof(unix.TCPInfo{}.Snd_mss)
	offRcvMSS       = unsafe.Offsetof(unix.TCPInfo{}.Rcv_mss)
	offUnacked      = unsafe.Offsetof(unix.TCPInfo{}.Unacked)
	offLost         = unsafe.Offsetof(unix.TCPInfo{}.Lost)
	offRTT          = unsafe.Offsetof(unix.TCPInfo{}.Rtt)
	offRTTVar       = unsafe.Offsetof(unix.TCPInfo{}.Rttvar)
	offSndCwnd      = unsafe.Offsetof(unix.TCPInfo{}.Snd_cwnd)
	offTotalRetrans = unsafe.Offsetof(unix.TCPInfo{}.Total_retrans)
	offBytesAcked   = unsafe.Offsetof(unix.TCPInfo{}.Bytes_acked)
	offBytesRecv    = unsafe.Offsetof(unix.TCPInfo{}.Bytes_received)
	offMinRTT       = unsafe.Offsetof(unix.TCPInfo{}.Min_rtt)
	offDeliveryRate = unsafe.Offsetof(unix.TCPInfo{}.Delivery_rate)
	offTotalRTO     = unsafe.Offsetof(unix.TCPInfo{}.Total_rto)
)

// parseTCPInfo reads the figures of a struct tcp_info of any length;
// fields beyond the end of b are left zero.
func parseTCPInfo(b []byte) TCPInfo {
	u32 := func(off uintptr) uint32 {
		if off+4 > uintptr(len(b)) {
			return 0
		}
		return binary.NativeEndian.Uint32(b[off:])
	}
	u64 := func(off uintptr) uint64 {
		if off+8 > uintptr(len(b)) {
			return 0
		}
		return binary.NativeEndian.Uint64(b[off:])
	}
	usec := func(off uintptr) time.Duration { return time.Duration(u32(off)) * time.Microsecond }

	var ti TCPInfo
	if offRetransmits < uintptr(len(b)) {
		ti.Retransmits = b[offRetransmits]
	}
	ti.SndMSS = u32(offSndMSS)
	ti.RcvMSS = u32(offRcvMSS)
	ti.Unacked = u32(offUnacked)
	ti.Lost = u32(offLost)
	ti.RTT = usec(offRTT)
	ti.RTTVar = usec(offRTTVar)
	ti.SndCwnd = u32(offSndCwnd)
	ti.TotalRetrans = u32(offTotalRetrans)
	ti.BytesAcked = u64(offBytesAcked)
	ti.BytesReceived = u64(offBytesRecv)
	ti.MinRTT = usec(offMinRTT)
	ti.DeliveryRate = u64(offDeliveryRate)
	if offTotalRTO+2 <= uintptr(len(b)) {
		ti.TotalRTO = binary.NativeEndian.Uint16(b[offTotalRTO:])
	}
	return ti
}

// fillOwners sets the Owners of conns by scanning procRoot/<pid>/fd for
// links to "socket:[inode]", of every process or, when among is not nil,
// of those. Processes and descriptors that vanish or cannot be read while
// the scan runs are skipped: the scan is as racy as the dump, and a
// process exiting mid-scan is not an error.
func fillOwners(ctx context.Context, procRoot string, conns []Conn, among []int) error {
	want := make(map[uint64][]int, len(conns)) // inode -> indexes into conns
	for i, c := range conns {
		if c.Inode != 0 { // 0: an orphan or a TIME_WAIT socket, owned by nobody
			want[c.Inode] = append(want[c.Inode], i)
		}
	}
	if len(want) == 0 {
		return nil
	}
	pids := among
	if pids == nil {
		d, err := os.Open(procRoot)
		if err != nil {
			return fmt.Errorf("find socket owners: %w", err)
		}
		names, err := d.Readdirnames(-1)
		d.Close()
		if err != nil {
			return fmt.Errorf("find socket owners: read %s: %w", procRoot, err)
		}
		for _, name := range names {
			if pid, err := strconv.Atoi(name); err == nil && pid > 0 {
				pids = append(pids, pid)
			}
		}
	}
	for _, pid := range slices.Compact(slices.Sorted(slices.Values(pids))) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("find socket owners: %w", err)
		}
		scanProcessFDs(procRoot, pid, want, conns)
	}
	for i := range conns {
		slices.SortFunc(conns[i].Owners, func(a, b Owner) int {
			if a.PID != b.PID {
				return a.PID - b.PID
			}
			return a.FD - b.FD
		})
	}
	return nil
}

// scanProcessFDs adds pid's descriptors that refer to sockets in want to
// the Owners of the matching conns. Every error means the process is gone
// or hidden from us, and ends the scan of this process only.
func scanProcessFDs(procRoot string, pid int, want map[uint64][]int, conns []Conn) {
	dir := procRoot + "/" + strconv.Itoa(pid) + "/fd"
	d, err := os.Open(dir)
	if err != nil {
		return
	}
	fds, _ := d.Readdirnames(-1)
	d.Close()
	var comm string
	for _, name := range fds {
		fd, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		link, err := os.Readlink(dir + "/" + name)
		if err != nil {
			continue // closed since Readdirnames, or the process exited
		}
		inode, ok := socketInode(link)
		if !ok {
			continue
		}
		idx, ok := want[inode]
		if !ok {
			continue
		}
		if comm == "" {
			comm = readComm(procRoot, pid)
		}
		for _, i := range idx {
			conns[i].Owners = append(conns[i].Owners, Owner{PID: pid, FD: fd, Comm: comm})
		}
	}
}

// socketInode parses the "socket:[12345]" target of a /proc/<pid>/fd link.
func socketInode(link string) (uint64, bool) {
	s, ok := strings.CutPrefix(link, "socket:[")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "]")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

func readComm(procRoot string, pid int) string {
	b, err := os.ReadFile(procRoot + "/" + strconv.Itoa(pid) + "/comm")
	if err != nil {
		return "" // exited since its fds were read
	}
	return strings.TrimSuffix(string(b), "\n")
}

package repair

// This file is the only place in the package that issues TCP_REPAIR socket
// options and the other getsockopt/setsockopt/ioctl calls; everything else
// speaks in State values.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// repairQueue selects the queue TCP_QUEUE_SEQ and queue reads/writes apply
// to while in repair mode (linux/tcp.h TCP_NO_QUEUE, TCP_RECV_QUEUE,
// TCP_SEND_QUEUE).
type repairQueue int

const (
	queueNone repairQueue = 0 // TCP_NO_QUEUE
	queueRecv repairQueue = 1 // TCP_RECV_QUEUE
	queueSend repairQueue = 2 // TCP_SEND_QUEUE
)

// tcpRepairWindow mirrors struct tcp_repair_window (linux/tcp.h).
type tcpRepairWindow struct {
	sndWL1, sndWnd, maxWindow, rcvWnd, rcvWup uint32
}

// tcpInfoHead mirrors struct tcp_info (linux/tcp.h) up to
// tcpi_data_segs_in (156 bytes, 160 with Go's padding): all that capture
// needs, and cheaper to copy than the whole struct. Kernels before 4.6
// copy less; the fields beyond what they have stay zero (no data seen, no
// bytes received).
type tcpInfoHead struct {
	state, caState, retransmits, probes, backoff, options uint8
	wscale                                                uint8 // snd_wscale:4, rcv_wscale:4 (see wscales)
	_                                                     uint8
	_                                                     [11]uint32 // tcpi_rto ... tcpi_last_ack_sent
	lastDataRecv                                          uint32     // tcpi_last_data_recv: ms since data last came in
	_                                                     [72]byte   // tcpi_last_ack_recv ... tcpi_bytes_acked
	bytesReceived                                         uint64     // tcpi_bytes_received: sequence numbers taken in
	_                                                     [16]byte   // tcpi_segs_out ... tcpi_min_rtt
	dataSegsIn                                            uint32     // tcpi_data_segs_in: segments with data taken in
}

// littleEndian is true on hosts that store the low byte first, where C
// allocates bit-fields from the least significant bit.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// wscales splits tcp_info's window-scale byte, two 4-bit fields declared
// snd_wscale first: C puts the first bit-field in the low bits on a
// little-endian host and in the high bits on a big-endian one.
func wscales(b uint8, little bool) (snd, rcv uint8) {
	if little {
		return b & 0xf, b >> 4
	}
	return b >> 4, b & 0xf
}

// checkSocket refuses sockets TCP_REPAIR cannot migrate, naming why. It
// is on the hot path of every migration, so the common case costs one call:
// an empty TCP_ULP answer comes only from a plain TCP socket (an MPTCP
// socket answers with its first subflow's "mptcp", other protocols with an
// error). Anything else is classified with SO_PROTOCOL, which is
// IPPROTO_TCP only for AF_INET/AF_INET6 stream sockets. Listening sockets
// are recognised when repair mode refuses them (see freezeError).
func checkSocket(fd int) error {
	var buf [16]byte
	l := uint32(len(buf))
	uerr := getsockopt(fd, unix.SOL_TCP, unix.TCP_ULP, unsafe.Pointer(&buf[0]), &l)
	if uerr == nil && (l == 0 || buf[0] == 0) {
		return nil
	}
	proto, err := getInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		if errors.Is(err, unix.ENOTSOCK) {
			return fmt.Errorf("%w: not a socket", ErrNotTCP)
		}
		return fmt.Errorf("SO_PROTOCOL: %w", err)
	}
	switch {
	case proto == unix.IPPROTO_MPTCP:
		return ErrMPTCP
	case proto != unix.IPPROTO_TCP:
		return fmt.Errorf("%w (protocol %d)", ErrNotTCP, proto)
	case uerr != nil && !errors.Is(uerr, unix.ENOPROTOOPT):
		return fmt.Errorf("TCP_ULP: %w", uerr)
	case uerr != nil:
		return nil
	}
	n := int(l)
	if i := bytes.IndexByte(buf[:n], 0); i >= 0 {
		n = i
	}
	return fmt.Errorf("%w: %q", ErrULP, buf[:n])
}

// freezeError explains why repair mode was refused.
func freezeError(fd int, err error) error {
	if errors.Is(err, unix.EPERM) {
		if l, e := getInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); e == nil && l != 0 {
			return ErrListening
		}
	}
	return err
}

func repairOn(fd int) error {
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("TCP_REPAIR on: %w (needs CAP_NET_ADMIN in the socket's network namespace)", err)
		}
		return fmt.Errorf("TCP_REPAIR on: %w", err)
	}
	return nil
}

// repairOff leaves repair mode. With probe the kernel sends a window probe,
// which makes the peer answer with its current ACK and window at once
// instead of waiting for a timer.
func repairOff(fd int, probe bool) error {
	v := unix.TCP_REPAIR_OFF
	if !probe {
		v = unix.TCP_REPAIR_OFF_NO_WP
	}
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, v); err != nil {
		return fmt.Errorf("TCP_REPAIR off: %w", err)
	}
	return nil
}

func selectQueue(fd int, q repairQueue) error {
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, int(q)); err != nil {
		return fmt.Errorf("TCP_REPAIR_QUEUE %d: %w", q, err)
	}
	return nil
}

// queueSeq returns TCP_QUEUE_SEQ of the selected queue: write_seq for the
// send queue, rcv_nxt for the receive queue.
func queueSeq(fd int) (uint32, error) {
	v, err := getInt(fd, unix.SOL_TCP, unix.TCP_QUEUE_SEQ)
	if err != nil {
		return 0, fmt.Errorf("TCP_QUEUE_SEQ: %w", err)
	}
	return uint32(v), nil
}

// setQueueSeq sets the initial sequence number of queue q. The kernel only
// accepts it while the socket is CLOSED, before connect.
func setQueueSeq(fd int, q repairQueue, seq uint32) error {
	if err := selectQueue(fd, q); err != nil {
		return err
	}
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_QUEUE_SEQ, int(int32(seq))); err != nil {
		return fmt.Errorf("TCP_QUEUE_SEQ %d: %w", q, err)
	}
	return nil
}

// peekQueue reads queue q (already selected) without consuming it; hint is
// its expected length. The send queue can hold a few bytes more than
// SIOCOUTQ says (a partly acknowledged head segment), and the kernel fails
// the read with EFAULT rather than truncate it, so the buffer has slack and
// grows on EFAULT.
func peekQueue(fd int, q repairQueue, hint int) ([]byte, error) {
	size := hint + 1
	if q == queueSend {
		if hint == 0 {
			return nil, nil
		}
		size = hint + 256<<10
	}
	for {
		buf := make([]byte, size)
		got, _, err := unix.Recvfrom(fd, buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return nil, nil // nothing queued
		case errors.Is(err, unix.EFAULT) && size < 2*MaxQueueLen:
			size *= 2
			continue
		case err != nil:
			return nil, fmt.Errorf("peek queue %d: %w", q, err)
		case got == len(buf):
			size *= 2 // the queue grew past the buffer: read it again
			if size > 2*MaxQueueLen {
				return nil, fmt.Errorf("peek queue %d: more than %d bytes", q, MaxQueueLen)
			}
			continue
		case got == 0:
			return nil, nil
		}
		return buf[:got:got], nil
	}
}

// writeQueue injects p into queue q (or, with queueNone and repair off, sends
// it normally). The receive queue takes one linear skb per call, so a chunk
// too large for the allocator fails with ENOMEM: halve and retry, as
// libsoccr does.
func writeQueue(fd int, q repairQueue, p []byte) error {
	if len(p) == 0 {
		return nil
	}
	if q != queueNone {
		if err := selectQueue(fd, q); err != nil {
			return err
		}
	}
	chunk := len(p)
	for len(p) > 0 {
		n, err := unix.Write(fd, p[:min(chunk, len(p))])
		switch {
		case err == nil && n > 0:
			p = p[n:]
		case (errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EAGAIN)) && chunk > 1024:
			chunk /= 2
		case err == nil:
			return fmt.Errorf("write queue %d: wrote nothing with %d bytes left", q, len(p))
		default:
			return fmt.Errorf("write queue %d: %w (%d bytes left)", q, err, len(p))
		}
	}
	return nil
}

func infoHead(fd int) (tcpInfoHead, error) {
	var h tcpInfoHead
	l := uint32(unsafe.Sizeof(h))
	if err := getsockopt(fd, unix.SOL_TCP, unix.TCP_INFO, unsafe.Pointer(&h), &l); err != nil {
		return h, fmt.Errorf("TCP_INFO: %w", err)
	}
	return h, nil
}

// bytesReceived returns tcpi_bytes_received: every sequence number the
// socket has taken in (data and a FIN), its restored receive queue
// included.
func bytesReceived(fd int) (uint64, error) {
	h, err := infoHead(fd)
	return h.bytesReceived, err
}

// mssClamp returns TCP_MAXSEG, which in repair mode reports the MSS clamp
// negotiated in the handshake rather than the current MSS. A peer may
// have announced less than the kernel ever sends in a segment (minMSS):
// the clamp is raised to that, which the connection sent at least anyway.
func mssClamp(fd int) (uint32, error) {
	v, err := getInt(fd, unix.SOL_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return 0, fmt.Errorf("TCP_MAXSEG: %w", err)
	}
	return max(uint32(v), minMSS), nil
}

func timestamp(fd int) (uint32, error) {
	v, err := getInt(fd, unix.SOL_TCP, unix.TCP_TIMESTAMP)
	if err != nil {
		return 0, fmt.Errorf("TCP_TIMESTAMP: %w", err)
	}
	return uint32(v), nil
}

// setTimestamp makes the socket's TCP timestamp clock continue from ts
// (the kernel stores the offset to its own clock).
func setTimestamp(fd int, ts uint32) error {
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_TIMESTAMP, int(int32(ts))); err != nil {
		return fmt.Errorf("TCP_TIMESTAMP: %w", err)
	}
	return nil
}

func window(fd int) (Window, error) {
	var w tcpRepairWindow
	l := uint32(unsafe.Sizeof(w))
	if err := getsockopt(fd, unix.SOL_TCP, unix.TCP_REPAIR_WINDOW, unsafe.Pointer(&w), &l); err != nil {
		return Window{}, fmt.Errorf("TCP_REPAIR_WINDOW: %w", err)
	}
	return Window{SndWL1: w.sndWL1, SndWnd: w.sndWnd, MaxWindow: w.maxWindow, RcvWnd: w.rcvWnd, RcvWup: w.rcvWup}, nil
}

// setWindow restores the window. The kernel checks it against rcv_nxt, so
// it must come after the receive queue.
func setWindow(fd int, win Window) error {
	w := tcpRepairWindow{win.SndWL1, win.SndWnd, win.MaxWindow, win.RcvWnd, win.RcvWup}
	if err := setsockopt(fd, unix.SOL_TCP, unix.TCP_REPAIR_WINDOW, unsafe.Pointer(&w), unsafe.Sizeof(w)); err != nil {
		return fmt.Errorf("TCP_REPAIR_WINDOW: %w", err)
	}
	return nil
}

// setRepairOptions replays the options negotiated in the handshake. It must
// run after connect and before any queue data, because the kernel sizes
// segments with them.
func setRepairOptions(fd int, st *State) error {
	opts := make([]unix.TCPRepairOpt, 0, 4)
	if st.Options&OptSACK != 0 {
		opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_SACK_PERMITTED})
	}
	if st.Options&OptWindowScale != 0 {
		opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_WINDOW, Val: uint32(st.SndWScale) | uint32(st.RcvWScale)<<16})
	}
	if st.Options&OptTimestamps != 0 {
		opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_TIMESTAMP})
	}
	opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_MAXSEG, Val: st.MSS})
	if err := unix.SetsockoptTCPRepairOpt(fd, unix.SOL_TCP, unix.TCP_REPAIR_OPTIONS, opts); err != nil {
		return fmt.Errorf("TCP_REPAIR_OPTIONS: %w", err)
	}
	return nil
}

// getSockopts reads the options an application may have set.
// A buffer's size is read only if the application set it (SO_BUF_LOCK) or
// queued data will need it (withBufs): restore sizes buffers only then,
// and leaves the others to the kernel's autotuning. If markKnown, mark is
// SO_MARK and is not read.
func getSockopts(fd int, v6, withBufs bool, mark uint32, markKnown bool) (Sockopts, error) {
	var o Sockopts
	var err error
	geti := func(level, opt int) uint32 {
		if err != nil {
			return 0
		}
		var v int
		v, err = getInt(fd, level, opt)
		if err != nil {
			err = fmt.Errorf("getsockopt %d/%d: %w", level, opt, err)
		}
		return uint32(v)
	}
	o.NoDelay = geti(unix.SOL_TCP, unix.TCP_NODELAY) != 0
	o.Cork = geti(unix.SOL_TCP, unix.TCP_CORK) != 0
	// The keepalive parameters matter only with keepalive on; each read
	// is a system call on the capture's hot path.
	if o.KeepAlive = geti(unix.SOL_SOCKET, unix.SO_KEEPALIVE) != 0; o.KeepAlive {
		o.KeepIdle = geti(unix.SOL_TCP, unix.TCP_KEEPIDLE)
		o.KeepIntvl = geti(unix.SOL_TCP, unix.TCP_KEEPINTVL)
		o.KeepCnt = geti(unix.SOL_TCP, unix.TCP_KEEPCNT)
	}
	o.UserTimeout = geti(unix.SOL_TCP, unix.TCP_USER_TIMEOUT)
	lock := geti(unix.SOL_SOCKET, unix.SO_BUF_LOCK)
	o.RcvBufLock, o.SndBufLock = lock&bufLockRcv != 0, lock&bufLockSnd != 0
	if withBufs || o.RcvBufLock {
		o.RcvBuf = geti(unix.SOL_SOCKET, unix.SO_RCVBUF)
	}
	if withBufs || o.SndBufLock {
		o.SndBuf = geti(unix.SOL_SOCKET, unix.SO_SNDBUF)
	}
	o.NotSentLowat = geti(unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT)
	if v6 {
		o.TOS = uint8(geti(unix.SOL_IPV6, unix.IPV6_TCLASS))
	} else {
		o.TOS = uint8(geti(unix.SOL_IP, unix.IP_TOS))
	}
	if markKnown {
		o.Mark = mark
	} else {
		o.Mark = geti(unix.SOL_SOCKET, unix.SO_MARK)
	}
	o.Priority = geti(unix.SOL_SOCKET, unix.SO_PRIORITY)
	if err != nil {
		return o, err
	}
	if o.Congestion, err = unix.GetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION); err != nil {
		return o, fmt.Errorf("TCP_CONGESTION: %w", err)
	}
	// The kernel's default TCP_NOTSENT_LOWAT reads back as the sysctl
	// value (UINT_MAX when unset); record it as "default".
	if o.NotSentLowat > 1<<31-1 {
		o.NotSentLowat = 0
	}
	return o, nil
}

// setSockopts applies o to a freshly made socket, skipping what already
// matches so that nothing needs privileges it does not need. Buffer sizes
// are handled by sizeBuffers, TCP_NODELAY and keepalive by undoGoDefaults,
// TCP_NOTSENT_LOWAT and TCP_CORK by setLateSockopts.
func setSockopts(fd int, v6 bool, o *Sockopts) error {
	tosLevel, tosName := unix.SOL_IP, unix.IP_TOS
	if v6 {
		tosLevel, tosName = unix.SOL_IPV6, unix.IPV6_TCLASS
	}
	if err := setOpts(fd, []intOpt{
		{unix.SOL_TCP, unix.TCP_USER_TIMEOUT, o.UserTimeout, o.UserTimeout == 0},
		{tosLevel, tosName, uint32(o.TOS), o.TOS == 0},
		{unix.SOL_SOCKET, unix.SO_MARK, o.Mark, o.Mark == 0},
		{unix.SOL_SOCKET, unix.SO_PRIORITY, o.Priority, o.Priority == 0},
	}); err != nil {
		return err
	}
	if o.Congestion != "" {
		cur, err := unix.GetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION)
		if err != nil {
			return fmt.Errorf("TCP_CONGESTION: %w", err)
		}
		if cur != o.Congestion {
			// As root, setting an algorithm that is not loaded loads
			// the module tcp_NAME: not on a peer's say-so.
			if !congestionAvailable(o.Congestion) {
				return fmt.Errorf("TCP_CONGESTION %q: not available on this host (see net.ipv4.tcp_available_congestion_control; load its module to migrate such connections here)", o.Congestion)
			}
			if err := unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION, o.Congestion); err != nil {
				return fmt.Errorf("TCP_CONGESTION %q: %w", o.Congestion, err)
			}
		}
	}
	return nil
}

// congestionAvailable reports whether the congestion control algorithm
// name is loaded on this host.
func congestionAvailable(name string) bool {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control")
	return err == nil && slices.Contains(strings.Fields(string(b)), name)
}

// Go's settings for every TCP connection it wraps (net.FileConn included):
// TCP_NODELAY on, keepalive on with 15 s idle, 15 s interval, 9 probes.
const (
	goKeepIdle  = 15
	goKeepIntvl = 15
	goKeepCnt   = 9
)

// undoGoDefaults sets TCP_NODELAY and keepalive back to what the
// application had chosen, after net.FileConn imposed Go's defaults. A Go
// server's connections usually have exactly those, and then nothing is set.
func undoGoDefaults(fd int, o *Sockopts) error {
	set := func(level, name, v int) error {
		if err := setInt(fd, level, name, v); err != nil {
			return fmt.Errorf("setsockopt %d/%d=%d: %w", level, name, v, err)
		}
		return nil
	}
	if !o.NoDelay {
		if err := set(unix.SOL_TCP, unix.TCP_NODELAY, 0); err != nil {
			return err
		}
	}
	if !o.KeepAlive {
		return set(unix.SOL_SOCKET, unix.SO_KEEPALIVE, 0)
	}
	for _, k := range [...]struct {
		name    int
		v, goes uint32
	}{
		{unix.TCP_KEEPIDLE, o.KeepIdle, goKeepIdle},
		{unix.TCP_KEEPINTVL, o.KeepIntvl, goKeepIntvl},
		{unix.TCP_KEEPCNT, o.KeepCnt, goKeepCnt},
	} {
		if k.v != 0 && k.v != k.goes {
			if err := set(unix.SOL_TCP, k.name, int(k.v)); err != nil {
				return err
			}
		}
	}
	return nil
}

// SO_BUF_LOCK's bits (SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK): set, the
// kernel's autotuning leaves that buffer's size alone.
const (
	bufLockSnd = 1
	bufLockRcv = 2
)

// bufPlan is what sizeBuffers leaves for after the queues are in: sizes
// to set back, then the buffer locks to set (lock >= 0).
type bufPlan struct {
	setBack [][2]int // option (the FORCE variant), value
	lock    int
}

// sizeBuffers gives the buffers the sizes the application had set
// (Sockopts.RcvBufLock, SndBufLock), and makes them large enough for the
// queues about to be injected: the kernel refuses queue data beyond them.
// The source socket held the same bytes within its buffers, but injected
// segments are cut differently and may cost more (a linear buffer's
// allocation is rounded up; 1.25 times the bytes was measured too little
// for 6 MiB of send queue), hence twice the bytes and some. Setting a
// size pins it (SO_BUF_LOCK) and turns the kernel's autotuning off, so
// the plan it returns (see restoreBuffers) sets the sizes back to the
// source's once the queues are in, so that the margin does not compound
// from one migration to the next, and the locks back to the source's, so
// that a buffer the application never sized grows with the connection
// again. The FORCE variants ignore
// net.core.[rw]mem_max (CAP_NET_ADMIN); sizes from the state are bounded
// by the target's limits (bufLimits).
func sizeBuffers(fd int, st *State) (plan bufPlan, err error) {
	const slack = 256 << 10
	plan.lock = -1
	rcvMax, sndMax := bufLimits()
	o := &st.Sockopts
	touched := false
	for _, b := range [...]struct {
		get, force int
		want       uint32
		limit      int64
		locked     bool
		queued     int
	}{
		{unix.SO_RCVBUF, unix.SO_RCVBUFFORCE, o.RcvBuf, rcvMax, o.RcvBufLock, len(st.RecvQueue)},
		{unix.SO_SNDBUF, unix.SO_SNDBUFFORCE, o.SndBuf, sndMax, o.SndBufLock, len(st.SendQueue)},
	} {
		if b.queued == 0 && !(b.locked && b.want > 0) {
			continue
		}
		cur, err := getInt(fd, unix.SOL_SOCKET, b.get)
		if err != nil {
			return plan, fmt.Errorf("getsockopt %d: %w", b.get, err)
		}
		// The kernel doubles what setsockopt asks for and reports the
		// doubled value.
		want := min(int64(b.want), b.limit)
		size := int64(cur)
		if b.locked && want > 0 {
			size = want
		}
		if b.queued > 0 {
			size = max(size, int64(b.queued)*2+slack)
		}
		if size != int64(cur) {
			if err := setInt(fd, unix.SOL_SOCKET, b.force, int(min((size+1)/2, 1<<30))); err != nil {
				return plan, fmt.Errorf("setsockopt %d=%d: %w", b.force, (size+1)/2, err)
			}
			touched = true
		}
		if want > 0 && size != want {
			plan.setBack = append(plan.setBack, [2]int{b.force, int((want + 1) / 2)})
		}
	}
	if touched || o.RcvBufLock || o.SndBufLock {
		// Sized before connect, a buffer may already have the size
		// the application chose (the default one), unpinned.
		plan.lock = 0
		if o.RcvBufLock {
			plan.lock |= bufLockRcv
		}
		if o.SndBufLock {
			plan.lock |= bufLockSnd
		}
	}
	return plan, nil
}

// restoreBuffers carries out sizeBuffers' plan once the queues are in:
// queued data stays, and new writes wait until it drains below the limit,
// as they did on the source.
func restoreBuffers(fd int, plan bufPlan) error {
	for _, r := range plan.setBack {
		if err := setInt(fd, unix.SOL_SOCKET, r[0], r[1]); err != nil {
			return fmt.Errorf("setsockopt %d=%d: %w", r[0], r[1], err)
		}
	}
	if plan.lock >= 0 {
		if err := setInt(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK, plan.lock); err != nil {
			return fmt.Errorf("setsockopt SO_BUF_LOCK=%d: %w", plan.lock, err)
		}
	}
	return nil
}

// setLateSockopts applies the options of o that would hold up the
// (blocking) write of the unsent tail at Commit: TCP_NOTSENT_LOWAT, below
// which that write waits for the peer to take data (for ever, if its
// window is closed), and TCP_CORK. Commit sets them once the tail is
// queued.
func setLateSockopts(fd int, o *Sockopts) error {
	return setOpts(fd, []intOpt{
		{unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT, o.NotSentLowat, o.NotSentLowat == 0},
		{unix.SOL_TCP, unix.TCP_CORK, 1, !o.Cork},
	})
}

// intOpt is an integer socket option to set, unless skip (the socket has
// it already).
type intOpt struct {
	level, name int
	val         uint32
	skip        bool
}

// setOpts sets opts on fd, but those to skip.
func setOpts(fd int, opts []intOpt) error {
	for _, s := range opts {
		if s.skip {
			continue
		}
		if err := setInt(fd, s.level, s.name, int(s.val)); err != nil {
			return fmt.Errorf("setsockopt %d/%d=%d: %w", s.level, s.name, s.val, err)
		}
	}
	return nil
}

// bufLimits returns the largest receive and send buffers (as the kernel
// reports them) a socket on this host may have without FORCE: twice
// net.core.[rw]mem_max, or net.ipv4.tcp_[rw]mem's maximum, which
// autotuning may reach, if larger. Read once; 1 GiB where unreadable.
var bufLimits = sync.OnceValues(func() (rcv, snd int64) {
	read := func(path string, field int) int64 {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0
		}
		f := strings.Fields(string(b))
		if field >= len(f) {
			return 0
		}
		v, err := strconv.ParseInt(f[field], 10, 64)
		if err != nil {
			return 0
		}
		return v
	}
	limit := func(core, tcp string) int64 {
		l := max(2*read("/proc/sys/net/core/"+core, 0), read("/proc/sys/net/ipv4/"+tcp, 2))
		if l <= 0 {
			return 1 << 30
		}
		return l
	}
	return limit("rmem_max", "tcp_rmem"), limit("wmem_max", "tcp_wmem")
})

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

func addrPort(sa unix.Sockaddr) (netip.AddrPort, error) {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), nil
	case *unix.SockaddrInet6:
		a := netip.AddrFrom16(sa.Addr).Unmap()
		if sa.ZoneId != 0 {
			return netip.AddrPort{}, fmt.Errorf("link-local address with zone %d cannot be migrated", sa.ZoneId)
		}
		return netip.AddrPortFrom(a, uint16(sa.Port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%w: address %T", ErrNotTCP, sa)
}

// The socket options below never block for long (at most on the socket
// lock), so they use RawSyscall6, which skips the scheduler hand-off of a
// blocking system call: on the capture and restore hot path, some forty
// calls, that is a measurable share.

func getsockopt(fd, level, name int, p unsafe.Pointer, l *uint32) error {
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), uintptr(unsafe.Pointer(l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

func setsockopt(fd, level, name int, p unsafe.Pointer, l uintptr) error {
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), l, 0)
	if e != 0 {
		return e
	}
	return nil
}

func getInt(fd, level, name int) (int, error) {
	var v int32
	l := uint32(4)
	err := getsockopt(fd, level, name, unsafe.Pointer(&v), &l)
	return int(v), err
}

func setInt(fd, level, name, v int) error {
	x := int32(v)
	return setsockopt(fd, level, name, unsafe.Pointer(&x), 4)
}

package repair

// This file is the only place in the package that issues TCP_REPAIR socket
// options and the other getsockopt/setsockopt/ioctl calls; everything else
// speaks in State values.

import (
	"errors"
	"fmt"
	"net/netip"
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

// tcpInfoHead mirrors the first 8 bytes of struct tcp_info (linux/tcp.h):
// all that capture needs, and cheaper to copy than the whole struct.
type tcpInfoHead struct {
	state, caState, retransmits, probes, backoff, options uint8
	wscale                                                uint8 // snd_wscale:4 (low), rcv_wscale:4
	_                                                     uint8
}

// checkSocket refuses sockets TCP_REPAIR cannot migrate, naming why.
func checkSocket(fd int) (v6 bool, err error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return false, fmt.Errorf("SO_TYPE: %w", err)
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return false, fmt.Errorf("SO_PROTOCOL: %w", err)
	}
	if proto == unix.IPPROTO_MPTCP {
		return false, ErrMPTCP
	}
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return false, fmt.Errorf("SO_DOMAIN: %w", err)
	}
	if typ != unix.SOCK_STREAM || proto != unix.IPPROTO_TCP || (domain != unix.AF_INET && domain != unix.AF_INET6) {
		return false, fmt.Errorf("%w (domain %d, type %d, protocol %d)", ErrNotTCP, domain, typ, proto)
	}
	listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return false, fmt.Errorf("SO_ACCEPTCONN: %w", err)
	}
	if listening != 0 {
		return false, ErrListening
	}
	ulp, err := unix.GetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP)
	if err != nil && !errors.Is(err, unix.ENOPROTOOPT) {
		return false, fmt.Errorf("TCP_ULP: %w", err)
	}
	if ulp != "" {
		return false, fmt.Errorf("%w: %q", ErrULP, ulp)
	}
	return domain == unix.AF_INET6, nil
}

func repairOn(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
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
	if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR, v); err != nil {
		return fmt.Errorf("TCP_REPAIR off: %w", err)
	}
	return nil
}

func selectQueue(fd int, q repairQueue) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, int(q)); err != nil {
		return fmt.Errorf("TCP_REPAIR_QUEUE %d: %w", q, err)
	}
	return nil
}

// queueSeq returns TCP_QUEUE_SEQ of the selected queue: write_seq for the
// send queue, rcv_nxt for the receive queue.
func queueSeq(fd int) (uint32, error) {
	v, err := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_QUEUE_SEQ)
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
	if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_QUEUE_SEQ, int(int32(seq))); err != nil {
		return fmt.Errorf("TCP_QUEUE_SEQ %d: %w", q, err)
	}
	return nil
}

// queueLens returns the bytes in the receive queue, the send queue and the
// unsent part of the send queue (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD).
func queueLens(fd int) (inq, outq, notsent int, err error) {
	if inq, err = unix.IoctlGetInt(fd, unix.SIOCINQ); err != nil {
		return 0, 0, 0, fmt.Errorf("SIOCINQ: %w", err)
	}
	if outq, err = unix.IoctlGetInt(fd, unix.SIOCOUTQ); err != nil {
		return 0, 0, 0, fmt.Errorf("SIOCOUTQ: %w", err)
	}
	if notsent, err = unix.IoctlGetInt(fd, unix.SIOCOUTQNSD); err != nil {
		return 0, 0, 0, fmt.Errorf("SIOCOUTQNSD: %w", err)
	}
	return inq, outq, notsent, nil
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

// mssClamp returns TCP_MAXSEG, which in repair mode reports the MSS clamp
// negotiated in the handshake rather than the current MSS.
func mssClamp(fd int) (uint32, error) {
	v, err := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return 0, fmt.Errorf("TCP_MAXSEG: %w", err)
	}
	return uint32(v), nil
}

func timestamp(fd int) (uint32, error) {
	v, err := unix.GetsockoptInt(fd, unix.SOL_TCP, unix.TCP_TIMESTAMP)
	if err != nil {
		return 0, fmt.Errorf("TCP_TIMESTAMP: %w", err)
	}
	return uint32(v), nil
}

// setTimestamp makes the socket's TCP timestamp clock continue from ts
// (the kernel stores the offset to its own clock).
func setTimestamp(fd int, ts uint32) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_TCP, unix.TCP_TIMESTAMP, int(int32(ts))); err != nil {
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
func getSockopts(fd int, v6 bool) (Sockopts, error) {
	var o Sockopts
	var err error
	geti := func(level, opt int) uint32 {
		if err != nil {
			return 0
		}
		var v int
		v, err = unix.GetsockoptInt(fd, level, opt)
		if err != nil {
			err = fmt.Errorf("getsockopt %d/%d: %w", level, opt, err)
		}
		return uint32(v)
	}
	o.NoDelay = geti(unix.SOL_TCP, unix.TCP_NODELAY) != 0
	o.Cork = geti(unix.SOL_TCP, unix.TCP_CORK) != 0
	o.KeepAlive = geti(unix.SOL_SOCKET, unix.SO_KEEPALIVE) != 0
	o.KeepIdle = geti(unix.SOL_TCP, unix.TCP_KEEPIDLE)
	o.KeepIntvl = geti(unix.SOL_TCP, unix.TCP_KEEPINTVL)
	o.KeepCnt = geti(unix.SOL_TCP, unix.TCP_KEEPCNT)
	o.UserTimeout = geti(unix.SOL_TCP, unix.TCP_USER_TIMEOUT)
	o.RcvBuf = geti(unix.SOL_SOCKET, unix.SO_RCVBUF)
	o.SndBuf = geti(unix.SOL_SOCKET, unix.SO_SNDBUF)
	o.NotSentLowat = geti(unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT)
	if v6 {
		o.TOS = uint8(geti(unix.SOL_IPV6, unix.IPV6_TCLASS))
	} else {
		o.TOS = uint8(geti(unix.SOL_IP, unix.IP_TOS))
	}
	o.Mark = geti(unix.SOL_SOCKET, unix.SO_MARK)
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
// are handled by sizeBuffers.
func setSockopts(fd int, v6 bool, o *Sockopts) error {
	type opt struct {
		level, name int
		val         uint32
		skip        bool
	}
	b2i := func(b bool) uint32 {
		if b {
			return 1
		}
		return 0
	}
	tosLevel, tosName := unix.SOL_IP, unix.IP_TOS
	if v6 {
		tosLevel, tosName = unix.SOL_IPV6, unix.IPV6_TCLASS
	}
	for _, s := range [...]opt{
		{unix.SOL_TCP, unix.TCP_NODELAY, b2i(o.NoDelay), !o.NoDelay},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, b2i(o.KeepAlive), !o.KeepAlive},
		{unix.SOL_TCP, unix.TCP_KEEPIDLE, o.KeepIdle, o.KeepIdle == 0},
		{unix.SOL_TCP, unix.TCP_KEEPINTVL, o.KeepIntvl, o.KeepIntvl == 0},
		{unix.SOL_TCP, unix.TCP_KEEPCNT, o.KeepCnt, o.KeepCnt == 0},
		{unix.SOL_TCP, unix.TCP_USER_TIMEOUT, o.UserTimeout, o.UserTimeout == 0},
		{unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT, o.NotSentLowat, o.NotSentLowat == 0},
		{tosLevel, tosName, uint32(o.TOS), o.TOS == 0},
		{unix.SOL_SOCKET, unix.SO_MARK, o.Mark, o.Mark == 0},
		{unix.SOL_SOCKET, unix.SO_PRIORITY, o.Priority, o.Priority == 0},
		{unix.SOL_TCP, unix.TCP_CORK, b2i(o.Cork), !o.Cork},
	} {
		if s.skip {
			continue
		}
		if err := unix.SetsockoptInt(fd, s.level, s.name, int(s.val)); err != nil {
			return fmt.Errorf("setsockopt %d/%d=%d: %w", s.level, s.name, s.val, err)
		}
	}
	if o.Congestion != "" {
		cur, err := unix.GetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION)
		if err != nil {
			return fmt.Errorf("TCP_CONGESTION: %w", err)
		}
		if cur != o.Congestion {
			if err := unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION, o.Congestion); err != nil {
				return fmt.Errorf("TCP_CONGESTION %q (is its module loaded on this host?): %w", o.Congestion, err)
			}
		}
	}
	return nil
}

// undoGoDefaults re-applies the options that net.FileConn overrides: Go
// turns TCP_NODELAY and keepalive (15 s) on for every TCP connection it
// wraps, whatever the application had chosen.
func undoGoDefaults(fd int, o *Sockopts) error {
	b2i := func(b bool) int {
		if b {
			return 1
		}
		return 0
	}
	for _, s := range [...][3]int{
		{unix.SOL_TCP, unix.TCP_NODELAY, b2i(o.NoDelay)},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, b2i(o.KeepAlive)},
		{unix.SOL_TCP, unix.TCP_KEEPIDLE, int(o.KeepIdle)},
		{unix.SOL_TCP, unix.TCP_KEEPINTVL, int(o.KeepIntvl)},
		{unix.SOL_TCP, unix.TCP_KEEPCNT, int(o.KeepCnt)},
	} {
		if s[2] == 0 && s[1] != unix.TCP_NODELAY && s[1] != unix.SO_KEEPALIVE {
			continue
		}
		if err := unix.SetsockoptInt(fd, s[0], s[1], s[2]); err != nil {
			return fmt.Errorf("setsockopt %d/%d=%d: %w", s[0], s[1], s[2], err)
		}
	}
	return nil
}

// sizeBuffers makes the buffers large enough for the queues about to be
// injected (the kernel refuses queue data beyond them) and at least as large
// as they were on the source, so the restored window fits. Setting a size
// pins it, like setsockopt(SO_RCVBUF) does, so it is only done when needed.
// The FORCE variants ignore net.core.[rw]mem_max (CAP_NET_ADMIN).
func sizeBuffers(fd int, st *State) error {
	const slack = 256 << 10
	for _, b := range [...]struct {
		get, force int
		want       uint32
		queued     int
	}{
		{unix.SO_RCVBUF, unix.SO_RCVBUFFORCE, st.Sockopts.RcvBuf, len(st.RecvQueue)},
		{unix.SO_SNDBUF, unix.SO_SNDBUFFORCE, st.Sockopts.SndBuf, len(st.SendQueue)},
	} {
		cur, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, b.get)
		if err != nil {
			return fmt.Errorf("getsockopt %d: %w", b.get, err)
		}
		// The kernel doubles what setsockopt asks for and reports the
		// doubled value; queued data costs about twice its size.
		need := max(int64(b.want), 2*int64(b.queued)+slack)
		if b.queued == 0 {
			need = int64(b.want)
		}
		if need <= int64(cur) {
			continue
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, b.force, int(min(need/2+1, 1<<30))); err != nil {
			return fmt.Errorf("setsockopt %d=%d: %w", b.force, need/2, err)
		}
	}
	return nil
}

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

func getsockopt(fd, level, name int, p unsafe.Pointer, l *uint32) error {
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), uintptr(unsafe.Pointer(l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

func setsockopt(fd, level, name int, p unsafe.Pointer, l uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), l, 0)
	if e != 0 {
		return e
	}
	return nil
}

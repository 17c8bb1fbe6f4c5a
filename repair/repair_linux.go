package repair

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Frozen is a socket in repair mode: the application can neither read nor
// write it, new data is not transmitted, and closing it sends neither FIN
// nor RST. The kernel still processes segments that reach it and its timers
// may still emit ACKs or retransmissions, so the caller holds the flow (see
// nat/) for as long as it is frozen.
type Frozen struct {
	c    syscall.Conn
	rc   syscall.RawConn
	done bool
}

// Freeze puts the connection c (typically a *net.TCPConn) into repair mode
// after checking that it can be migrated. c must stay open until the Frozen
// is thawed or discarded.
func Freeze(c syscall.Conn) (*Frozen, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, opErr("freeze", err)
	}
	err = control(rc, func(fd int) error {
		if _, err := checkSocket(fd); err != nil {
			return err
		}
		return repairOn(fd)
	})
	if err != nil {
		return nil, opErr("freeze", err)
	}
	return &Frozen{c: c, rc: rc}, nil
}

// Capture reads the frozen connection's complete state. It can be called
// more than once; the socket stays frozen.
func (f *Frozen) Capture() (*State, error) {
	if f.done {
		return nil, opErr("capture", ErrDone)
	}
	var st *State
	err := control(f.rc, func(fd int) (err error) {
		st, err = capture(fd)
		return err
	})
	if err != nil {
		return nil, opErr("capture", err)
	}
	return st, nil
}

// Thaw leaves repair mode: the connection carries on where it was, as if it
// had never been frozen. This is the abort path of a migration.
func (f *Frozen) Thaw() error {
	if f.done {
		return opErr("thaw", ErrDone)
	}
	f.done = true
	return opErr("thaw", control(f.rc, func(fd int) error { return repairOff(fd, false) }))
}

// Discard closes the frozen socket. In repair mode the kernel tears the
// connection down without sending FIN or RST, so the peer notices nothing;
// this is the commit path at the source. If other descriptors refer to the
// same socket (another process's, or a dup), the socket lives on until they
// are closed too.
func (f *Frozen) Discard() error {
	if f.done {
		return opErr("discard", ErrDone)
	}
	f.done = true
	cl, ok := f.c.(io.Closer)
	if !ok {
		return opErr("discard", fmt.Errorf("%T cannot be closed", f.c))
	}
	return opErr("discard", cl.Close())
}

func control(rc syscall.RawConn, fn func(fd int) error) error {
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// capture reads a socket already in repair mode.
func capture(fd int) (*State, error) {
	info, err := infoHead(fd)
	if err != nil {
		return nil, err
	}
	st := &State{TCPState: TCPState(info.state)}
	if !st.TCPState.migratable() {
		return nil, fmt.Errorf("%w: %v", ErrState, st.TCPState)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return nil, fmt.Errorf("getsockname: %w", err)
	}
	if st.Local, err = addrPort(sa); err != nil {
		return nil, err
	}
	if sa, err = unix.Getpeername(fd); err != nil {
		return nil, fmt.Errorf("getpeername: %w", err)
	}
	if st.Remote, err = addrPort(sa); err != nil {
		return nil, err
	}

	inq, outq, notsent, err := queueLens(fd)
	if err != nil {
		return nil, err
	}
	// A queued FIN occupies one sequence number, and SIOCOUTQ/SIOCOUTQNSD
	// count it; it carries no data. SIOCINQ already leaves the inbound FIN
	// out.
	if st.TCPState.outboundFIN() {
		if outq > 0 {
			outq--
		}
		if notsent > 0 {
			notsent--
		}
	}
	st.Unsent = uint32(notsent)

	opts := TCPOptions(info.options) & knownOptions
	st.Options = opts
	if opts&OptWindowScale != 0 {
		st.SndWScale, st.RcvWScale = info.wscale&0xf, info.wscale>>4
	}
	if st.MSS, err = mssClamp(fd); err != nil {
		return nil, err
	}
	if opts&OptTimestamps != 0 {
		if st.Timestamp, err = timestamp(fd); err != nil {
			return nil, err
		}
	}
	if st.Window, err = window(fd); err != nil {
		return nil, err
	}
	if st.Sockopts, err = getSockopts(fd, st.Local.Addr().Is6()); err != nil {
		return nil, err
	}

	// Segments still reach a frozen socket unless the flow is held: ACKs
	// shrink the send queue, data grows the receive queue. Each queue is
	// read between two reads of its sequence number and taken only if they
	// agree, so queue and sequence number always belong together.
	rcvNxt, recvQ, err := readQueue(fd, queueRecv, inq)
	if err != nil {
		return nil, err
	}
	writeSeq, sendQ, err := readQueue(fd, queueSend, outq)
	if err != nil {
		return nil, err
	}
	st.RecvQueue, st.SendQueue = recvQ, sendQ
	if int(st.Unsent) > len(sendQ) {
		return nil, fmt.Errorf("send queue holds %d bytes but %d are unsent", len(sendQ), st.Unsent)
	}
	if st.TCPState.inboundFIN() {
		rcvNxt--
	}
	if st.TCPState.outboundFIN() {
		writeSeq--
	}
	// The send queue may start before snd_una (the head segment can be
	// partly acknowledged); restoring from its first byte only means the
	// peer sees those bytes again and drops them as duplicates.
	st.RecvSeq = rcvNxt - uint32(len(recvQ))
	st.SendSeq = writeSeq - uint32(len(sendQ))
	if err := selectQueue(fd, queueNone); err != nil {
		return nil, err
	}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("captured state is inconsistent: %w", err)
	}
	return st, nil
}

// Restored is a socket rebuilt from a State, still in repair mode: it has
// its queues and sequence numbers but has sent nothing. [Restored.Commit]
// brings it to life; [Restored.Abort] throws it away silently.
type Restored struct {
	fd     int
	raw    int // raw socket for injecting the peer's FIN, or -1
	st     *State
	local  netip.AddrPort
	remote netip.AddrPort
}

// Restore builds a new socket from st in the calling thread's network
// namespace. The local address must be local to the host (bindable); the
// socket binds to it even if another socket uses the port, because repair
// mode forces address reuse.
func Restore(st *State, o RestoreOptions) (*Restored, error) {
	if err := st.Validate(); err != nil {
		return nil, opErr("restore", err)
	}
	r := &Restored{fd: -1, raw: -1, st: st, local: st.Local, remote: st.Remote}
	if o.Local.IsValid() {
		r.local = o.Local
	}
	if o.Remote.IsValid() {
		r.remote = o.Remote
	}
	if r.local.Addr().Is4() != r.remote.Addr().Is4() || r.local.Addr().Is4() != st.Local.Addr().Is4() {
		return nil, opErr("restore", fmt.Errorf("address family mismatch: %v -> %v for a %v connection", r.local, r.remote, st.Local))
	}
	domain := unix.AF_INET
	if r.local.Addr().Is6() {
		domain = unix.AF_INET6
	}
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, opErr("restore: socket", err)
	}
	r.fd = fd
	err = r.build()
	if err == nil && st.TCPState.inboundFIN() {
		// Made now, in the namespace of the restore, so that Commit can
		// run on any thread.
		r.raw, err = rawSocket(domain)
	}
	if err != nil {
		unix.Close(fd) // in repair mode: nothing is sent
		return nil, opErr("restore", err)
	}
	return r, nil
}

// build follows the order the kernel requires (see DESIGN.md): repair on,
// sequence numbers while CLOSED, bind, connect (no SYN in repair mode),
// negotiated options, timestamp, receive queue, the sent part of the send
// queue, then the window, which the kernel checks against rcv_nxt.
func (r *Restored) build() error {
	fd, st := r.fd, r.st
	if err := repairOn(fd); err != nil {
		return err
	}
	if err := sizeBuffers(fd, st); err != nil {
		return err
	}
	if err := setQueueSeq(fd, queueRecv, st.RecvSeq); err != nil {
		return err
	}
	if err := setQueueSeq(fd, queueSend, st.SendSeq); err != nil {
		return err
	}
	if err := unix.Bind(fd, sockaddr(r.local)); err != nil {
		return fmt.Errorf("bind %v: %w", r.local, err)
	}
	if err := unix.Connect(fd, sockaddr(r.remote)); err != nil {
		return fmt.Errorf("connect %v: %w", r.remote, err)
	}
	if err := setRepairOptions(fd, st); err != nil {
		return err
	}
	if st.Options&OptTimestamps != 0 {
		if err := setTimestamp(fd, st.Timestamp); err != nil {
			return err
		}
	}
	if err := writeQueue(fd, queueRecv, st.RecvQueue); err != nil {
		return err
	}
	if err := writeQueue(fd, queueSend, st.SendQueue[:len(st.SendQueue)-int(st.Unsent)]); err != nil {
		return err
	}
	win := st.Window
	// rcv_wup may point past the inbound FIN, which is not restored until
	// commit: pull it back to rcv_nxt and widen the window by as much, so
	// the right edge the peer was promised stays where it was.
	rcvNxt := st.RecvSeq + uint32(len(st.RecvQueue))
	if d := int32(win.RcvWup - rcvNxt); d > 0 {
		win.RcvWup = rcvNxt
		win.RcvWnd += uint32(d)
	}
	if err := setWindow(fd, win); err != nil {
		return err
	}
	if err := selectQueue(fd, queueNone); err != nil {
		return err
	}
	return setSockopts(fd, r.local.Addr().Is6(), &st.Sockopts)
}

// Local returns the restored socket's local address.
func (r *Restored) Local() netip.AddrPort { return r.local }

// Remote returns the restored socket's peer address.
func (r *Restored) Remote() netip.AddrPort { return r.remote }

// Commit leaves repair mode and completes the connection: it sends the
// unsent tail of the send queue, replays the FINs of a half-closed
// connection in the order its state needs, and returns the live connection.
// The kernel's window probe on leaving repair mode makes the peer answer at
// once, so lost segments are retransmitted without waiting for a timer.
func (r *Restored) Commit() (*net.TCPConn, error) {
	if r.fd < 0 {
		return nil, opErr("commit", ErrDone)
	}
	fd, st := r.fd, r.st
	r.fd = -1
	if r.raw >= 0 {
		defer unix.Close(r.raw)
	}
	fail := func(err error) (*net.TCPConn, error) {
		unix.Close(fd)
		return nil, opErr("commit", err)
	}
	if err := repairOff(fd, true); err != nil {
		return fail(err)
	}
	if st.Unsent > 0 {
		if err := writeQueue(fd, queueNone, st.SendQueue[len(st.SendQueue)-int(st.Unsent):]); err != nil {
			return fail(err)
		}
	}
	// LAST_ACK: the peer's FIN came first (CLOSE_WAIT), then ours.
	// CLOSING: ours went first (FIN_WAIT1), then the peer's crossed it.
	switch st.TCPState {
	case StateCloseWait:
		if err := injectFIN(r); err != nil {
			return fail(err)
		}
	case StateLastAck:
		if err := injectFIN(r); err != nil {
			return fail(err)
		}
		if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
			return fail(fmt.Errorf("shutdown: %w", err))
		}
	case StateFinWait1, StateFinWait2, StateClosing:
		if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
			return fail(fmt.Errorf("shutdown: %w", err))
		}
		if st.TCPState == StateClosing {
			if err := injectFIN(r); err != nil {
				return fail(err)
			}
		}
	}
	f := os.NewFile(uintptr(fd), "tcp:"+r.local.String()+"->"+r.remote.String())
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, opErr("commit", err)
	}
	tc := c.(*net.TCPConn)
	rc, err := tc.SyscallConn()
	if err == nil {
		err = control(rc, func(fd int) error { return undoGoDefaults(fd, &st.Sockopts) })
	}
	if err != nil {
		tc.Close()
		return nil, opErr("commit", err)
	}
	return tc, nil
}

// Abort closes the restored socket while still in repair mode, so nothing
// reaches the peer.
func (r *Restored) Abort() error {
	if r.fd < 0 {
		return opErr("abort", ErrDone)
	}
	fd := r.fd
	r.fd = -1
	if r.raw >= 0 {
		unix.Close(r.raw)
	}
	return opErr("abort", unix.Close(fd))
}

// readQueue returns a consistent sequence number and content of queue q;
// hint is the queue's length as last seen. It retries while segments keep
// changing the queue under it.
func readQueue(fd int, q repairQueue, hint int) (uint32, []byte, error) {
	if err := selectQueue(fd, q); err != nil {
		return 0, nil, err
	}
	for range 100 {
		seq, err := queueSeq(fd)
		if err != nil {
			return 0, nil, err
		}
		data, err := peekQueue(fd, q, hint)
		if err != nil {
			return 0, nil, err
		}
		again, err := queueSeq(fd)
		if err != nil {
			return 0, nil, err
		}
		if again == seq {
			return seq, data, nil
		}
		hint = len(data) + int(again-seq)
	}
	return 0, nil, fmt.Errorf("queue %d keeps changing: the flow is not held while frozen", q)
}

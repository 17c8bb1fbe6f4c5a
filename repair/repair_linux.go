package repair

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

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
	// sinceData is how long before the last Capture data last came in,
	// and gotData whether any came in over the socket's own life.
	sinceData time.Duration
	gotData   bool
	// quiet: Quiet was called, with the bit quietBit; marked: the
	// application's mark, mark, has that bit added. Just before,
	// tcpi_bytes_received was at most markedRecv and rcv_wup was
	// markedWup.
	quiet, marked bool
	quietBit      uint32
	mark          uint32
	markedRecv    uint64
	markedWup     uint32
}

// InRepair reports whether the socket of c is in repair mode: frozen by
// another holder of it (mtcpd, for an application's connection), its
// reads and writes fail until it is thawed.
func InRepair(c syscall.Conn) (bool, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return false, opErr("in repair", err)
	}
	var v int
	err = control(rc, func(fd int) (err error) {
		v, err = getInt(fd, unix.SOL_TCP, unix.TCP_REPAIR)
		return err
	})
	return v != 0, opErr("in repair", err)
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
		if err := checkSocket(fd); err != nil {
			return err
		}
		if err := repairOn(fd); err != nil {
			return freezeError(fd, err)
		}
		return nil
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
	// A net.TCPConn already knows its addresses: asking the kernel again
	// costs two system calls on the hot path.
	var local, remote netip.AddrPort
	if tc, ok := f.c.(*net.TCPConn); ok {
		local, remote = tcpAddrPortOf(tc.LocalAddr()), tcpAddrPortOf(tc.RemoteAddr())
	}
	var st *State
	err := control(f.rc, func(fd int) (err error) {
		// A segment that changes the state (a FIN) can reach the frozen
		// socket while it is read: then it is read again.
		for try := 0; ; try++ {
			info, err := infoHead(fd)
			if err != nil {
				return err
			}
			f.sinceData = time.Duration(info.lastDataRecv) * time.Millisecond
			f.gotData = info.dataSegsIn > 0
			st, err = captureState(fd, info, local, remote, f)
			// No queue selected once read: with the send queue
			// selected, the kernel takes an arriving acknowledgement as
			// the cue to count unsent data as sent, without sending it
			// (tcp_write_xmit in repair mode), which a Thaw or a second
			// Capture would then miss.
			if qerr := selectQueue(fd, queueNone); err == nil {
				err = qerr
			}
			if !errors.Is(err, errStateChanged) || try == 2 {
				return err
			}
		}
	})
	if err != nil {
		return nil, opErr("capture", err)
	}
	return st, nil
}

// markQuiet adds the quiet bit to the socket's mark, once. recv (tcpi_bytes_received)
// and wup (rcv_wup) were read before: segments counted after recv may have
// gone unacknowledged, and so may the ones before rcv_nxt if rcv_wup lags
// it (a delayed acknowledgement still to come).
func (f *Frozen) markQuiet(fd int, recv uint64, wup uint32) error {
	if f.marked {
		return nil
	}
	m, err := getInt(fd, unix.SOL_SOCKET, unix.SO_MARK)
	if err != nil {
		return fmt.Errorf("SO_MARK: %w", err)
	}
	if err := setInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(int32(uint32(m)|f.quietBit))); err != nil {
		return fmt.Errorf("SO_MARK: %w", err)
	}
	// The bits as the kernel keeps them (getInt gives an int32's value).
	f.marked, f.mark, f.markedRecv, f.markedWup = true, uint32(m), recv, wup
	return nil
}

// Quiet has the bit m.Quiet (zero: DefaultMarks') added to the frozen
// socket's mark (SO_MARK) from its next Capture on, before the capture
// reads its queues, so that a firewall rule like package nat's drops
// whatever it still sends, until Thaw sets the application's mark back
// (Capture reports that one).
//
// A socket in repair mode still takes in the segments that reach it and
// acknowledges them. Those that arrive after the capture are not in the
// captured state: acknowledged, the peer would never send them again, and
// they would be lost. The steering point's hold stops new ones, but some
// may still be on their way to the source when it captures. Quiet, the
// socket's acknowledgements go nowhere, and the peer resends what they
// would have covered to wherever the connection lives by then. Captured
// data that came in once the mark was on is flagged State.AckPending.
//
// On Thaw, what the socket took in while quiet is the peer's to resend
// too: the socket acknowledges it when the next segment comes.
func (f *Frozen) Quiet(m Marks) error {
	if f.done {
		return opErr("quiet", ErrDone)
	}
	if err := m.Check(); err != nil {
		return opErr("quiet", err)
	}
	f.quiet, f.quietBit = true, m.OrDefault().Quiet
	return nil
}

// SinceData reports how long before the last Capture the socket last
// received data from its peer (tcpi_last_data_recv; the kernel counts in
// jiffies, so the resolution is a few milliseconds). A short time means
// the peer was sending when the connection froze, and more of its data
// may be on its way. ok is false if the socket has taken in no data
// segment of its own (tcpi_data_segs_in is zero), as a restored socket
// before its peer sends again: the kernel then counts from the restore.
// Before the first Capture it returns 0, false.
func (f *Frozen) SinceData() (d time.Duration, ok bool) { return f.sinceData, f.gotData }

// Thaw leaves repair mode: the connection carries on where it was, as if it
// had never been frozen. This is the abort path of a migration.
func (f *Frozen) Thaw() error {
	if f.done {
		return opErr("thaw", ErrDone)
	}
	f.done = true
	return opErr("thaw", control(f.rc, func(fd int) error {
		var merr error
		if f.marked {
			if err := setInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(f.mark)); err != nil {
				merr = fmt.Errorf("SO_MARK: %w", err)
			}
		}
		// Out of repair mode whatever the mark: a socket left frozen
		// would be lost to its application.
		return errors.Join(merr, repairOff(fd, false))
	}))
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

// tcpAddrPortOf converts a Go TCP address; a zoned (link-local) or
// missing address gives the zero value, and capture asks the kernel.
func tcpAddrPortOf(a net.Addr) netip.AddrPort {
	ta, ok := a.(*net.TCPAddr)
	if !ok || ta.Zone != "" {
		return netip.AddrPort{}
	}
	ap := ta.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// captureState reads a socket already in repair mode, whose tcp_info head
// is info. local and remote are the socket's addresses if the caller knows
// them, zero otherwise. If f.quiet, the socket is marked quiet before its
// queues are read, and the state says whether an acknowledgement may be
// owed (AckPending).
func captureState(fd int, info tcpInfoHead, local, remote netip.AddrPort, f *Frozen) (*State, error) {
	var err error
	st := &State{TCPState: TCPState(info.state)}
	if !st.TCPState.migratable() {
		return nil, fmt.Errorf("%w: %v", ErrState, st.TCPState)
	}
	st.Local, st.Remote = local, remote
	if !local.IsValid() || !remote.IsValid() {
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
	}

	opts := TCPOptions(info.options) & knownOptions
	st.Options = opts
	if opts&OptWindowScale != 0 {
		st.SndWScale, st.RcvWScale = wscales(info.wscale, littleEndian)
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
	if f.quiet {
		if err := f.markQuiet(fd, info.bytesReceived, st.Window.RcvWup); err != nil {
			return nil, err
		}
	}

	// Segments still reach a frozen socket unless the flow is held: ACKs
	// shrink the send queue, data grows the receive queue. readQueue
	// returns each queue with the sequence number that goes with it.
	rcvNxt, recvQ, err := readQueue(fd, queueRecv)
	if err != nil {
		return nil, err
	}
	writeSeq, sendQ, unsent, err := readSendQueue(fd, st.TCPState.outboundFIN())
	if err != nil {
		return nil, err
	}
	st.RecvQueue, st.SendQueue, st.Unsent = recvQ, sendQ, unsent
	if st.Sockopts, err = getSockopts(fd, st.Local.Addr().Is6(), len(recvQ)+len(sendQ) > 0, f.mark, f.marked); err != nil {
		return nil, err
	}
	// Read after the queues. Their sequence numbers go with the state
	// read first only if no FIN came in meanwhile.
	after, err := infoHead(fd)
	if err != nil {
		return nil, err
	}
	if after.state != info.state {
		return nil, fmt.Errorf("%w: %v, then %v", errStateChanged, TCPState(info.state), TCPState(after.state))
	}
	if f.marked {
		// Anything counted now beyond what had come in before the mark
		// went on is unacknowledged, whether the queues have it or it
		// came too late for them; so is what rcv_wup lagged behind then.
		st.AckPending = after.bytesReceived > f.markedRecv || f.markedWup != rcvNxt
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
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("captured state is inconsistent: %w", err)
	}
	return st, nil
}

// errStateChanged: the socket's TCP state changed while it was captured.
var errStateChanged = errors.New("the connection's state changed during the capture")

// Restored is a socket rebuilt from a State, still in repair mode: it has
// its queues and sequence numbers but has sent nothing. [Restored.Commit]
// brings it to life, after which [Restored.File] or [Restored.Conn] hands
// it over; [Restored.Abort] throws it away (silently, before Commit).
type Restored struct {
	fd        int
	inj       *Injector // for the peer's FIN and a quiet socket's acknowledgement
	ownInj    bool      // inj is this socket's own, closed with it
	committed bool
	quiet     bool // marked with marks.Quiet until Commit
	marks     Marks
	bufs      bufPlan // buffer sizes and locks to set back after commit
	st        *State
	local     netip.AddrPort
	remote    netip.AddrPort
}

// Restore builds a new socket from st in the calling thread's network
// namespace. The local address must be local to the host (bindable); the
// socket binds to it even if another socket uses the port, because repair
// mode forces address reuse.
func Restore(st *State, o RestoreOptions) (r *Restored, err error) {
	// The blank is ours whatever happens: closed if refused before it is
	// used.
	defer func() {
		if err != nil && o.Blank != nil && o.Blank.fd >= 0 {
			o.Blank.Close()
		}
	}()
	if err := st.Validate(); err != nil {
		return nil, opErr("restore", err)
	}
	if err := o.Marks.Check(); err != nil {
		return nil, opErr("restore", err)
	}
	marks := o.Marks.OrDefault()
	if err := marks.checkMark(st); err != nil {
		return nil, opErr("restore", err)
	}
	r = &Restored{fd: -1, st: st, local: st.Local, remote: st.Remote, quiet: o.Quiet, marks: marks, inj: o.Injector}
	if o.Local.IsValid() {
		r.local = o.Local
	}
	if o.Remote.IsValid() {
		r.remote = o.Remote
	}
	for _, ap := range []netip.AddrPort{r.local, r.remote} {
		if ap.Addr().Is4In6() || ap.Addr().Zone() != "" || ap.Port() == 0 {
			return nil, opErr("restore", fmt.Errorf("address %v: want a plain IPv4 or IPv6 address and a port", ap))
		}
	}
	if r.local.Addr().Is4() != r.remote.Addr().Is4() || r.local.Addr().Is4() != st.Local.Addr().Is4() {
		return nil, opErr("restore", fmt.Errorf("address family mismatch: %v -> %v for a %v connection", r.local, r.remote, st.Local))
	}
	domain := unix.AF_INET
	if r.local.Addr().Is6() {
		domain = unix.AF_INET6
	}
	b := o.Blank
	if b == nil {
		var err error
		if b, err = NewBlank(domain == unix.AF_INET6); err != nil {
			return nil, opErr("restore", err)
		}
	} else if b.fd < 0 || b.v6 != (domain == unix.AF_INET6) {
		return nil, opErr("restore", fmt.Errorf("blank socket is used up or of the wrong family"))
	}
	fd := b.fd
	b.fd = -1 // the Restored owns it now, whatever happens
	r.fd = fd
	err = r.build()
	if err == nil && r.inj == nil && (st.TCPState.inboundFIN() || st.TCPState == StateFinWait2 || r.quiet || st.AckPending) {
		// Made now, in the namespace of the restore, so that Commit can
		// run on any thread.
		r.inj, err = newInjector(domain == unix.AF_INET6, marks.Inject)
		r.ownInj = err == nil
	}
	if err == nil && finAtRestore(st) {
		err = r.finSent()
	}
	if err != nil {
		if r.ownInj {
			r.inj.Close()
		}
		unix.Close(fd) // in repair mode: nothing is sent
		return nil, opErr("restore", err)
	}
	return r, nil
}

// finAtRestore tells whether our FIN is put in at Restore (finSent)
// rather than at Commit: when it follows the data sent, in FIN_WAIT1 and
// FIN_WAIT2. A FIN_WAIT1 socket with data it had not sent yet takes its
// FIN after that data, written at Commit (its peer cannot have the FIN).
func finAtRestore(st *State) bool {
	return st.TCPState == StateFinWait2 || (st.TCPState == StateFinWait1 && st.Unsent == 0)
}

// finSent brings a socket whose FIN had gone out (FIN_WAIT1, FIN_WAIT2),
// rebuilt ESTABLISHED, to its state while it is still in repair mode.
// Shut down in repair mode, with the send queue selected, the socket
// counts the FIN as sent without sending it (FIN_WAIT1): like the rest of
// its send queue, it goes out again only if the peer turns out not to
// have it. In FIN_WAIT2 the peer has acknowledged it: an injected
// acknowledgement moves the socket on. Shut down once out of repair mode,
// the FIN would go to the peer again: a duplicate, and with IPv6 one
// whose new flow label makes Linux peers change their own (a duplicate
// with another label reads as a path failure).
//
// Done here rather than at Commit: a peer that has our FIN acknowledges
// it in every segment, and one that reaches the socket between the
// switch and the commit (the peer's data, its FIN) would acknowledge what
// a socket without the FIN never sent, which the kernel discards; the
// peer would send it again only after its retransmission timeout.
func (r *Restored) finSent() error {
	h, err := infoHead(r.fd)
	if err != nil {
		return err
	}
	if TCPState(h.state) != StateEstablished {
		return fmt.Errorf("%v socket rebuilt as %v, not ESTABLISHED", r.st.TCPState, TCPState(h.state))
	}
	if err := selectQueue(r.fd, queueSend); err != nil {
		return err
	}
	if err := unix.Shutdown(r.fd, unix.SHUT_WR); err != nil {
		return fmt.Errorf("shutdown in repair mode: %w", err)
	}
	if r.st.TCPState == StateFinWait2 {
		return ourFINAcked(r)
	}
	return nil
}

// Blank is a new TCP socket already in repair mode, made ahead of a restore
// — in the prepare phase of a migration — so that creating it stays off the
// critical path while the connection is frozen. A Blank is used by one
// Restore (RestoreOptions.Blank), which takes it over even if it fails.
type Blank struct {
	fd int
	v6 bool
}

// NewBlank makes a blank socket for an IPv6 (v6) or IPv4 connection in the
// calling thread's network namespace. The socket is blocking, so that
// Restored.File hands over a plain descriptor that needs no poller;
// restore sizes the buffers so that no write during restore or commit has
// to wait.
func NewBlank(v6 bool) (*Blank, error) {
	domain := unix.AF_INET
	if v6 {
		domain = unix.AF_INET6
	}
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, opErr("blank: socket", err)
	}
	if err := repairOn(fd); err != nil {
		unix.Close(fd)
		return nil, opErr("blank", err)
	}
	return &Blank{fd: fd, v6: v6}, nil
}

// Close releases a blank socket that was not used.
func (b *Blank) Close() error {
	if b.fd < 0 {
		return nil
	}
	fd := b.fd
	b.fd = -1
	return opErr("blank: close", unix.Close(fd))
}

// maxUserMSS is the largest TCP_MAXSEG the kernel accepts
// (MAX_TCP_WINDOW).
const maxUserMSS = 32767

// connectMSS is the user MSS that makes connect size a restored socket's
// segments as the kernel sized the original's: the negotiated clamp,
// bounded to half the largest window the peer offered (the kernel's
// tcp_bound_to_half_wnd; segments larger than the window would never
// leave), within what TCP_MAXSEG accepts.
func connectMSS(st *State) int {
	mss := int(st.MSS)
	if w := int(st.Window.MaxWindow); w > 0 {
		cut := w
		if w > 536 {
			cut = w / 2
		}
		mss = min(mss, cut)
	}
	return max(min(mss, maxUserMSS), 88)
}

// build follows the order the kernel requires (see DESIGN.md): repair on
// (done by NewBlank), sequence numbers while CLOSED, bind, connect (no SYN in repair mode),
// negotiated options, timestamp, receive queue, the sent part of the send
// queue, then the window, which the kernel checks against rcv_nxt.
func (r *Restored) build() error {
	fd, st := r.fd, r.st
	bufs, err := sizeBuffers(fd, st)
	if err != nil {
		return err
	}
	if err := setQueueSeq(fd, queueRecv, st.RecvSeq); err != nil {
		return err
	}
	if err := setQueueSeq(fd, queueSend, st.SendSeq); err != nil {
		return err
	}
	// Before connect, which looks the route up with the socket's mark
	// and TOS (fwmark routing): the mtcp quiet bit goes on after it.
	if err := setSockopts(fd, r.local.Addr().Is6(), &st.Sockopts); err != nil {
		return err
	}
	if err := unix.Bind(fd, sockaddr(r.local)); err != nil {
		return fmt.Errorf("bind %v: %w", r.local, err)
	}
	// connect sizes the socket's segments (from the route's MTU and the
	// MSS clamp) once and for all; the clamp set with the repair options
	// afterwards does not resize them. Without this the connection would
	// send default-sized segments (536 bytes less options) forever. The
	// negotiated clamp goes in as a user MSS for connect, which is then
	// cleared: the application never set one. (The kernel takes user
	// MSSes up to 32767; loopback's clamp is larger.)
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_MAXSEG, connectMSS(st)); err != nil {
		return fmt.Errorf("TCP_MAXSEG %d: %w", connectMSS(st), err)
	}
	if err := unix.Connect(fd, sockaddr(r.remote)); err != nil {
		return fmt.Errorf("connect %v: %w", r.remote, err)
	}
	if err := setInt(fd, unix.SOL_TCP, unix.TCP_MAXSEG, 0); err != nil {
		return fmt.Errorf("TCP_MAXSEG 0: %w", err)
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
	// the right edge the peer was promised stays where it was. It may lag
	// rcv_nxt (an acknowledgement was still delayed at the capture): bring
	// it up to rcv_nxt and narrow the window by as much, same right edge,
	// or the stale acknowledgement injected at commit (rcv_nxt-1, not
	// before a lagging rcv_wup) would be taken as a new one and answered
	// with nothing.
	rcvNxt := st.RecvSeq + uint32(len(st.RecvQueue))
	switch d := int32(win.RcvWup - rcvNxt); {
	case d > 0:
		win.RcvWup = rcvNxt
		win.RcvWnd += uint32(d)
	case d < 0:
		win.RcvWup = rcvNxt
		win.RcvWnd -= min(win.RcvWnd, uint32(-d))
	}
	if err := setWindow(fd, win); err != nil {
		return err
	}
	r.bufs = bufs
	if r.quiet {
		if err := setInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(int32(st.Sockopts.Mark|r.marks.Quiet))); err != nil {
			return fmt.Errorf("SO_MARK (quiet): %w", err)
		}
	}
	return nil
}

// Sockopts returns the socket options the restored socket has, as its
// State gave them, but for TCP_NODELAY and keepalive, which only Conn
// sets (Go's own defaults get in their way): a caller of File sets them
// itself.
func (r *Restored) Sockopts() Sockopts { return r.st.Sockopts }

// Local returns the restored socket's local address.
func (r *Restored) Local() netip.AddrPort { return r.local }

// Remote returns the restored socket's peer address.
func (r *Restored) Remote() netip.AddrPort { return r.remote }

// Commit leaves repair mode and completes the connection: it sends the
// unsent tail of the send queue and replays the FINs of a half-closed
// connection in the order its state needs. On error the socket is closed
// silently, back in repair mode: a FIN would tell the peer the stream
// ended well, where it was cut short (its next segment meets no socket,
// and a RST).
func (r *Restored) Commit() error {
	if r.fd < 0 || r.committed {
		return opErr("commit", ErrDone)
	}
	if err := r.commit(); err != nil {
		repairOn(r.fd) // best effort: it is closed anyway
		r.closeAll()
		return opErr("commit", err)
	}
	r.committed = true
	r.closeInjector()
	return nil
}

func (r *Restored) commit() error {
	fd, st := r.fd, r.st
	// With data in flight, the window probe sent on leaving repair mode
	// makes the peer acknowledge at once what it holds; an idle connection
	// needs none (on loopback the probe costs a fifth of the restore).
	probe := len(st.SendQueue) > int(st.Unsent)
	// A quiet socket that took something in while in repair mode (data,
	// a FIN) had its acknowledgement dropped: it acknowledges again once
	// out of repair mode. So does one whose state came in unacknowledged
	// (State.AckPending: the source was quiet). (The window probe would
	// not do: it lies before the peer's window, and the peer discards it
	// with its acknowledgement field unread.)
	tookIn := st.AckPending
	if r.quiet {
		if err := setInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(st.Sockopts.Mark)); err != nil {
			return fmt.Errorf("SO_MARK: %w", err)
		}
		n, err := bytesReceived(fd)
		if err != nil {
			return err
		}
		tookIn = tookIn || n > uint64(len(st.RecvQueue))
	}
	// A FIN_WAIT1 or FIN_WAIT2 socket counts our FIN as sent (and in
	// FIN_WAIT2 acknowledged) from Restore on (finSent).
	if err := repairOff(fd, probe); err != nil {
		return err
	}
	if tookIn {
		// Only a shortcut (without it the peer resends what it sent,
		// after its timeout): tried twice (a raw socket's buffer may be
		// full for a moment), and a failure must not cost the
		// connection.
		if injectStaleACK(r) != nil {
			injectStaleACK(r)
		}
	}
	if st.Unsent > 0 {
		if err := writeQueue(fd, queueNone, st.SendQueue[len(st.SendQueue)-int(st.Unsent):]); err != nil {
			return err
		}
	}
	// Only now that the unsent tail is queued: set back earlier, the
	// smaller buffer, a low TCP_NOTSENT_LOWAT or TCP_CORK would make
	// that (blocking) write wait for the peer.
	if err := restoreBuffers(fd, r.bufs); err != nil {
		return err
	}
	// Best effort: past the point where a failure leaves the connection
	// at its source, an option the application set is not worth it.
	setLateSockopts(fd, &st.Sockopts)
	shutdown := func() error {
		if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		return nil
	}
	// LAST_ACK: the peer's FIN came first (CLOSE_WAIT), then ours.
	// CLOSING: ours went first (FIN_WAIT1), then the peer's crossed it.
	switch st.TCPState {
	case StateCloseWait:
		return peerFIN(r)
	case StateLastAck:
		if err := peerFIN(r); err != nil {
			return err
		}
		return shutdown()
	case StateFinWait1:
		if !finAtRestore(st) {
			return shutdown()
		}
	case StateClosing:
		if err := shutdown(); err != nil {
			return err
		}
		return peerFIN(r)
	}
	return nil
}

// ourFINAcked replays the peer's acknowledgement of our FIN, which a
// socket shut down in repair mode counts as sent, if the socket still
// waits for it (FIN_WAIT1).
func ourFINAcked(r *Restored) error {
	h, err := infoHead(r.fd)
	if err != nil {
		return err
	}
	if TCPState(h.state) != StateFinWait1 {
		return nil
	}
	st := r.st
	if err := r.inj.send(r, st.RecvSeq+uint32(len(st.RecvQueue)), st.SendSeq+uint32(len(st.SendQueue))+1, tcpACK); err != nil {
		return fmt.Errorf("inject the acknowledgement of our FIN: send: %w", err)
	}
	return nil
}

// peerFIN replays the peer's FIN, unless the socket has taken it already:
// the peer retransmits an unacknowledged FIN, and a retransmission that
// reached the restored socket first (from the switch on, even in repair
// mode) has moved it on. A replay on top of that would be a duplicate,
// and one arriving after the connection ended would be answered with a
// RST.
func peerFIN(r *Restored) error {
	h, err := infoHead(r.fd)
	if err != nil {
		return err
	}
	switch TCPState(h.state) {
	case StateEstablished, StateFinWait1, StateFinWait2:
		return injectFIN(r)
	}
	return nil
}

// File hands over the committed socket as an *os.File in blocking mode,
// for example to pass to the application with SCM_RIGHTS. The caller owns
// it from then on.
func (r *Restored) File() (*os.File, error) {
	if r.fd < 0 || !r.committed {
		return nil, opErr("file", errors.New("not committed"))
	}
	f := os.NewFile(uintptr(r.fd), "tcp:"+r.local.String()+"->"+r.remote.String())
	r.fd = -1
	return f, nil
}

// Conn hands over the committed socket as a *net.TCPConn. net.FileConn
// turns TCP_NODELAY and keepalive on for every connection it wraps; Conn
// puts back what the application had chosen.
func (r *Restored) Conn() (*net.TCPConn, error) {
	f, err := r.File()
	if err != nil {
		return nil, opErr("conn", err)
	}
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, opErr("conn", err)
	}
	tc := c.(*net.TCPConn)
	rc, err := tc.SyscallConn()
	if err == nil {
		err = control(rc, func(fd int) error { return undoGoDefaults(fd, &r.st.Sockopts) })
	}
	if err != nil {
		tc.Close()
		return nil, opErr("conn", err)
	}
	return tc, nil
}

// Abort closes the restored socket. Before Commit it is still in repair
// mode, so nothing reaches the peer; after Commit (and before File or
// Conn) it is an ordinary close.
func (r *Restored) Abort() error {
	if r.fd < 0 {
		return opErr("abort", ErrDone)
	}
	return opErr("abort", r.closeAll())
}

// closeInjector closes the socket's own Injector, if it has one.
func (r *Restored) closeInjector() {
	if r.ownInj {
		r.inj.Close()
		r.ownInj = false
	}
	r.inj = nil
}

func (r *Restored) closeAll() error {
	var err error
	r.closeInjector()
	if r.fd >= 0 {
		err = unix.Close(r.fd)
		r.fd = -1
	}
	return err
}

// readQueue returns the receive queue and rcv_nxt, consistent with each
// other: rcv_nxt moves with every data segment that arrives, so it is read
// before the queue length and, when the queue is not empty, again after the
// queue, until the two reads agree. (An empty queue read after rcv_nxt
// proves nothing arrived in between: the application cannot read while the
// socket is frozen.)
func readQueue(fd int, q repairQueue) (uint32, []byte, error) {
	if err := selectQueue(fd, q); err != nil {
		return 0, nil, err
	}
	// The queue and its sequence number agree if the sequence number is
	// the same before and after the peek; whatever comes in meanwhile,
	// all of it is read again.
	for range 100 {
		seq, err := queueSeq(fd)
		if err != nil {
			return 0, nil, err
		}
		inq, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
		if err != nil {
			return 0, nil, fmt.Errorf("SIOCINQ: %w", err)
		}
		if q == queueRecv {
			if inq, err = checkUrgent(fd, inq); err != nil {
				return 0, nil, err
			}
		}
		if inq == 0 {
			return seq, nil, nil
		}
		data, err := peekQueue(fd, q, inq)
		if err != nil {
			return 0, nil, err
		}
		again, err := queueSeq(fd)
		if err != nil {
			return 0, nil, err
		}
		if again != seq {
			continue
		}
		if len(data) < inq {
			return 0, nil, fmt.Errorf("receive queue: a peek gave %d of its %d bytes", len(data), inq)
		}
		return seq, data, nil
	}
	return 0, nil, fmt.Errorf("receive queue keeps changing: the flow is not held while frozen")
}

// checkUrgent fails with ErrUrgent if the receive queue holds urgent
// (out-of-band) data the application has not read past; inq is its
// SIOCINQ. Reads and peeks stop at an urgent mark (with SO_OOBINLINE
// too), while rcv_nxt is past it: the bytes from the mark on would be
// lost, and repair has no way to set an urgent mark. Otherwise it returns
// the queue's length, which may have grown meanwhile. With an empty queue
// SIOCATMARK tells whether the application stands at a mark. With data
// queued, SIOCINQ counts the whole queue with SO_OOBINLINE on and only
// the bytes before a mark with it off: the option is switched for a
// moment so as to read both, the whole first (data that arrives in
// between can only make the second read larger, a mark only smaller),
// and set back as the application had it.
func checkUrgent(fd, inq int) (int, error) {
	if inq == 0 {
		at, err := unix.IoctlGetInt(fd, unix.SIOCATMARK)
		if err != nil {
			return 0, fmt.Errorf("SIOCATMARK: %w", err)
		}
		if at != 0 {
			return 0, ErrUrgent
		}
		return 0, nil
	}
	inline, err := getInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_OOBINLINE: %w", err)
	}
	read := func(on int) (n int, err error) {
		if err := setInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE, on); err != nil {
			return 0, fmt.Errorf("setsockopt SO_OOBINLINE: %w", err)
		}
		n, err = unix.IoctlGetInt(fd, unix.SIOCINQ)
		if serr := setInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE, inline); serr != nil {
			return 0, fmt.Errorf("setsockopt SO_OOBINLINE: %w", serr)
		}
		if err != nil {
			return 0, fmt.Errorf("SIOCINQ: %w", err)
		}
		return n, nil
	}
	whole, beforeMark := inq, 0
	if inline == 0 {
		if whole, err = read(1); err == nil {
			beforeMark, err = unix.IoctlGetInt(fd, unix.SIOCINQ)
		}
	} else {
		beforeMark, err = read(0)
	}
	if err != nil {
		return 0, err
	}
	if beforeMark < whole {
		return 0, ErrUrgent
	}
	return beforeMark, nil
}

// readSendQueue returns the send queue, write_seq and how many queued
// bytes were never sent. write_seq cannot move while the application is
// locked out by repair mode, and arriving ACKs only drop bytes from the
// head of the queue, so one read of each is consistent. A queued FIN
// (fin) takes one sequence number, which SIOCOUTQ and SIOCOUTQNSD count.
func readSendQueue(fd int, fin bool) (writeSeq uint32, data []byte, unsent uint32, err error) {
	if err := selectQueue(fd, queueSend); err != nil {
		return 0, nil, 0, err
	}
	if writeSeq, err = queueSeq(fd); err != nil {
		return 0, nil, 0, err
	}
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		return 0, nil, 0, fmt.Errorf("SIOCOUTQ: %w", err)
	}
	if fin && outq > 0 {
		outq--
	}
	if outq == 0 {
		return writeSeq, nil, 0, nil
	}
	notsent, err := unix.IoctlGetInt(fd, unix.SIOCOUTQNSD)
	if err != nil {
		return 0, nil, 0, fmt.Errorf("SIOCOUTQNSD: %w", err)
	}
	if fin && notsent > 0 {
		notsent--
	}
	if data, err = peekQueue(fd, queueSend, outq); err != nil {
		return 0, nil, 0, err
	}
	if notsent > len(data) {
		return 0, nil, 0, fmt.Errorf("send queue holds %d bytes but %d are unsent", len(data), notsent)
	}
	return writeSeq, data, uint32(notsent), nil
}

// LimitUnsent sets TCP_NOTSENT_LOWAT on c: the application's writes wait
// while more than bytes are queued but unsent. Whatever is queued moves
// with a connection, so a small backlog keeps its migration short.
func LimitUnsent(c syscall.Conn, bytes int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return opErr("limit unsent", err)
	}
	return opErr("limit unsent", control(rc, func(fd int) error {
		return setInt(fd, unix.SOL_TCP, unix.TCP_NOTSENT_LOWAT, bytes)
	}))
}

package repair

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// TCP header flags (RFC 9293).
const (
	tcpFIN = 0x01
	tcpACK = 0x10
)

// Injector sends segments to restored sockets as if from their peers,
// through raw sockets made in the network namespace NewInjector ran in
// (the restored sockets' namespace). A restore that may need one (a peer's
// FIN to replay, a quiet socket) takes it from RestoreOptions.Injector, or
// makes its own for the one socket. It is safe for concurrent use.
type Injector struct {
	fd4, fd6 int
	err6     error // why there is no IPv6 raw socket
}

// NewInjector opens an Injector's raw sockets in the calling thread's
// network namespace. It needs CAP_NET_RAW. A namespace without IPv6 gets
// an Injector for IPv4 only. The segments it sends have the mark m.Inject
// (zero: DefaultMarks'), which flow holds must let through: a segment goes
// from the local host to itself, spoofing the peer.
func NewInjector(m Marks) (*Injector, error) {
	if err := m.Check(); err != nil {
		return nil, opErr("injector", err)
	}
	mark := m.OrDefault().Inject
	fd4, err := rawSocket(unix.AF_INET, mark)
	if err != nil {
		return nil, opErr("injector", err)
	}
	i := &Injector{fd4: fd4}
	if i.fd6, i.err6 = rawSocket(unix.AF_INET6, mark); i.err6 != nil {
		i.fd6 = -1
	}
	return i, nil
}

// newInjector opens an Injector for one address family, whose segments
// have the mark bit mark.
func newInjector(v6 bool, mark uint32) (*Injector, error) {
	i := &Injector{fd4: -1, fd6: -1}
	var err error
	if v6 {
		i.fd6, err = rawSocket(unix.AF_INET6, mark)
	} else {
		i.fd4, err = rawSocket(unix.AF_INET, mark)
	}
	if err != nil {
		return nil, err
	}
	return i, nil
}

// Close closes the raw sockets.
func (i *Injector) Close() error {
	var errs []error
	for _, fd := range []*int{&i.fd4, &i.fd6} {
		if *fd >= 0 {
			errs = append(errs, unix.Close(*fd))
			*fd = -1
		}
	}
	return opErr("injector: close", errors.Join(errs...))
}

// send delivers one segment to r's socket from r's peer.
func (i *Injector) send(r *Restored, seq, ack uint32, flags byte) error {
	st := r.st
	win := min(st.Window.SndWnd>>st.SndWScale, 0xffff)
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], r.remote.Port())
	binary.BigEndian.PutUint16(tcp[2:], r.local.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12] = 5 << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], uint16(win))

	src, dst := r.remote.Addr().AsSlice(), r.local.Addr().AsSlice()
	var pkt []byte
	var to unix.Sockaddr
	var fd int
	if r.local.Addr().Is4() {
		if fd = i.fd4; fd < 0 {
			return errors.New("no IPv4 raw socket")
		}
		pkt = make([]byte, 20, 40)
		pkt[0] = 0x45
		binary.BigEndian.PutUint16(pkt[2:], 40)
		binary.BigEndian.PutUint16(pkt[6:], 0x4000) // DF
		pkt[8] = 64
		pkt[9] = unix.IPPROTO_TCP
		copy(pkt[12:], src)
		copy(pkt[16:], dst)
		// The kernel fills in the IP checksum and ID of IP_HDRINCL packets.
		to = &unix.SockaddrInet4{Addr: r.local.Addr().As4()}
	} else {
		if fd = i.fd6; fd < 0 {
			return fmt.Errorf("no IPv6 raw socket: %w", i.err6)
		}
		pkt = make([]byte, 40, 60)
		pkt[0] = 0x60
		binary.BigEndian.PutUint16(pkt[4:], 20)
		pkt[6] = unix.IPPROTO_TCP
		pkt[7] = 64
		copy(pkt[8:], src)
		copy(pkt[24:], dst)
		to = &unix.SockaddrInet6{Addr: r.local.Addr().As16()}
	}
	binary.BigEndian.PutUint16(tcp[16:], tcpChecksum(src, dst, tcp))
	return unix.Sendto(fd, append(pkt, tcp...), 0, to)
}

// injectFIN delivers the peer's FIN to a restored socket. No socket option
// can put a socket into CLOSE_WAIT, LAST_ACK or CLOSING, so the FIN the
// source socket had received is replayed as a segment from the peer's
// address, through a raw socket, looped back to the local socket. Its
// sequence number is the first one after the receive queue and it
// acknowledges only what the peer had acknowledged at capture, so the
// kernel accepts it as the next in-order segment.
func injectFIN(r *Restored) error {
	st := r.st
	if err := r.inj.send(r, st.RecvSeq+uint32(len(st.RecvQueue)), st.SendSeq, tcpFIN|tcpACK); err != nil {
		return fmt.Errorf("inject FIN: send: %w", err)
	}
	return nil
}

// injectStaleACK makes a committed socket acknowledge at once what it has
// received: it delivers a bare acknowledgement from the peer whose
// sequence number lies before the socket's receive window, and the kernel
// answers a segment it cannot accept with an acknowledgement of its own
// (RFC 9293 §3.10.7.4), carrying rcv_nxt. Nothing of the injected segment
// is taken in. A socket that has not sent such an answer in the last
// half second (net.ipv4.tcp_invalid_ratelimit) sends it; a restored one
// has sent none.
func injectStaleACK(r *Restored) error {
	st := r.st
	if err := r.inj.send(r, st.RecvSeq+uint32(len(st.RecvQueue))-1, st.SendSeq, tcpACK); err != nil {
		return fmt.Errorf("inject a stale acknowledgement: send: %w", err)
	}
	return nil
}

// rawSocket opens a socket the Injector sends through. IPPROTO_RAW implies
// IP_HDRINCL (IPV6_HDRINCL for IPv6): the packet carries the peer's address
// as its source.
func rawSocket(domain int, mark uint32) (int, error) {
	fd, err := unix.Socket(domain, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, fmt.Errorf("raw socket to inject the peer's segments (needs CAP_NET_RAW): %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(int32(mark))); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("raw socket: SO_MARK: %w", err)
	}
	return fd, nil
}

// tcpChecksum computes the TCP checksum over the pseudo-header and the
// segment (RFC 9293 §3.1, RFC 8200 §8.1).
func tcpChecksum(src, dst, seg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src)
	add(dst)
	sum += unix.IPPROTO_TCP + uint32(len(seg))
	add(seg)
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

package repair

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// InjectMark is the SO_MARK (fwmark) carried by the segments this package
// injects into a restored socket. Flow holds must let it through: the
// segment goes from the local host to itself, spoofing the peer.
const InjectMark = 0x6d746370 // "mtcp"

// TCP header flags (RFC 9293).
const (
	tcpFIN = 0x01
	tcpACK = 0x10
)

// injectFIN delivers the peer's FIN to a restored socket. No socket option
// can put a socket into CLOSE_WAIT, LAST_ACK or CLOSING, so the FIN the
// source socket had received is replayed as a segment from the peer's
// address, through a raw socket, looped back to the local socket. Its
// sequence number is the first one after the receive queue and it
// acknowledges only what the peer had acknowledged at capture, so the
// kernel accepts it as the next in-order segment.
func injectFIN(r *Restored) error {
	st := r.st
	seq := st.RecvSeq + uint32(len(st.RecvQueue))
	ack := st.SendSeq
	win := st.Window.SndWnd >> st.SndWScale
	win = min(win, 0xffff)

	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], r.remote.Port())
	binary.BigEndian.PutUint16(tcp[2:], r.local.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12] = 5 << 4
	tcp[13] = tcpFIN | tcpACK
	binary.BigEndian.PutUint16(tcp[14:], uint16(win))

	src, dst := r.remote.Addr().AsSlice(), r.local.Addr().AsSlice()
	var pkt []byte
	var to unix.Sockaddr
	if r.local.Addr().Is4() {
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
	pkt = append(pkt, tcp...)

	if err := unix.Sendto(r.raw, pkt, 0, to); err != nil {
		return fmt.Errorf("inject FIN: send: %w", err)
	}
	return nil
}

// rawSocket opens the socket injectFIN sends through. IPPROTO_RAW implies
// IP_HDRINCL (IPV6_HDRINCL for IPv6): the packet carries the peer's address
// as its source.
func rawSocket(domain int) (int, error) {
	fd, err := unix.Socket(domain, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, fmt.Errorf("raw socket for the FIN (needs CAP_NET_RAW): %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, InjectMark); err != nil {
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

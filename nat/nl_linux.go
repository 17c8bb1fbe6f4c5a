//go:build linux

package nat

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/mdlayher/netlink"
	"github.com/mdlayher/socket"
	"golang.org/x/sys/unix"
)

// This file is the only one that makes system calls: one netfilter netlink
// socket type used by the nftables transactions (nft_linux.go) and by the
// NFQUEUE reader (queue_linux.go). Everything else speaks in messages.

// nlMsgType is a netlink message type (linux/netlink.h, nlmsghdr.nlmsg_type).
type nlMsgType uint16

// Netlink control message types (linux/netlink.h).
const (
	nlmsgError nlMsgType = unix.NLMSG_ERROR // ack or error
	nlmsgDone  nlMsgType = unix.NLMSG_DONE  // end of a dump
)

// nlFlags are netlink message flags (linux/netlink.h, nlmsghdr.nlmsg_flags).
type nlFlags uint16

// Netlink message flags (linux/netlink.h).
const (
	nlmRequest nlFlags = unix.NLM_F_REQUEST
	nlmAck     nlFlags = unix.NLM_F_ACK
	nlmCreate  nlFlags = unix.NLM_F_CREATE
	nlmAppend  nlFlags = unix.NLM_F_APPEND
	nlmAckTLVs nlFlags = unix.NLM_F_ACK_TLVS // error message carries extended-ack attributes
)

// nlSockOpt is a SOL_NETLINK socket option (linux/netlink.h).
type nlSockOpt int

const (
	// nlCapAck: errors do not echo the whole failed request back, only its
	// header; a failed 60 KB element message would otherwise overflow the
	// receive buffer.
	nlCapAck nlSockOpt = unix.NETLINK_CAP_ACK
	// nlExtAck: errors carry the kernel's explanation (NLMSGERR_ATTR_MSG).
	nlExtAck nlSockOpt = unix.NETLINK_EXT_ACK
)

// nlmsgerrAttrMsg is the extended-ack attribute holding the error text
// (linux/netlink.h, enum nlmsgerr_attrs).
const nlmsgerrAttrMsg = unix.NLMSGERR_ATTR_MSG

// nfnlSubsys is an nfnetlink subsystem, the high byte of a message type
// (linux/netfilter/nfnetlink.h).
type nfnlSubsys uint8

const (
	nfnlSubsysQueue    nfnlSubsys = unix.NFNL_SUBSYS_QUEUE    // nfnetlink_queue
	nfnlSubsysNFTables nfnlSubsys = unix.NFNL_SUBSYS_NFTABLES // nf_tables
)

// nfnlBatch are the nfnetlink batch delimiters (linux/netfilter/nfnetlink.h).
const (
	nfnlMsgBatchBegin nlMsgType = unix.NFNL_MSG_BATCH_BEGIN
	nfnlMsgBatchEnd   nlMsgType = unix.NFNL_MSG_BATCH_END
)

const (
	nlmsgHdrLen  = unix.NLMSG_HDRLEN // struct nlmsghdr
	nfgenmsgLen  = 4                 // struct nfgenmsg (linux/netfilter/nfnetlink.h)
	nlmsgerrHLen = 4 + nlmsgHdrLen   // struct nlmsgerr: errno + the request's header
)

// nlMsg is one received netlink message.
type nlMsg struct {
	typ   nlMsgType
	flags nlFlags
	seq   uint32
	data  []byte // after the nlmsghdr
}

// nlSock is a NETLINK_NETFILTER socket of the namespace it was made in.
type nlSock struct {
	c      *socket.Conn
	seq    atomic.Uint32
	mu     sync.Mutex // guards sndbuf
	sndbuf int
}

// dialNetfilter opens a netfilter netlink socket in the calling thread's
// network namespace.
func dialNetfilter(name string) (*nlSock, error) {
	c, err := socket.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_NETFILTER, name, nil)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := c.Bind(&unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		c.Close()
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	s := &nlSock{c: c}
	s.seq.Store(uint32(os.Getpid()) << 8) // distinct from other sockets' in traces
	for _, o := range []nlSockOpt{nlCapAck, nlExtAck} {
		if err := c.SetsockoptInt(unix.SOL_NETLINK, int(o), 1); err != nil {
			c.Close()
			return nil, fmt.Errorf("netlink setsockopt %d: %w", o, err)
		}
	}
	return s, nil
}

func (s *nlSock) nextSeq() uint32 { return s.seq.Add(1) }

func (s *nlSock) close() error { return s.c.Close() }

// setRcvbuf raises the receive buffer, with SO_RCVBUFFORCE (CAP_NET_ADMIN)
// so that net.core.rmem_max does not cap it.
func (s *nlSock) setRcvbuf(n int) error {
	if err := s.c.SetsockoptInt(unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n); err != nil {
		return s.c.SetsockoptInt(unix.SOL_SOCKET, unix.SO_RCVBUF, n)
	}
	return nil
}

// fitSndbuf makes sure one datagram of n bytes can be sent. An nfnetlink
// batch is processed only if it arrives in one sendmsg, and netlink refuses
// datagrams larger than the send buffer (EMSGSIZE); nft(8) sizes its
// buffer the same way.
func (s *nlSock) fitSndbuf(n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n+4096 <= s.sndbuf {
		return nil
	}
	want := n + 64<<10
	if err := s.c.SetsockoptInt(unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, want); err != nil {
		if err2 := s.c.SetsockoptInt(unix.SOL_SOCKET, unix.SO_SNDBUF, want); err2 != nil {
			return fmt.Errorf("raise the netlink send buffer to %d bytes: %w", want, errors.Join(err, err2))
		}
	}
	got, err := s.c.GetsockoptInt(unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil {
		return fmt.Errorf("read the netlink send buffer size: %w", err)
	}
	s.sndbuf = got
	if n+32 > got {
		return fmt.Errorf("a transaction of %d bytes does not fit the netlink send buffer (%d bytes; SO_SNDBUFFORCE needs CAP_NET_ADMIN, net.core.wmem_max caps SO_SNDBUF): apply smaller batches", n, got)
	}
	return nil
}

// send sends one datagram (one or more messages) to the kernel.
func (s *nlSock) send(ctx context.Context, b []byte) error {
	if err := s.c.Sendto(ctx, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	return nil
}

// recv reads one datagram into buf and splits it into messages, which
// alias buf. Truncation is an error: buf must hold the largest datagram.
func (s *nlSock) recv(ctx context.Context, buf []byte) ([]nlMsg, error) {
	n, _, flags, _, err := s.c.Recvmsg(ctx, buf, nil, 0)
	if err != nil {
		return nil, fmt.Errorf("netlink receive: %w", err)
	}
	if flags&unix.MSG_TRUNC != 0 {
		return nil, fmt.Errorf("netlink receive: message truncated to %d bytes", n)
	}
	return parseMsgs(buf[:n])
}

// parseMsgs splits a datagram into netlink messages.
func parseMsgs(b []byte) ([]nlMsg, error) {
	var out []nlMsg
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < nlmsgHdrLen || l > len(b) {
			return out, fmt.Errorf("netlink receive: malformed message length %d (datagram has %d bytes)", l, len(b))
		}
		out = append(out, nlMsg{
			typ:   nlMsgType(binary.NativeEndian.Uint16(b[4:6])),
			flags: nlFlags(binary.NativeEndian.Uint16(b[6:8])),
			seq:   binary.NativeEndian.Uint32(b[8:12]),
			data:  b[nlmsgHdrLen:l],
		})
		al := nlAlign(l)
		if al > len(b) {
			break
		}
		b = b[al:]
	}
	return out, nil
}

func nlAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// ackError decodes an NLMSG_ERROR message: nil for an ack, else the errno
// with the kernel's extended-ack text if it sent one.
func ackError(m nlMsg) error {
	if len(m.data) < 4 {
		return errors.New("short netlink error message")
	}
	code := int32(binary.NativeEndian.Uint32(m.data[:4]))
	if code == 0 {
		return nil
	}
	var err error = syscall.Errno(-code)
	if m.flags&nlmAckTLVs != 0 && len(m.data) > nlmsgerrHLen {
		// With NETLINK_CAP_ACK only the request's header is echoed.
		if ad, derr := netlink.NewAttributeDecoder(m.data[nlmsgerrHLen:]); derr == nil {
			for ad.Next() {
				if ad.Type() == nlmsgerrAttrMsg {
					if txt := ad.String(); txt != "" {
						err = fmt.Errorf("%w (kernel: %s)", err, txt)
					}
				}
			}
		}
	}
	return err
}

// msgWriter appends netfilter netlink messages to one datagram.
type msgWriter struct {
	b []byte
}

// add appends a message: nlmsghdr, nfgenmsg, attributes.
func (w *msgWriter) add(typ nlMsgType, flags nlFlags, seq uint32, family uint8, resID uint16, attrs []byte) {
	l := nlmsgHdrLen + nfgenmsgLen + len(attrs)
	start := len(w.b)
	w.b = binary.NativeEndian.AppendUint32(w.b, uint32(l))
	w.b = binary.NativeEndian.AppendUint16(w.b, uint16(typ))
	w.b = binary.NativeEndian.AppendUint16(w.b, uint16(flags))
	w.b = binary.NativeEndian.AppendUint32(w.b, seq)
	w.b = binary.NativeEndian.AppendUint32(w.b, 0) // port ID: the kernel
	w.b = append(w.b, family, 0 /* NFNETLINK_V0 */)
	w.b = binary.BigEndian.AppendUint16(w.b, resID)
	w.b = append(w.b, attrs...)
	for len(w.b)-start < nlAlign(l) {
		w.b = append(w.b, 0)
	}
}

// nfMsgType builds an nfnetlink message type from subsystem and message.
func nfMsgType(sub nfnlSubsys, msg uint8) nlMsgType { return nlMsgType(uint16(sub)<<8 | uint16(msg)) }

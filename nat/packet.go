package nat

import (
	"encoding/binary"
	"net/netip"
)

// IP protocol numbers met while walking IPv6 extension headers (IANA,
// linux/in6.h).
const (
	protoHopOpts  = 0
	protoTCP      = 6
	protoRouting  = 43
	protoFragment = 44
	protoAH       = 51
	protoDstOpts  = 60
)

// packetFlow returns the flow of a queued packet, which starts at its IP
// header: the sender is the client and the destination the service, as a
// held packet arrives at the source host. ok is false for anything but an
// unfragmented (or first-fragment) TCP segment whose ports are within p.
func packetFlow(p []byte) (f Flow, ok bool) {
	if len(p) < 1 {
		return f, false
	}
	var src, dst netip.Addr
	var l4 []byte
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return f, false
		}
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || len(p) < ihl || p[9] != protoTCP {
			return f, false
		}
		if binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return f, false // a later fragment: no TCP header
		}
		src = netip.AddrFrom4([4]byte(p[12:16]))
		dst = netip.AddrFrom4([4]byte(p[16:20]))
		l4 = p[ihl:]
	case 6:
		if len(p) < 40 {
			return f, false
		}
		src = netip.AddrFrom16([16]byte(p[8:24]))
		dst = netip.AddrFrom16([16]byte(p[24:40]))
		next, rest := p[6], p[40:]
		for next != protoTCP {
			switch next {
			case protoHopOpts, protoRouting, protoDstOpts:
				if len(rest) < 2 {
					return f, false
				}
				n := (int(rest[1]) + 1) * 8
				if len(rest) < n {
					return f, false
				}
				next, rest = rest[0], rest[n:]
			case protoAH:
				// Authentication header: its length counts 4-byte
				// words, less 2 (RFC 4302).
				if len(rest) < 2 {
					return f, false
				}
				n := (int(rest[1]) + 2) * 4
				if len(rest) < n {
					return f, false
				}
				next, rest = rest[0], rest[n:]
			case protoFragment:
				if len(rest) < 8 || binary.BigEndian.Uint16(rest[2:4])&0xfff8 != 0 {
					return f, false
				}
				next, rest = rest[0], rest[8:]
			default:
				return f, false
			}
		}
		l4 = rest
	default:
		return f, false
	}
	if len(l4) < 4 {
		return f, false
	}
	return Flow{
		Client:  netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:2])),
		Service: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:4])),
	}, true
}

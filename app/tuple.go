package app

import (
	"net"
	"net/netip"
)

// Tuple identifies a TCP connection by its two endpoints as seen on this
// host: Local is the server's address and port, Remote the client's.
// Addresses are kept unmapped (an IPv4 client of a dual-stack listener
// appears as 10.0.0.1, not ::ffff:10.0.0.1), so a Tuple built from
// net.TCPAddr values and one parsed from text compare equal.
type Tuple struct {
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
}

// String formats t as "local L remote R".
func (t Tuple) String() string {
	return "local " + t.Local.String() + " remote " + t.Remote.String()
}

// valid reports whether both endpoints are set.
func (t Tuple) valid() bool { return t.Local.IsValid() && t.Remote.IsValid() }

// norm returns t with both addresses unmapped.
func (t Tuple) norm() Tuple {
	return Tuple{Local: unmap(t.Local), Remote: unmap(t.Remote)}
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// tupleOf returns the tuple of an established TCP connection.
func tupleOf(c net.Conn) Tuple {
	var t Tuple
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		t.Local = a.AddrPort()
	}
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		t.Remote = a.AddrPort()
	}
	return t.norm()
}

package app

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// Version 3 of the protocol carries the same messages as version 2, but
// after the registration (which stays JSON, so that the versions can be
// negotiated) each frame's body is binary: a drain moves thousands of
// connections through this socket, and JSON was a tenth of the CPU time it
// took. A binary body starts with binFrame, which no JSON text starts
// with; the fields of message follow in their order of declaration:
//
//	binFrame
//	type:str id:uv version:uv max_version:uv service:str pid:uv
//	flags:byte (bit 0: tuple present, bit 1: snapshot present)
//	[tuple:tuple] tuples:uv×tuple [snapshot:bytes] verdict:str
//	items:uv×item fds:uv error:str code:str
//
//	item:   id:uv flags:byte (bit 0: tuple, bit 1: snapshot, bit 2: fd,
//	        bit 3: tcp options, version 4) [tuple] [snapshot:bytes]
//	        [tcp] error:str code:str
//	tcp:    flags:byte (bit 0: nodelay, bit 1: keepalive) idle:uv
//	        intvl:uv count:uv
//	tuple:  addrport addrport
//	addrport: addr:bytes (netip.Addr's binary form: empty, 4 or 16 bytes
//	        and a zone) port:2 bytes big-endian
//	str, bytes: uv length, then the bytes; uv: unsigned varint
//
// "Present" keeps a nil snapshot apart from an empty one, as JSON's null
// and "" do. A body with anything missing, left over or out of range is a
// protocol error.
const binFrame = 0x00

// binVersion is the first protocol version with binary frames.
const binVersion = 3

const (
	binTuple    = 1 << 0
	binSnapshot = 1 << 1
	binFD       = 1 << 2
	binTCP      = 1 << 3

	binNoDelay   = 1 << 0
	binKeepAlive = 1 << 1
)

// encodeBinary appends m's binary body to b.
func encodeBinary(b []byte, m *message) []byte {
	b = append(b, binFrame)
	b = appendStr(b, m.Type)
	b = binary.AppendUvarint(b, m.ID)
	b = binary.AppendUvarint(b, uint64(max(m.Version, 0)))
	b = binary.AppendUvarint(b, uint64(max(m.MaxVersion, 0)))
	b = appendStr(b, m.Service)
	b = binary.AppendUvarint(b, uint64(max(m.PID, 0)))
	var flags byte
	if m.Tuple != nil {
		flags |= binTuple
	}
	if m.Snapshot != nil {
		flags |= binSnapshot
	}
	b = append(b, flags)
	if m.Tuple != nil {
		b = appendTuple(b, *m.Tuple)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Tuples)))
	for _, t := range m.Tuples {
		b = appendTuple(b, t)
	}
	if m.Snapshot != nil {
		b = appendStr(b, string(m.Snapshot))
	}
	b = appendStr(b, m.Verdict)
	b = binary.AppendUvarint(b, uint64(len(m.Items)))
	for i := range m.Items {
		it := &m.Items[i]
		b = binary.AppendUvarint(b, it.ID)
		var f byte
		if it.Tuple != nil {
			f |= binTuple
		}
		if it.Snapshot != nil {
			f |= binSnapshot
		}
		if it.FD {
			f |= binFD
		}
		if it.TCP != nil {
			f |= binTCP
		}
		b = append(b, f)
		if it.Tuple != nil {
			b = appendTuple(b, *it.Tuple)
		}
		if it.Snapshot != nil {
			b = appendStr(b, string(it.Snapshot))
		}
		if o := it.TCP; o != nil {
			var tf byte
			if o.NoDelay {
				tf |= binNoDelay
			}
			if o.KeepAlive {
				tf |= binKeepAlive
			}
			b = append(b, tf)
			b = binary.AppendUvarint(b, uint64(o.Idle))
			b = binary.AppendUvarint(b, uint64(o.Intvl))
			b = binary.AppendUvarint(b, uint64(o.Count))
		}
		b = appendStr(b, it.Error)
		b = appendStr(b, it.Code)
	}
	b = binary.AppendUvarint(b, uint64(max(m.FDs, 0)))
	b = appendStr(b, m.Error)
	return appendStr(b, m.Code)
}

func appendStr(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	a, _ := ap.Addr().MarshalBinary()
	b = appendStr(b, string(a))
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func appendTuple(b []byte, t Tuple) []byte {
	return appendAddrPort(appendAddrPort(b, t.Local), t.Remote)
}

// binReader reads a binary body; the first error sticks.
type binReader struct {
	b   []byte
	err error
}

func (r *binReader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf(format, args...)
	}
}

func (r *binReader) uv() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("truncated or overlong number")
		return 0
	}
	r.b = r.b[n:]
	return v
}

// int reads a non-negative int no larger than limit.
func (r *binReader) int(what string, limit int) int {
	v := r.uv()
	if v > uint64(limit) {
		r.fail("%s %d out of range", what, v)
		return 0
	}
	return int(v)
}

func (r *binReader) bytes(what string, limit int) []byte {
	n := r.uv()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) || n > uint64(limit) {
		r.fail("%s of %d bytes (%d left, limit %d)", what, n, len(r.b), limit)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

// owned is bytes copied out of the body (which the caller reuses), and
// non-nil even when empty.
func (r *binReader) owned(what string, limit int) []byte {
	v := r.bytes(what, limit)
	if r.err != nil {
		return nil
	}
	return append(make([]byte, 0, len(v)), v...)
}

func (r *binReader) str(what string, limit int) string { return string(r.bytes(what, limit)) }

func (r *binReader) byte1() byte {
	if r.err != nil {
		return 0
	}
	if len(r.b) == 0 {
		r.fail("truncated")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *binReader) addrPort() netip.AddrPort {
	raw := r.bytes("address", 16+255)
	var a netip.Addr
	if r.err == nil {
		if err := a.UnmarshalBinary(raw); err != nil {
			r.fail("address: %v", err)
		}
	}
	if r.err != nil || len(r.b) < 2 {
		r.fail("truncated port")
		return netip.AddrPort{}
	}
	p := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return netip.AddrPortFrom(a, p)
}

func (r *binReader) tuple() *Tuple {
	t := Tuple{Local: r.addrPort()}
	t.Remote = r.addrPort()
	return &t
}

// flags reads a flag byte, refusing bits outside known.
func (r *binReader) flags(known byte) byte {
	f := r.byte1()
	if f&^known != 0 {
		r.fail("unknown flags %#x", f)
	}
	return f
}

var errBinary = errors.New("undecodable binary message")

// decodeBinary decodes a binary body (starting with binFrame) into m.
// Limits that parse checks on every message (service name, snapshot
// sizes, batch sizes) are enforced here too, before anything is
// allocated for them.
func decodeBinary(body []byte, m *message) error {
	r := &binReader{b: body[1:]}
	m.Type = r.str("type", 64)
	m.ID = r.uv()
	m.Version = r.int("version", 1<<16)
	m.MaxVersion = r.int("max_version", 1<<16)
	m.Service = r.str("service", maxServiceLen)
	m.PID = r.int("pid", 1<<31-1)
	f := r.flags(binTuple | binSnapshot)
	if f&binTuple != 0 {
		m.Tuple = r.tuple()
	}
	if n := r.int("tuple count", maxBatch); n > 0 && r.err == nil {
		m.Tuples = make([]Tuple, n)
		for i := range m.Tuples {
			m.Tuples[i] = *r.tuple()
		}
	}
	if f&binSnapshot != 0 {
		m.Snapshot = r.owned("snapshot", MaxSnapshot)
	}
	m.Verdict = r.str("verdict", 64)
	if n := r.int("item count", maxBatch); n > 0 && r.err == nil {
		m.Items = make([]item, n)
		for i := range m.Items {
			it := &m.Items[i]
			it.ID = r.uv()
			f := r.flags(binTuple | binSnapshot | binFD | binTCP)
			if f&binTuple != 0 {
				it.Tuple = r.tuple()
			}
			if f&binSnapshot != 0 {
				it.Snapshot = r.owned("snapshot", MaxSnapshot)
			}
			if f&binTCP != 0 {
				tf := r.flags(binNoDelay | binKeepAlive)
				it.TCP = &tcpOpts{NoDelay: tf&binNoDelay != 0, KeepAlive: tf&binKeepAlive != 0,
					Idle:  uint32(r.int("keepalive idle", maxKeepSecs)),
					Intvl: uint32(r.int("keepalive interval", maxKeepSecs)),
					Count: uint32(r.int("keepalive count", maxKeepCount))}
			}
			it.FD = f&binFD != 0
			it.Error = r.str("error", maxFrame)
			it.Code = r.str("code", 64)
			if r.err != nil {
				break
			}
		}
	}
	m.FDs = r.int("descriptor count", maxBatch)
	m.Error = r.str("error", maxFrame)
	m.Code = r.str("code", 64)
	if r.err == nil && len(r.b) > 0 {
		r.fail("%d bytes after the end", len(r.b))
	}
	if r.err != nil {
		return fmt.Errorf("%w: %v", errBinary, r.err)
	}
	return nil
}

package repair

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"net/netip"
)

// The wire format of a State, version 1, all integers big-endian:
//
//	magic     "MTCS"
//	version   u16 (1)
//	flags     u16 (1 AckPending; the other bits reserved, 0. Builds
//	          before AckPending refuse a state that sets it, as
//	          malformed: such a transfer aborts and the connection stays
//	          at its source, so upgrade a pool's targets first)
//	bodyLen   u32 (length of body)
//	body:
//	  family  u8 (4 or 6)
//	  local   addr (4 or 16 bytes) port u16
//	  remote  addr (4 or 16 bytes) port u16
//	  state   u8
//	  sendSeq u32, recvSeq u32, mss u32
//	  options u8, sndWScale u8, rcvWScale u8, timestamp u32
//	  window  5 × u32
//	  sockopt flags u8 (1 nodelay, 2 cork, 4 keepalive, 8 rcvbuf lock,
//	          16 sndbuf lock; builds before the locks refuse a state that
//	          sets them, as malformed, which aborts the transfer)
//	  keepIdle, keepIntvl, keepCnt, userTimeout u32
//	  rcvBuf, sndBuf, notSentLowat u32, tos u8, mark u32, priority u32
//	  congestion u8 length + bytes
//	  unsent u32
//	  sendQueue u32 length + bytes
//	  recvQueue u32 length + bytes
//	crc32c    u32 over everything before it
//
// The encoding is canonical: Decode accepts exactly what MarshalBinary
// produces for a valid State, and re-encoding a decoded State gives back the
// same bytes.
const (
	magic         = "MTCS"
	formatVersion = 1
	headerLen     = 4 + 2 + 2 + 4
	trailerLen    = 4
	// fixedBodyLen is the body length without addresses, congestion name and
	// queues.
	fixedBodyLen = 1 + 2 + 2 + 1 + 3*4 + 3 + 4 + 5*4 + 1 + 4*4 + 3*4 + 1 + 4 + 4 + 1 + 4 + 4 + 4

	flagAckPending = 1
	knownFlags     = flagAckPending

	sockoptNoDelay   = 1
	sockoptCork      = 2
	sockoptKeepAlive = 4
	sockoptRcvLock   = 8
	sockoptSndLock   = 16
	knownSockopts    = sockoptNoDelay | sockoptCork | sockoptKeepAlive | sockoptRcvLock | sockoptSndLock
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MaxEncodedLen is the largest encoding Decode accepts.
const MaxEncodedLen = headerLen + fixedBodyLen + 2*16 + maxCongestionName + 2*MaxQueueLen + trailerLen

// MarshalBinary encodes st in the versioned binary format. It fails only if
// st does not pass [State.Validate].
func (st *State) MarshalBinary() ([]byte, error) {
	return st.AppendBinary(nil)
}

// AppendBinary appends the encoding of st to b (encoding.BinaryAppender).
func (st *State) AppendBinary(b []byte) ([]byte, error) {
	if err := st.Validate(); err != nil {
		return b, err
	}
	alen := 4
	if st.Local.Addr().Is6() {
		alen = 16
	}
	body := fixedBodyLen + 2*alen + len(st.Sockopts.Congestion) + len(st.SendQueue) + len(st.RecvQueue)
	start := len(b)
	b = append(make([]byte, 0, start+headerLen+body+trailerLen), b...)
	b = append(b, magic...)
	b = binary.BigEndian.AppendUint16(b, formatVersion)
	var hflags uint16
	if st.AckPending {
		hflags |= flagAckPending
	}
	b = binary.BigEndian.AppendUint16(b, hflags)
	b = binary.BigEndian.AppendUint32(b, uint32(body))

	if alen == 4 {
		b = append(b, 4)
	} else {
		b = append(b, 6)
	}
	b = appendAddrPort(b, st.Local)
	b = appendAddrPort(b, st.Remote)
	b = append(b, byte(st.TCPState))
	b = binary.BigEndian.AppendUint32(b, st.SendSeq)
	b = binary.BigEndian.AppendUint32(b, st.RecvSeq)
	b = binary.BigEndian.AppendUint32(b, st.MSS)
	b = append(b, byte(st.Options), st.SndWScale, st.RcvWScale)
	b = binary.BigEndian.AppendUint32(b, st.Timestamp)
	w := st.Window
	for _, v := range [...]uint32{w.SndWL1, w.SndWnd, w.MaxWindow, w.RcvWnd, w.RcvWup} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	o := st.Sockopts
	var flags byte
	if o.NoDelay {
		flags |= sockoptNoDelay
	}
	if o.Cork {
		flags |= sockoptCork
	}
	if o.KeepAlive {
		flags |= sockoptKeepAlive
	}
	if o.RcvBufLock {
		flags |= sockoptRcvLock
	}
	if o.SndBufLock {
		flags |= sockoptSndLock
	}
	b = append(b, flags)
	for _, v := range [...]uint32{o.KeepIdle, o.KeepIntvl, o.KeepCnt, o.UserTimeout, o.RcvBuf, o.SndBuf, o.NotSentLowat} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	b = append(b, o.TOS)
	b = binary.BigEndian.AppendUint32(b, o.Mark)
	b = binary.BigEndian.AppendUint32(b, o.Priority)
	b = append(b, byte(len(o.Congestion)))
	b = append(b, o.Congestion...)
	b = binary.BigEndian.AppendUint32(b, st.Unsent)
	b = binary.BigEndian.AppendUint32(b, uint32(len(st.SendQueue)))
	b = append(b, st.SendQueue...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(st.RecvQueue)))
	b = append(b, st.RecvQueue...)
	b = binary.BigEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
	return b, nil
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	b = append(b, ap.Addr().AsSlice()...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

// Decode parses an encoded State. Every malformed input yields an error
// wrapping [ErrMalformed] (or [ErrVersion]); it never panics, and it never
// allocates more than len(b) bytes plus a small constant. The returned State
// does not alias b.
func Decode(b []byte) (*State, error) {
	if len(b) < headerLen+trailerLen {
		return nil, fmt.Errorf("%w: %d bytes is shorter than any state", ErrMalformed, len(b))
	}
	if string(b[:4]) != magic {
		return nil, fmt.Errorf("%w: bad magic %q", ErrMalformed, b[:4])
	}
	if v := binary.BigEndian.Uint16(b[4:]); v != formatVersion {
		return nil, fmt.Errorf("%w: version %d (this build reads %d)", ErrVersion, v, formatVersion)
	}
	hflags := binary.BigEndian.Uint16(b[6:])
	if f := hflags &^ knownFlags; f != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", ErrMalformed, f)
	}
	if n := binary.BigEndian.Uint32(b[8:]); uint64(n) != uint64(len(b)-headerLen-trailerLen) {
		return nil, fmt.Errorf("%w: body length %d, have %d bytes", ErrMalformed, n, len(b)-headerLen-trailerLen)
	}
	end := len(b) - trailerLen
	if sum := crc32.Checksum(b[:end], castagnoli); sum != binary.BigEndian.Uint32(b[end:]) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrMalformed)
	}
	d := decoder{b: b[headerLen:end]}
	st := &State{AckPending: hflags&flagAckPending != 0}
	var alen int
	switch d.u8() {
	case 4:
		alen = 4
	case 6:
		alen = 16
	default:
		return nil, fmt.Errorf("%w: unknown address family", ErrMalformed)
	}
	st.Local = d.addrPort(alen)
	st.Remote = d.addrPort(alen)
	st.TCPState = TCPState(d.u8())
	st.SendSeq = d.u32()
	st.RecvSeq = d.u32()
	st.MSS = d.u32()
	st.Options = TCPOptions(d.u8())
	st.SndWScale = d.u8()
	st.RcvWScale = d.u8()
	st.Timestamp = d.u32()
	st.Window = Window{SndWL1: d.u32(), SndWnd: d.u32(), MaxWindow: d.u32(), RcvWnd: d.u32(), RcvWup: d.u32()}
	flags := d.u8()
	if flags&^knownSockopts != 0 {
		return nil, fmt.Errorf("%w: unknown socket option flags %#x", ErrMalformed, flags)
	}
	o := &st.Sockopts
	o.NoDelay = flags&sockoptNoDelay != 0
	o.Cork = flags&sockoptCork != 0
	o.KeepAlive = flags&sockoptKeepAlive != 0
	o.RcvBufLock = flags&sockoptRcvLock != 0
	o.SndBufLock = flags&sockoptSndLock != 0
	o.KeepIdle, o.KeepIntvl, o.KeepCnt, o.UserTimeout = d.u32(), d.u32(), d.u32(), d.u32()
	o.RcvBuf, o.SndBuf, o.NotSentLowat = d.u32(), d.u32(), d.u32()
	o.TOS = d.u8()
	o.Mark = d.u32()
	o.Priority = d.u32()
	if n := int(d.u8()); n > maxCongestionName {
		return nil, fmt.Errorf("%w: congestion control name of %d bytes", ErrMalformed, n)
	} else {
		o.Congestion = string(d.bytes(n))
	}
	st.Unsent = d.u32()
	st.SendQueue = d.queue()
	st.RecvQueue = d.queue()
	if d.err != nil {
		return nil, d.err
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(d.b))
	}
	if err := st.Validate(); err != nil {
		return nil, err
	}
	return st, nil
}

// decoder reads big-endian fields and remembers the first error; reads
// after an error return zero values.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.err = fmt.Errorf("%w: truncated (want %d bytes, have %d)", ErrMalformed, n, len(d.b))
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8() uint8 {
	if p := d.take(1); p != nil {
		return p[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if p := d.take(2); p != nil {
		return binary.BigEndian.Uint16(p)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if p := d.take(4); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (d *decoder) bytes(n int) []byte {
	return d.take(n)
}

func (d *decoder) addrPort(alen int) netip.AddrPort {
	p := d.take(alen)
	if p == nil {
		return netip.AddrPort{}
	}
	a, _ := netip.AddrFromSlice(p)
	return netip.AddrPortFrom(a, d.u16())
}

// queue reads a length-prefixed byte string. The length is checked against
// what is left before anything is allocated.
func (d *decoder) queue() []byte {
	n := d.u32()
	if d.err != nil {
		return nil
	}
	if n > MaxQueueLen {
		d.err = fmt.Errorf("%w: queue of %d bytes exceeds %d", ErrMalformed, n, MaxQueueLen)
		return nil
	}
	p := d.take(int(n))
	if p == nil || n == 0 {
		return nil
	}
	return append([]byte(nil), p...)
}

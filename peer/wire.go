package peer

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"
	"unsafe"
)

// Wire format, version 1. Every frame is
//
//	length  uint32, big endian: bytes of payload
//	type    uint8: msgXxx
//	id      uint64, big endian: request id (0: the connection itself)
//	payload length bytes
//
// A payload is a sequence of fixed-size big-endian integers, strings and
// byte blobs (uint32 length + bytes: no base64, no copy on the receiving
// side), addresses (uint8 length + netip.Addr binary form) and ports
// (uint16). A request payload begins with the time left before the
// caller's deadline in nanoseconds (uint64, 0: none); the server's
// handler context gets that deadline, counted from the arrival of the
// frame's header.
//
// After the TLS handshake the client sends a hello frame (id 0: "MTCP",
// highest protocol version it speaks as uint16, its MaxFrame as uint32);
// the server answers with a hello naming the version both will speak and
// its own MaxFrame, or with an error frame and closes. Neither side sends
// a frame larger than the other's MaxFrame.
const (
	protoVersion = 1
	helloMagic   = "MTCP"
	headerLen    = 13 // length, type, id
	// timeoutOff is where a request's timeout sits in its frame.
	timeoutOff = headerLen
	// helloMax bounds the frames exchanged before the hello is done.
	helloMax = 64 << 10
	// bigBlob: byte strings at least this long are written from the
	// caller's memory, not copied into the frame buffer.
	bigBlob = 32 << 10
	// maxInflight bounds the requests a server runs at once for one
	// connection; the connection's reader waits beyond that.
	maxInflight = 256
	// defaultMaxFrame and defaultHandshakeTimeout are the zero values
	// of Config.MaxFrame and Config.HandshakeTimeout.
	defaultMaxFrame         = 64 << 20
	defaultHandshakeTimeout = 5 * time.Second
	// defaultMaxRequestTime is the zero value of Config.MaxRequestTime.
	defaultMaxRequestTime = 10 * time.Minute
	// smallFrame is the largest frame a server reads without charging
	// it to its frame memory (Config.FrameMemory): every request but a
	// Transfer of large queues, or of many connections, and a process's
	// images.
	smallFrame = helloMax
	// readChunk is what a frame's length alone makes the reader
	// allocate; beyond it, the frame's buffer grows with its data.
	readChunk = 256 << 10
	// alpn is the TLS application protocol of the peer channel: a TLS
	// client of the same CA speaking anything else is refused.
	alpn = "mtcp-peer"
)

// frameStall ends a connection on which a frame larger than readChunk
// stops arriving for this long. A variable for the tests.
var frameStall = 30 * time.Second

// msgType is a frame's message type.
type msgType uint8

const (
	msgHello  msgType = 0x01 // connection setup, both directions
	msgError  msgType = 0x02 // reply: the handler failed; id 0: the connection is being closed
	msgCancel msgType = 0x03 // client: the caller gave up on request id

	msgPrepare  msgType = 0x10
	msgTransfer msgType = 0x11
	msgCommit   msgType = 0x12
	msgAbort    msgType = 0x13
	msgStatus   msgType = 0x14
	msgSteer    msgType = 0x15

	// Process mode (process.go).
	msgProcPrepare msgType = 0x20
	msgProcRestore msgType = 0x21
	msgProcFinish  msgType = 0x22
	msgProcPages   msgType = 0x23 // opens a pages stream: raw bytes follow

	// replyBit marks the successful reply to a request type.
	replyBit msgType = 0x80
)

func (t msgType) String() string {
	if t&replyBit != 0 {
		if b := t &^ replyBit; requestBody(b) != nil {
			return b.String() + " reply"
		}
		return fmt.Sprintf("message type 0x%02x", uint8(t))
	}
	switch t {
	case msgHello:
		return "hello"
	case msgError:
		return "error"
	case msgCancel:
		return "cancel"
	case msgPrepare:
		return "Prepare"
	case msgTransfer:
		return "Transfer"
	case msgCommit:
		return "Commit"
	case msgAbort:
		return "Abort"
	case msgStatus:
		return "Status"
	case msgSteer:
		return "Steer"
	case msgProcPrepare:
		return "ProcessPrepare"
	case msgProcRestore:
		return "ProcessRestore"
	case msgProcFinish:
		return "ProcessFinish"
	case msgProcPages:
		return "pages stream"
	}
	return fmt.Sprintf("message type 0x%02x", uint8(t))
}

// frame is one received frame. payload is the frame's own buffer:
// decoded byte blobs alias it.
type frame struct {
	typ     msgType
	id      uint64
	payload []byte
	at      time.Time // when the header arrived
	release func()    // gives back the payload's charge, if any
}

// done gives back the frame's charge to its server's frame memory.
func (f *frame) done() {
	if f.release != nil {
		f.release()
		f.release = nil
	}
}

// readFrame reads one frame of at most max payload bytes. It checks the
// length before allocating. At a frame boundary a closed stream gives
// io.EOF; anything else wrong is an error wrapping ErrProtocol, or the
// stream's own error.
func readFrame(r io.Reader, max int) (frame, error) {
	return readFrameCharged(r, max, nil)
}

// readFrameCharged is readFrame that, for a payload over smallFrame, first
// has charge take its size from the memory its reader may hold, before
// reading it (charge may wait; its error ends the read). The frame's done
// gives it back; readFrameCharged does if it fails.
func readFrameCharged(r io.Reader, max int, charge func(n int) (release func(), err error)) (frame, error) {
	var h [headerLen]byte
	if n, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF || (err == io.EOF && n > 0) {
			return frame{}, fmt.Errorf("%w: stream ended inside a frame header", ErrProtocol)
		}
		return frame{}, err
	}
	f := frame{typ: msgType(h[4]), id: binary.BigEndian.Uint64(h[5:]), at: time.Now()}
	n := binary.BigEndian.Uint32(h[:4])
	if uint64(n) > uint64(max) {
		return frame{}, fmt.Errorf("%w: %v frame of %d bytes exceeds the limit of %d (MaxFrame)", ErrProtocol, f.typ, n, max)
	}
	if charge != nil && n > smallFrame {
		release, err := charge(int(n))
		if err != nil {
			return frame{}, err
		}
		f.release = release
	}
	var err error
	if f.payload, err = readPayload(r, int(n)); err != nil {
		f.done()
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return frame{}, fmt.Errorf("%w: stream ended inside a %v frame of %d bytes", ErrProtocol, f.typ, n)
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return frame{}, fmt.Errorf("%w: %v frame of %d bytes stalled: no data for %v", ErrProtocol, f.typ, n, frameStall)
		}
		return frame{}, err
	}
	return f, nil
}

// readPayload reads n bytes. Its buffer grows as they arrive, at most
// sixteenfold at a time from readChunk: a length alone, sent without its
// bytes, makes it allocate no more than that, and a large frame costs
// few copies. Past the first chunk, if r can set read deadlines, a frame
// that brings nothing for frameStall ends it with a deadline error (the
// deadline moves on at most every frameStall/8 of progress, not at every
// read), and leaves r without a deadline otherwise.
func readPayload(r io.Reader, n int) ([]byte, error) {
	b := make([]byte, min(n, readChunk))
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	if n == len(b) {
		return b, nil
	}
	dl, _ := r.(interface{ SetReadDeadline(time.Time) error })
	if dl != nil {
		defer dl.SetReadDeadline(time.Time{})
	}
	var moved time.Time // when the deadline was last moved on
	for len(b) < n {
		if len(b) == cap(b) {
			// Not slices.Grow: it would also copy the zeroes of its
			// new part.
			nb := make([]byte, len(b), min(n, 16*cap(b)))
			copy(nb, b)
			b = nb
		}
		if now := time.Now(); dl != nil && now.Sub(moved) >= frameStall/8 {
			dl.SetReadDeadline(now.Add(frameStall))
			moved = now
		}
		m, err := r.Read(b[len(b):min(n, cap(b))])
		b = b[:len(b)+m]
		if err != nil && len(b) < n {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return b, nil
}

// body is a message's payload.
type body interface {
	encode(*encoder)
	decode(*decoder)
}

// encoder builds a frame. Small fields go into one buffer; large blobs
// are kept by reference and written from the caller's memory.
type encoder struct {
	segs [][]byte
	cur  []byte
	err  error
}

func newEncoder(t msgType, id uint64) *encoder {
	e := &encoder{cur: make([]byte, headerLen, 512)}
	e.cur[4] = byte(t)
	binary.BigEndian.PutUint64(e.cur[5:], id)
	return e
}

func (e *encoder) u8(v uint8)   { e.cur = append(e.cur, v) }
func (e *encoder) u16(v uint16) { e.cur = binary.BigEndian.AppendUint16(e.cur, v) }
func (e *encoder) u32(v uint32) { e.cur = binary.BigEndian.AppendUint32(e.cur, v) }
func (e *encoder) u64(v uint64) { e.cur = binary.BigEndian.AppendUint64(e.cur, v) }
func (e *encoder) i64(v int64)  { e.u64(uint64(v)) }

func (e *encoder) boolean(v bool) {
	if v {
		e.u8(1)
	} else {
		e.u8(0)
	}
}

func (e *encoder) length(n int, what string) {
	if uint64(n) > math.MaxUint32 {
		if e.err == nil {
			e.err = fmt.Errorf("%s of %d bytes or items is too long to encode", what, n)
		}
		n = 0
	}
	e.u32(uint32(n))
}

func (e *encoder) str(s string) {
	e.length(len(s), "string")
	e.cur = append(e.cur, s...)
}

func (e *encoder) blob(b []byte) {
	e.length(len(b), "byte string")
	if len(b) < bigBlob {
		e.cur = append(e.cur, b...)
		return
	}
	// Go on in the rest of the same buffer: the finished segment's
	// length is fixed, so appends cannot overwrite it.
	e.segs = append(e.segs, e.cur, b)
	e.cur = e.cur[len(e.cur):]
}

// grow makes room for n more bytes of small fields.
func (e *encoder) grow(n int) { e.cur = slices.Grow(e.cur, n) }

func (e *encoder) addr(a netip.Addr) {
	n := addrSize(a) - 1
	if n > math.MaxUint8 {
		if e.err == nil {
			e.err = fmt.Errorf("address %v: zone too long to encode", a)
		}
		e.u8(0)
		return
	}
	e.u8(uint8(n))
	e.cur, _ = a.AppendBinary(e.cur) // never fails
}

func (e *encoder) addrPort(ap netip.AddrPort) {
	e.addr(ap.Addr())
	e.u16(ap.Port())
}

func (e *encoder) flow(f FlowID) {
	e.addrPort(f.Client)
	e.addrPort(f.Service)
}

func (e *encoder) time(t time.Time) {
	if t.IsZero() {
		e.u8(0)
		return
	}
	e.u8(1)
	e.i64(t.Unix())
	e.u32(uint32(t.Nanosecond()))
}

// finish completes the frame: its segments and its payload length.
func (e *encoder) finish() (segs [][]byte, payload int, err error) {
	if e.err != nil {
		return nil, 0, e.err
	}
	if len(e.cur) > 0 {
		e.segs = append(e.segs, e.cur)
	}
	total := 0
	for _, s := range e.segs {
		total += len(s)
	}
	payload = total - headerLen
	if uint64(payload) > math.MaxUint32 {
		return nil, 0, fmt.Errorf("%w: %d bytes do not fit in one frame", ErrFrameTooLarge, payload)
	}
	binary.BigEndian.PutUint32(e.segs[0][:4], uint32(payload))
	return e.segs, payload, nil
}

// decoder reads a payload. The first error sticks; later reads return
// zero values.
type decoder struct {
	b    []byte
	err  error
	last string // the last string decoded, reused when repeated
	// budget is what the lists of the payload may still take in memory
	// once decoded (see count).
	budget int
}

// decodeBudget is what a payload of n bytes may take in memory once
// decoded, in its lists' elements: a few times n, as a real element's
// encoding is about as large as the element (an IPv4 address is the
// worst, 5 bytes for 24), and a little more for small payloads.
func decodeBudget(n int) int { return 6*n + 64<<10 }

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf(format, args...)
	}
}

func (d *decoder) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n > len(d.b) {
		d.fail("%s: need %d bytes, %d left", what, n, len(d.b))
		d.b = nil
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u8() uint8 {
	if b := d.take(1, "uint8"); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if b := d.take(2, "uint16"); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.take(4, "uint32"); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.take(8, "uint64"); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

func (d *decoder) i64() int64 { return int64(d.u64()) }

func (d *decoder) integer() int {
	v := d.i64()
	if int64(int(v)) != v {
		d.fail("integer %d out of range", v)
		return 0
	}
	return int(v)
}

func (d *decoder) boolean() bool {
	switch v := d.u8(); v {
	case 0:
		return false
	case 1:
		return true
	default:
		d.fail("boolean is %d, not 0 or 1", v)
		return false
	}
}

func (d *decoder) str() string {
	b := d.take(int(d.u32()), "string")
	// A Transfer of many connections repeats one service name.
	if string(b) != d.last {
		d.last = string(b)
	}
	return d.last
}

// blob returns the next byte string, aliasing the payload; nil if empty.
func (d *decoder) blob() []byte {
	b := d.take(int(d.u32()), "byte string")
	if len(b) == 0 {
		return nil
	}
	return b
}

// count reads a number of elements of at least min bytes each, which
// take mem bytes each once decoded, refusing more than the rest of the
// payload can hold, and more than the payload's memory budget has left:
// a frame of small elements never makes the decoder allocate many times
// its own size.
func (d *decoder) count(min int, mem uintptr, what string) int {
	n := d.u32()
	switch {
	case d.err != nil:
		return 0
	case uint64(n) > uint64(len(d.b)/min):
		d.fail("%d %s do not fit in the %d bytes left", n, what, len(d.b))
		return 0
	case uint64(n)*uint64(mem) > uint64(d.budget):
		d.fail("%d %s would take %d bytes to decode, more than a frame of its size may", n, what, uint64(n)*uint64(mem))
		return 0
	}
	d.budget -= int(n) * int(mem)
	return int(n)
}

func (d *decoder) addr() netip.Addr {
	b := d.take(int(d.u8()), "address")
	if d.err != nil {
		return netip.Addr{}
	}
	var a netip.Addr
	if err := a.UnmarshalBinary(b); err != nil {
		d.fail("address of %d bytes: %v", len(b), err)
	}
	return a
}

func (d *decoder) addrPort() netip.AddrPort {
	a := d.addr()
	return netip.AddrPortFrom(a, d.u16())
}

func (d *decoder) flow() FlowID {
	c := d.addrPort()
	return FlowID{Client: c, Service: d.addrPort()}
}

func (d *decoder) time() time.Time {
	switch d.u8() {
	case 0:
		return time.Time{}
	case 1:
		s, ns := d.i64(), d.u32()
		if ns >= 1e9 {
			d.fail("time: %d nanoseconds", ns)
		}
		t := time.Unix(s, int64(ns))
		if t.IsZero() {
			d.fail("time: zero time not encoded as such")
		}
		return t
	default:
		d.fail("time: bad flag")
		return time.Time{}
	}
}

// decodeBody decodes a whole payload into b.
func decodeBody(payload []byte, b body) error {
	d := decoder{b: payload, budget: decodeBudget(len(payload))}
	b.decode(&d)
	if d.err == nil && len(d.b) > 0 {
		d.fail("%d bytes left over", len(d.b))
	}
	return d.err
}

// Minimum encoded sizes, for decoder.count.
const (
	minFlow   = 2 * (1 + 2)         // two empty addresses and ports
	minItem   = minFlow + 4 + 4 + 4 // flow, three empty strings
	minResult = 1 + 4               // bool, empty string
	minString = 4                   // length
)

func (r *PrepareRequest) encode(e *encoder) {
	e.u64(r.TxID)
	e.str(r.Service)
	e.i64(int64(r.Count))
	e.i64(r.Bytes)
}

func (r *PrepareRequest) decode(d *decoder) {
	r.TxID = d.u64()
	r.Service = d.str()
	r.Count = d.integer()
	r.Bytes = d.i64()
}

func (r *PrepareReply) encode(e *encoder) {
	e.boolean(r.OK)
	e.str(r.Reason)
}

func (r *PrepareReply) decode(d *decoder) {
	r.OK = d.boolean()
	r.Reason = d.str()
}

func (r *TransferRequest) encode(e *encoder) {
	n := 8 + 4
	for i := range r.Items {
		it := &r.Items[i]
		n += flowSize(it.Flow) + 4 + len(it.Service) + 4 + 4
		if len(it.State) < bigBlob {
			n += len(it.State)
		}
		if len(it.App) < bigBlob {
			n += len(it.App)
		}
	}
	e.grow(n)
	e.u64(r.TxID)
	e.length(len(r.Items), "item list")
	for i := range r.Items {
		it := &r.Items[i]
		e.flow(it.Flow)
		e.str(it.Service)
		e.blob(it.State)
		e.blob(it.App)
	}
}

func (r *TransferRequest) decode(d *decoder) {
	r.TxID = d.u64()
	n := d.count(minItem, unsafe.Sizeof(Item{}), "items")
	if n == 0 {
		return
	}
	r.Items = make([]Item, n)
	for i := range r.Items {
		it := &r.Items[i]
		it.Flow = d.flow()
		it.Service = d.str()
		it.State = d.blob()
		it.App = d.blob()
	}
}

// WireSize is the size of r's frame payload: a Transfer is refused
// locally, with an error wrapping [ErrFrameTooLarge], when it exceeds the
// peer's [Client.MaxFrame]. Split larger batches into several Transfers.
func (r *TransferRequest) WireSize() int {
	n := 8 + 8 + 4 // timeout, TxID, item count
	for i := range r.Items {
		n += r.Items[i].WireSize()
	}
	return n
}

// WireSize is what it adds to a [TransferRequest]'s WireSize, so that a
// sender filling a request can keep a running total instead of
// recomputing the whole request's size for every item.
func (it *Item) WireSize() int {
	return flowSize(it.Flow) + 4 + len(it.Service) + 4 + len(it.State) + 4 + len(it.App)
}

func flowSize(f FlowID) int {
	return addrSize(f.Client.Addr()) + 2 + addrSize(f.Service.Addr()) + 2
}

func addrSize(a netip.Addr) int {
	switch {
	case a.Is4():
		return 1 + 4
	case a.Is6():
		return 1 + 16 + len(a.Zone())
	}
	return 1
}

func encodeResults(e *encoder, rs []ItemResult) {
	e.length(len(rs), "result list")
	for _, r := range rs {
		e.boolean(r.OK)
		e.str(r.Error)
	}
}

func decodeResults(d *decoder) []ItemResult {
	n := d.count(minResult, unsafe.Sizeof(ItemResult{}), "results")
	if n == 0 {
		return nil
	}
	rs := make([]ItemResult, n)
	for i := range rs {
		rs[i].OK = d.boolean()
		rs[i].Error = d.str()
	}
	return rs
}

func (r *TransferReply) encode(e *encoder) { encodeResults(e, r.Results) }
func (r *TransferReply) decode(d *decoder) { r.Results = decodeResults(d) }

func (r *CommitRequest) encode(e *encoder) { e.u64(r.TxID) }
func (r *CommitRequest) decode(d *decoder) { r.TxID = d.u64() }

func (r *CommitReply) encode(e *encoder) { encodeResults(e, r.Results) }
func (r *CommitReply) decode(d *decoder) { r.Results = decodeResults(d) }

func (r *AbortRequest) encode(e *encoder) {
	e.u64(r.TxID)
	e.str(r.Reason)
}

func (r *AbortRequest) decode(d *decoder) {
	r.TxID = d.u64()
	r.Reason = d.str()
}

func (*StatusRequest) encode(*encoder) {}
func (*StatusRequest) decode(*decoder) {}

func (r *StatusReply) encode(e *encoder) {
	e.str(r.Name)
	e.u64(math.Float64bits(r.Load))
	e.i64(int64(r.Conns))
	e.length(len(r.Services), "service list")
	for _, s := range r.Services {
		e.str(s)
	}
	e.time(r.Time)
	keys := make([]string, 0, len(r.Figures))
	for k := range r.Figures {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	e.length(len(keys), "figures")
	for _, k := range keys {
		e.str(k)
		e.u64(math.Float64bits(r.Figures[k]))
	}
}

func (r *StatusReply) decode(d *decoder) {
	r.Name = d.str()
	r.Load = math.Float64frombits(d.u64())
	r.Conns = d.integer()
	if n := d.count(minString, unsafe.Sizeof(""), "services"); n > 0 {
		r.Services = make([]string, n)
		for i := range r.Services {
			r.Services[i] = d.str()
		}
	}
	r.Time = d.time()
	if n := d.count(minString+8, unsafe.Sizeof("")+8, "figures"); n > 0 {
		r.Figures = make(map[string]float64, n)
		for range n {
			k := d.str()
			r.Figures[k] = math.Float64frombits(d.u64())
		}
	}
}

func (r *SteerRequest) encode(e *encoder) {
	e.str(r.Op)
	e.length(len(r.Flows), "flow list")
	for _, f := range r.Flows {
		e.flow(f)
	}
	e.addr(r.To)
}

func (r *SteerRequest) decode(d *decoder) {
	r.Op = d.str()
	if n := d.count(minFlow, unsafe.Sizeof(FlowID{}), "flows"); n > 0 {
		r.Flows = make([]FlowID, n)
		for i := range r.Flows {
			r.Flows[i] = d.flow()
		}
	}
	r.To = d.addr()
}

// empty is the payload of replies that carry nothing (Abort, Steer) and
// of cancel frames.
type empty struct{}

func (*empty) encode(*encoder) {}
func (*empty) decode(*decoder) {}

// errorBody is the payload of an error frame.
type errorBody struct{ msg string }

func (b *errorBody) encode(e *encoder) { e.str(b.msg) }
func (b *errorBody) decode(d *decoder) { b.msg = d.str() }

// hello is the payload of hello frames.
type hello struct {
	version  uint16
	maxFrame uint32
}

func (h *hello) encode(e *encoder) {
	e.cur = append(e.cur, helloMagic...)
	e.u16(h.version)
	e.u32(h.maxFrame)
}

func (h *hello) decode(d *decoder) {
	if m := d.take(len(helloMagic), "magic"); d.err == nil && string(m) != helloMagic {
		d.fail("not an mtcp peer hello (magic %q)", m)
		return
	}
	h.version = d.u16()
	h.maxFrame = d.u32()
}

// requestBody returns an empty request of type t, nil if t is not a
// request type.
func requestBody(t msgType) body {
	switch t {
	case msgPrepare:
		return new(PrepareRequest)
	case msgTransfer:
		return new(TransferRequest)
	case msgCommit:
		return new(CommitRequest)
	case msgAbort:
		return new(AbortRequest)
	case msgStatus:
		return new(StatusRequest)
	case msgSteer:
		return new(SteerRequest)
	}
	return processBody(t)
}

// decodeRequest decodes a request frame's payload: its timeout and body.
func decodeRequest(f frame) (time.Duration, body, error) {
	b := requestBody(f.typ)
	if b == nil {
		return 0, nil, fmt.Errorf("%w: unknown %v", ErrProtocol, f.typ)
	}
	if len(f.payload) < 8 {
		return 0, nil, fmt.Errorf("%w: %v request of %d bytes has no timeout", ErrProtocol, f.typ, len(f.payload))
	}
	t := binary.BigEndian.Uint64(f.payload)
	if t > math.MaxInt64 {
		return 0, nil, fmt.Errorf("%w: %v request: timeout out of range", ErrProtocol, f.typ)
	}
	if err := decodeBody(f.payload[8:], b); err != nil {
		return 0, nil, fmt.Errorf("%w: %v request: %v", ErrProtocol, f.typ, err)
	}
	return time.Duration(t), b, nil
}

// wire is the writing half of a connection, shared by concurrent
// requests: one frame at a time.
type wire struct {
	conn      net.Conn
	wsem      chan struct{}
	closeOnce sync.Once
	closed    chan struct{}
}

func newWire(c net.Conn) *wire {
	return &wire{conn: c, wsem: make(chan struct{}, 1), closed: make(chan struct{})}
}

func (w *wire) close() {
	w.closeOnce.Do(func() {
		close(w.closed)
		w.conn.Close()
	})
}

// aLongTimeAgo is a deadline that has passed: it interrupts a write.
var aLongTimeAgo = time.Unix(1, 0)

// send writes one frame, waiting for its turn until ctx is done. before,
// if not nil, runs once the frame has the connection, just before it is
// written. A write cut short by ctx, or failing, closes the connection:
// the stream would resume inside a frame.
func (w *wire) send(ctx context.Context, segs [][]byte, before func()) error {
	select {
	case w.wsem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-w.closed:
		return net.ErrClosed
	}
	defer func() { <-w.wsem }()
	if err := ctx.Err(); err != nil {
		return err
	}
	if before != nil {
		before()
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		w.conn.SetWriteDeadline(aLongTimeAgo)
		close(fired)
	})
	bufs := net.Buffers(coalesce(segs))
	_, err := bufs.WriteTo(w.conn)
	if !stop() {
		<-fired
		if err == nil {
			w.conn.SetWriteDeadline(time.Time{})
		}
	}
	if err != nil {
		w.close()
		if ctx.Err() != nil {
			return fmt.Errorf("%w (writing a frame; the connection was closed)", ctx.Err())
		}
		return err
	}
	return nil
}

// coalesceMax is the largest frame send copies into one buffer: what fits
// in one TLS record.
const coalesceMax = 16 << 10

// coalesce joins a frame's segments into one when the frame is small
// enough. A TLS connection writes each segment as records of its own, in
// a system call of its own; the peer then needs as many reads.
func coalesce(segs [][]byte) [][]byte {
	if len(segs) < 2 {
		return segs
	}
	n := 0
	for _, s := range segs {
		n += len(s)
	}
	if n > coalesceMax {
		return segs
	}
	b := make([]byte, 0, n)
	for _, s := range segs {
		b = append(b, s...)
	}
	return [][]byte{b}
}

// sendBody encodes and sends a frame of type t carrying b.
func (w *wire) sendBody(ctx context.Context, t msgType, id uint64, b body, max int) error {
	e := newEncoder(t, id)
	b.encode(e)
	segs, n, err := e.finish()
	if err != nil {
		return err
	}
	if n > max {
		return fmt.Errorf("%w: %v frame of %d bytes exceeds the peer's limit of %d", ErrFrameTooLarge, t, n, max)
	}
	return w.send(ctx, segs, nil)
}

// isClosedErr tells whether err only says that the connection was closed
// (by either side) rather than that something went wrong on it.
func isClosedErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)
}

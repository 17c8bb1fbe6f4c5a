package peer

import (
	"bytes"
	"encoding/binary"
	"math"
	"net/netip"
	"reflect"
	"testing"
	"time"
	"unsafe"
)

// samples are one value of every message body, for round trips and as
// fuzz seeds.
func samples() map[msgType]body {
	return map[msgType]body{
		msgPrepare:  &PrepareRequest{TxID: 1, Service: ":7000", Count: 10000, Bytes: -1},
		msgTransfer: &TransferRequest{TxID: 2, Items: []Item{{Flow: testFlow, Service: ":7000", State: []byte{1, 2, 3}, App: bytes.Repeat([]byte{9}, bigBlob+1)}, {}}},
		msgCommit:   &CommitRequest{TxID: math.MaxUint64},
		msgAbort:    &AbortRequest{TxID: 4, Reason: "source aborted"},
		msgStatus:   &StatusRequest{},
		msgSteer: &SteerRequest{Op: SteerSwitch, To: netip.MustParseAddr("fe80::1%eth0"), Flows: []FlowID{testFlow,
			{Client: netip.MustParseAddrPort("[::ffff:10.0.0.1]:1"), Service: netip.MustParseAddrPort("[fe80::2%veth1]:65535")}}},
		msgPrepare | replyBit:  &PrepareReply{OK: true, Reason: "ok"},
		msgTransfer | replyBit: &TransferReply{Results: []ItemResult{{OK: true}, {Error: "restore: EBUSY"}}},
		msgCommit | replyBit:   &CommitReply{Results: []ItemResult{{OK: true}}},
		msgAbort | replyBit:    &empty{},
		msgStatus | replyBit:   &StatusReply{Name: "s1", Load: math.Inf(1), Conns: -1, Services: []string{":7000", ""}, Time: time.Unix(1700000000, 999999999)},
		msgSteer | replyBit:    &empty{},
		msgError:               &errorBody{"handler failed"},
		msgHello:               &hello{version: 1, maxFrame: 1 << 26},
		msgCancel:              &empty{},
	}
}

// newBody returns an empty body for a frame of type t, nil if there is
// none.
func newBody(t msgType) body {
	if b := requestBody(t); b != nil {
		return b
	}
	switch t {
	case msgPrepare | replyBit:
		return new(PrepareReply)
	case msgTransfer | replyBit:
		return new(TransferReply)
	case msgCommit | replyBit:
		return new(CommitReply)
	case msgStatus | replyBit:
		return new(StatusReply)
	case msgAbort | replyBit, msgSteer | replyBit, msgCancel:
		return new(empty)
	case msgError:
		return new(errorBody)
	case msgHello:
		return new(hello)
	}
	return nil
}

func isRequest(t msgType) bool { return requestBody(t) != nil }

// frameBytes encodes b as the frame of type t; requests get timeout.
func frameBytes(t msgType, id uint64, timeout uint64, b body) ([]byte, error) {
	e := newEncoder(t, id)
	if isRequest(t) {
		e.u64(timeout)
	}
	b.encode(e)
	segs, _, err := e.finish()
	return bytes.Join(segs, nil), err
}

func TestRoundTrip(t *testing.T) {
	for typ, want := range samples() {
		raw, err := frameBytes(typ, 42, 1e9, want)
		if err != nil {
			t.Fatalf("%v: %v", typ, err)
		}
		f, err := readFrame(bytes.NewReader(raw), len(raw))
		if err != nil {
			t.Fatalf("%v: %v", typ, err)
		}
		if f.typ != typ || f.id != 42 {
			t.Errorf("%v: read type %v id %d", typ, f.typ, f.id)
		}
		got := newBody(typ)
		if isRequest(typ) {
			timeout, b, err := decodeRequest(f)
			if err != nil {
				t.Fatalf("%v: %v", typ, err)
			}
			if timeout != time.Second {
				t.Errorf("%v: timeout %v", typ, timeout)
			}
			got = b
		} else if err := decodeBody(f.payload, got); err != nil {
			t.Fatalf("%v: %v", typ, err)
		}
		if sr, ok := want.(*StatusReply); ok {
			// time.Time values differ in location; compare instants.
			g := *got.(*StatusReply)
			if !g.Time.Equal(sr.Time) {
				t.Errorf("status time %v, want %v", g.Time, sr.Time)
			}
			g.Time = sr.Time
			got = &g
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%v: got %+v, want %+v", typ, got, want)
		}
		if tr, ok := want.(*TransferRequest); ok && tr.WireSize() != len(f.payload) {
			t.Errorf("WireSize = %d, payload is %d bytes", tr.WireSize(), len(f.payload))
		}
	}
}

// TestDecodeRejectsEveryTruncation: each proper prefix of a valid payload
// is an error, never a panic or a silent success.
func TestDecodeRejectsEveryTruncation(t *testing.T) {
	for typ, b := range samples() {
		raw, _ := frameBytes(typ, 1, 0, b)
		payload := raw[headerLen:]
		if len(payload) == 0 {
			continue
		}
		for n := range len(payload) {
			if isRequest(typ) {
				f := frame{typ: typ, id: 1, payload: payload[:n]}
				if _, _, err := decodeRequest(f); err == nil {
					t.Errorf("%v: %d of %d bytes decoded", typ, n, len(payload))
				}
			} else if err := decodeBody(payload[:n], newBody(typ)); err == nil {
				t.Errorf("%v: %d of %d bytes decoded", typ, n, len(payload))
			}
		}
	}
}

// FuzzDecodeFrame feeds arbitrary bytes to the frame reader and payload
// decoders: they must never panic nor allocate beyond the frame limit,
// and whatever decodes must encode back to the same bytes (the encoding
// is canonical, so nothing is lost or invented).
func FuzzDecodeFrame(f *testing.F) {
	for typ, b := range samples() {
		if tr, ok := b.(*TransferRequest); ok {
			// Large seeds make the fuzzer's minimization crawl.
			tr.Items[0].App = tr.Items[0].App[:10]
		}
		raw, err := frameBytes(typ, 7, 12345, b)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	f.Add(header(0xffffffff, msgTransfer, 1))
	f.Add([]byte{0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		const max = 1 << 20
		fr, err := readFrame(bytes.NewReader(data), max)
		if err != nil {
			if len(data) >= headerLen {
				if n := int(binary.BigEndian.Uint32(data)); n <= max && len(data) >= headerLen+n {
					t.Fatalf("complete frame refused: %v", err)
				}
			}
			return
		}
		var b body
		var timeout time.Duration
		if isRequest(fr.typ) {
			timeout, b, err = decodeRequest(fr)
		} else if b = newBody(fr.typ); b != nil {
			err = decodeBody(fr.payload, b)
		} else {
			return
		}
		if err != nil {
			return
		}
		again, err := frameBytes(fr.typ, fr.id, uint64(timeout), b)
		if err != nil {
			t.Fatalf("%v decoded but does not encode: %v", fr.typ, err)
		}
		if orig := data[:headerLen+len(fr.payload)]; !bytes.Equal(again, orig) {
			t.Fatalf("%v: decoded %+v re-encodes as\n%x\nnot\n%x", fr.typ, b, again, orig)
		}
	})
}

// TestDecodeBudget: a list of tiny elements is refused before it is
// allocated when decoded it would take many times the frame's size (an
// authenticated peer could otherwise make a daemon allocate gigabytes
// with one frame); a real list of IPv4 addresses, the most compact
// element there is, is not.
func TestDecodeBudget(t *testing.T) {
	payload := func(n uint32, each []byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, n)
		for range n {
			b = append(b, each...)
		}
		return b
	}
	mem := unsafe.Sizeof(netip.Addr{})
	hostile := payload(200_000, []byte{0}) // empty addresses, one byte each
	d := decoder{b: hostile, budget: decodeBudget(len(hostile))}
	if n := d.count(1, mem, "addresses"); n != 0 || d.err == nil {
		t.Fatalf("200,000 one-byte addresses in %d bytes: count %d, err %v; want refused", len(hostile), n, d.err)
	}
	real := payload(20_000, []byte{4, 10, 77, 2, 11})
	d = decoder{b: real, budget: decodeBudget(len(real))}
	if n := d.count(1, mem, "addresses"); n != 20_000 || d.err != nil {
		t.Fatalf("20,000 IPv4 addresses in %d bytes: count %d, err %v", len(real), n, d.err)
	}
}

package repair

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
	"reflect"
	"testing"
)

func sampleState() *State {
	return &State{
		Local:     netip.MustParseAddrPort("10.77.2.11:8080"),
		Remote:    netip.MustParseAddrPort("10.77.1.2:40000"),
		TCPState:  StateEstablished,
		SendSeq:   0xfffffff0,
		RecvSeq:   12345,
		SendQueue: []byte("sent-and-unacked|unsent"),
		Unsent:    6,
		RecvQueue: []byte("request"),
		MSS:       1448,
		Options:   OptTimestamps | OptSACK | OptWindowScale,
		SndWScale: 7,
		RcvWScale: 9,
		Timestamp: 987654,
		Window:    Window{SndWL1: 1, SndWnd: 65535 << 7, MaxWindow: 65535 << 7, RcvWnd: 1 << 20, RcvWup: 12345},
		Sockopts: Sockopts{NoDelay: true, KeepAlive: true, KeepIdle: 30, KeepIntvl: 5, KeepCnt: 3,
			UserTimeout: 10000, Congestion: "cubic", RcvBuf: 131072, SndBuf: 16384, NotSentLowat: 4096,
			RcvBufLock: true, TOS: 0x10, Mark: 7, Priority: 3},
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	v6 := sampleState()
	v6.Local = netip.MustParseAddrPort("[fd77:2::11]:8080")
	v6.Remote = netip.MustParseAddrPort("[fd77:1::2]:40000")
	empty := sampleState()
	empty.SendQueue, empty.RecvQueue, empty.Unsent = nil, nil, 0
	empty.Options, empty.SndWScale, empty.RcvWScale, empty.Timestamp = 0, 0, 0, 0
	empty.Sockopts = Sockopts{}
	pending := sampleState()
	pending.AckPending = true
	for name, st := range map[string]*State{"v4": sampleState(), "v6": v6, "empty": empty, "ack pending": pending} {
		b, err := st.MarshalBinary()
		if err != nil {
			t.Fatalf("%s: marshal: %v", name, err)
		}
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("%s: decode: %v", name, err)
		}
		if !reflect.DeepEqual(got, st) {
			t.Fatalf("%s: round trip changed the state:\n got %+v\nwant %+v", name, got, st)
		}
		b2, _ := got.MarshalBinary()
		if !bytes.Equal(b, b2) {
			t.Fatalf("%s: encoding is not canonical", name)
		}
	}
}

// reseal fixes up the checksum after a test edits an encoding, so that the
// decoder's other checks are the ones exercised.
func reseal(b []byte) []byte {
	end := len(b) - trailerLen
	binary.BigEndian.PutUint32(b[end:], crc32.Checksum(b[:end], castagnoli))
	return b
}

func TestDecodeRejects(t *testing.T) {
	good, err := sampleState().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	body := headerLen
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, ErrMalformed},
		{"truncated", good[:len(good)-1], ErrMalformed},
		{"trailing", append(append([]byte(nil), good...), 0), ErrMalformed},
		{"magic", edit(func(b []byte) []byte { b[0] = 'X'; return reseal(b) }), ErrMalformed},
		{"version", edit(func(b []byte) []byte { b[5] = 9; return reseal(b) }), ErrVersion},
		{"unknown flags", edit(func(b []byte) []byte { b[7] = 2; return reseal(b) }), ErrMalformed},
		{"checksum", edit(func(b []byte) []byte { b[len(b)-10] ^= 1; return b }), ErrMalformed},
		{"family", edit(func(b []byte) []byte { b[body] = 5; return reseal(b) }), ErrMalformed},
		{"state", edit(func(b []byte) []byte { b[body+13] = byte(StateListen); return reseal(b) }), ErrMalformed},
		{"zero port", edit(func(b []byte) []byte { b[body+5], b[body+6] = 0, 0; return reseal(b) }), ErrMalformed},
		{"body length", edit(func(b []byte) []byte { b[11]++; return reseal(b) }), ErrMalformed},
		{"huge queue", edit(func(b []byte) []byte {
			// The receive queue's length prefix sits 4+7 bytes before its data.
			off := len(b) - trailerLen - len("request") - 4
			binary.BigEndian.PutUint32(b[off:], 0xfffffff0)
			return reseal(b)
		}), ErrMalformed},
	} {
		st, err := Decode(tc.in)
		if err == nil || !errors.Is(err, tc.want) || st != nil {
			t.Errorf("%s: Decode = %v, %v; want error %v", tc.name, st, err, tc.want)
		}
	}
}

func TestValidateRejects(t *testing.T) {
	for name, f := range map[string]func(*State){
		"mixed families":  func(s *State) { s.Remote = netip.MustParseAddrPort("[fd77::1]:1") },
		"unsent > queue":  func(s *State) { s.Unsent = 1000 },
		"mss":             func(s *State) { s.MSS = 0 },
		"tiny mss":        func(s *State) { s.MSS = 47 },
		"wscale":          func(s *State) { s.SndWScale = 15 },
		"options":         func(s *State) { s.Options |= 0x40 },
		"congestion":      func(s *State) { s.Sockopts.Congestion = "a b" },
		"fin_wait2 data":  func(s *State) { s.TCPState = StateFinWait2 },
		"time_wait":       func(s *State) { s.TCPState = StateTimeWait },
		"v4-mapped":       func(s *State) { s.Local = netip.MustParseAddrPort("[::ffff:1.2.3.4]:1") },
		"keepcnt":         func(s *State) { s.Sockopts.KeepCnt = 1000 },
		"ts without opt":  func(s *State) { s.Options &^= OptTimestamps },
		"wscale no opt":   func(s *State) { s.Options &^= OptWindowScale },
		"missing address": func(s *State) { s.Local = netip.AddrPort{} },
	} {
		st := sampleState()
		f(st)
		if err := st.Validate(); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Validate = %v, want ErrMalformed", name, err)
		}
		if _, err := st.MarshalBinary(); err == nil {
			t.Errorf("%s: MarshalBinary accepted an invalid state", name)
		}
	}
}

// FuzzDecode checks that Decode never panics, and that whatever it accepts
// re-encodes to exactly the same bytes.
func FuzzDecode(f *testing.F) {
	for _, st := range []*State{sampleState(), func() *State {
		s := sampleState()
		s.Local = netip.MustParseAddrPort("[fd77:2::11]:1")
		s.Remote = netip.MustParseAddrPort("[fd77:1::2]:2")
		s.TCPState = StateClosing
		return s
	}()} {
		b, err := st.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("MTCS"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := Decode(b)
		if err != nil {
			if st != nil {
				t.Fatal("state returned with an error")
			}
			return
		}
		b2, err := st.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded state does not re-encode: %v", err)
		}
		if !bytes.Equal(b, b2) {
			t.Fatalf("re-encoding differs")
		}
	})
}

// FuzzDecodeBody fuzzes what follows the header with a valid length and
// checksum around it, so that the fuzzer reaches the field decoders instead
// of stopping at the checksum.
func FuzzDecodeBody(f *testing.F) {
	b, err := sampleState().MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b[headerLen : len(b)-trailerLen])
	f.Fuzz(func(t *testing.T, body []byte) {
		b := make([]byte, 0, headerLen+len(body)+trailerLen)
		b = append(b, magic...)
		b = binary.BigEndian.AppendUint16(b, formatVersion)
		b = binary.BigEndian.AppendUint16(b, 0)
		b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
		b = append(b, body...)
		b = binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
		st, err := Decode(b)
		if err != nil {
			return
		}
		b2, err := st.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded state does not re-encode: %v", err)
		}
		if !bytes.Equal(b, b2) {
			t.Fatalf("re-encoding differs")
		}
	})
}

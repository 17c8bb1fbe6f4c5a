//go:build linux

package app

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"reflect"
	"testing"
)

// binSample is a message with every field of the binary form set.
func binSample() *message {
	t1 := Tuple{Local: netip.MustParseAddrPort("10.0.0.1:7000"), Remote: netip.MustParseAddrPort("[fe80::1%eth0]:40000")}
	t2 := Tuple{Local: netip.MustParseAddrPort("[2001:db8::1]:7000"), Remote: netip.MustParseAddrPort("10.0.0.2:1")}
	return &message{Type: msgExportedMany, ID: 1 << 40, Version: 3, MaxVersion: 9, Service: ":7000", PID: 4242,
		Tuple: &t1, Tuples: []Tuple{t1, t2}, Snapshot: []byte{}, Verdict: verdictGone,
		Items: []item{
			{ID: 1, Tuple: &t2, Snapshot: []byte("state"), FD: true},
			{ID: 2, Snapshot: []byte{}, TCP: &tcpOpts{KeepAlive: true, Idle: 33, Intvl: 7, Count: 4}},
			{ID: 3, Error: "no such connection", Code: codeNoConn},
		},
		FDs: 1, Error: "e", Code: codeGeneric}
}

func TestBinaryRoundTrip(t *testing.T) {
	for _, m := range []*message{binSample(), {Type: msgVerdictMany, Items: []item{{ID: 9}}}, {Type: msgOpened}} {
		body := encodeBinary(nil, m)
		var got message
		if err := decodeBinary(body, &got); err != nil {
			t.Fatalf("%s: %v", m.Type, err)
		}
		if !reflect.DeepEqual(&got, m) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, *m)
		}
	}
}

// Every truncation of a valid body, and every body with a byte too many,
// is refused.
func TestBinaryRefusesGarbage(t *testing.T) {
	body := encodeBinary(nil, binSample())
	for n := 1; n < len(body); n++ {
		var m message
		if err := decodeBinary(body[:n], &m); !errors.Is(err, errBinary) {
			t.Fatalf("body cut to %d of %d bytes: %v", n, len(body), err)
		}
	}
	var m message
	if err := decodeBinary(append(bytes.Clone(body), 0), &m); !errors.Is(err, errBinary) {
		t.Fatalf("a byte too many: %v", err)
	}
	tooMany := append([]byte{binFrame}, appendStr(nil, msgOpened)...)
	tooMany = append(tooMany, 0, 0, 0, 0, 0, 0) // id, version, max_version, service, pid, flags
	tooMany = binary.AppendUvarint(tooMany, maxBatch+1)
	if err := decodeBinary(tooMany, &m); !errors.Is(err, errBinary) {
		t.Fatalf("%d tuples: %v", maxBatch+1, err)
	}
}

// Binary frames pass only once version 3 is agreed, then they carry
// descriptors like JSON ones; garbled ones end the connection.
func TestWireBinaryFrames(t *testing.T) {
	a, b := socketPair(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a.bin.Store(true)
	if err := a.write(&message{Type: msgOpened}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.read(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("binary frame before version 3: %v", err)
	}

	a, b = socketPair(t)
	a.bin.Store(true)
	b.bin.Store(true)
	sent := binSample()
	if err := a.write(sent, int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	m, fds, err := b.read()
	if err != nil {
		t.Fatal(err)
	}
	closeFDs(fds)
	if len(fds) != 1 || m.Items[0].Snapshot == nil || string(m.Items[0].Snapshot) != "state" || *m.Tuple != sent.Tuple.norm() {
		t.Fatalf("got %+v with %d descriptors", m, len(fds))
	}
	body := encodeBinary(nil, &message{Type: msgOpened})
	body[len(body)-1] = 7 // a code length pointing past the end
	a.uc.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...))
	if _, _, err := b.read(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("garbled binary frame: %v", err)
	}
}

// FuzzBinaryDecode: any input decodes or is refused, never panics, and
// what decodes encodes back to the same bytes.
func FuzzBinaryDecode(f *testing.F) {
	f.Add(encodeBinary(nil, binSample()))
	f.Add(encodeBinary(nil, &message{Type: msgOpened}))
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) == 0 || body[0] != binFrame {
			return
		}
		var m message
		if decodeBinary(body, &m) != nil {
			return
		}
		if again := encodeBinary(nil, &m); !bytes.Equal(again, body) {
			var m2 message
			if err := decodeBinary(again, &m2); err != nil || !reflect.DeepEqual(&m, &m2) {
				t.Fatalf("%x decoded to %+v, which re-encodes to %x (%v)", body, m, again, err)
			}
		}
	})
}

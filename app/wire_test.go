//go:build linux

package app

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
)

// socketPair returns two connected unix stream sockets.
func socketPair(t testing.TB) (*msgConn, *msgConn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *msgConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return newMsgConn(c.(*net.UnixConn))
	}
	return conv(fds[0]), conv(fds[1])
}

func TestWireRoundTripWithDescriptors(t *testing.T) {
	a, b := socketPair(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tup := Tuple{Local: netip.MustParseAddrPort("[::ffff:10.0.0.1]:7000"), Remote: netip.MustParseAddrPort("10.0.0.2:40000")}
	big := bytes.Repeat([]byte{0xa5}, MaxSnapshot) // several writes' worth
	sent := []struct {
		m  *message
		fd int
	}{
		{&message{Type: msgOpened, Service: ":7000", Tuple: &tup}, -1},
		{&message{Type: msgExported, ID: 7, Snapshot: big}, int(f.Fd())},
		{&message{Type: msgClosed, Service: ":7000", Tuple: &tup}, -1},
		{&message{Type: msgImport, ID: 8, Snapshot: []byte{}}, int(f.Fd())},
	}
	go func() {
		for _, s := range sent {
			if err := a.write(s.m, s.fd); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i, s := range sent {
		m, fds, err := b.read()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if m.Type != s.m.Type || m.ID != s.m.ID || !bytes.Equal(m.Snapshot, s.m.Snapshot) || (m.Snapshot == nil) != (s.m.Snapshot == nil) {
			t.Errorf("message %d: got %s/%d/%d bytes", i, m.Type, m.ID, len(m.Snapshot))
		}
		if m.Tuple != nil && *m.Tuple != tup.norm() {
			t.Errorf("message %d: tuple %v, want %v", i, *m.Tuple, tup.norm())
		}
		if want := s.fd >= 0; (len(fds) == 1) != want {
			t.Errorf("message %d: %d descriptors", i, len(fds))
		}
		closeFDs(fds)
	}
}

func TestWireRejectsUnclaimedDescriptor(t *testing.T) {
	a, b := socketPair(t)
	f, _ := os.Open(os.DevNull)
	defer f.Close()
	// A descriptor sent with a frame that does not claim it.
	frame := func(body string) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
	}
	if _, _, err := a.uc.WriteMsgUnix(frame(`{"type":"opened"}`), syscall.UnixRights(int(f.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	a.write(&message{Type: msgClosed}, -1)
	if _, _, err := b.read(); err != nil {
		t.Fatal(err) // can't tell yet: the descriptor might be the next frame's
	}
	if _, _, err := b.read(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("got %v, want ErrProtocol", err)
	}
	b.dropFDs()
}

// FuzzWireRead feeds arbitrary bytes to the frame reader: it must return
// messages or errors, never panic, and never hand out descriptors that
// were not sent.
func FuzzWireRead(f *testing.F) {
	frame := func(body string) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
	}
	f.Add(frame(`{"type":"register","version":1,"service":":7000","pid":1}`))
	f.Add(frame(`{"type":"opened","service":":7000","tuple":{"local":"1.2.3.4:5","remote":"[::1]:6"}}`))
	f.Add(frame(`{"type":"exported","id":1,"snapshot":"aGVsbG8=","fds":1}`))
	f.Add(frame(`{"type":"x","snapshot":"!!"}`))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := socketPair(t)
		go func() {
			a.uc.Write(data)
			a.uc.CloseWrite()
		}()
		for range 100 {
			m, fds, err := b.read()
			if err != nil {
				break
			}
			if m.Type == "" || len(fds) != 0 {
				t.Fatalf("message %+v with %d descriptors", m, len(fds))
			}
		}
		b.dropFDs()
	})
}

//go:build linux

package app

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
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
			var fds []int
			if s.fd >= 0 {
				fds = append(fds, s.fd)
			}
			if err := a.write(s.m, fds...); err != nil {
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
	a.write(&message{Type: msgClosed})
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

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestWireManyDescriptorsPerFrame(t *testing.T) {
	a, b := socketPair(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	base := openFDs(t)
	fds := func(n int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = int(f.Fd())
		}
		return out
	}
	big := make([]item, 3)
	for i := range big {
		big[i] = item{ID: uint64(i), Snapshot: bytes.Repeat([]byte{byte(i)}, MaxSnapshot/3), FD: true}
	}
	sent := []struct {
		m   *message
		fds int
	}{
		{&message{Type: msgExportedMany, ID: 1}, maxBatch},
		{&message{Type: msgExportedMany, ID: 2}, maxBatch}, // right behind: both may arrive in one read
		{&message{Type: msgOpened}, 0},
		{&message{Type: msgImportMany, ID: 3, Items: big}, 3}, // several reads' worth
		{&message{Type: msgExportedMany, ID: 4}, 1},
	}
	errc := make(chan error, 1)
	go func() {
		for _, s := range sent {
			if err := a.write(s.m, fds(s.fds)...); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for i, s := range sent {
		m, got, err := b.read()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if m.ID != s.m.ID || len(got) != s.fds || len(m.Items) != len(s.m.Items) {
			t.Errorf("message %d: id %d with %d descriptors and %d items, want id %d with %d and %d", i, m.ID, len(got), len(m.Items), s.m.ID, s.fds, len(s.m.Items))
		}
		for k := range m.Items {
			if !bytes.Equal(m.Items[k].Snapshot, big[k].Snapshot) {
				t.Errorf("message %d item %d: snapshot differs", i, k)
			}
		}
		seen := map[int]bool{}
		for _, fd := range got {
			if seen[fd] || fd == int(f.Fd()) {
				t.Errorf("message %d: descriptor %d twice", i, fd)
			}
			seen[fd] = true
		}
		closeFDs(got)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if err := a.write(&message{Type: msgOpened}, fds(maxBatch+1)...); err == nil {
		t.Errorf("a frame with %d descriptors was sent", maxBatch+1)
	}
	if n := openFDs(t); n != base {
		t.Errorf("%d descriptors open, %d before", n, base)
	}
}

// A frame may claim only descriptors that arrived with its first byte,
// not those of the next frame.
func TestWireRejectsBorrowedDescriptor(t *testing.T) {
	a, b := socketPair(t)
	f, _ := os.Open(os.DevNull)
	defer f.Close()
	base := openFDs(t)
	frame := func(body string) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
	}
	one := frame(`{"type":"import-many","fds":2}`) // claims 2, comes with 1
	two := frame(`{"type":"import-many","fds":1}`)
	rights := syscall.UnixRights(int(f.Fd()))
	if _, _, err := a.uc.WriteMsgUnix(one[:2], rights, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.uc.WriteMsgUnix(append(one[2:], two...), rights, nil); err != nil {
		t.Fatal(err)
	}
	if _, fds, err := b.read(); !errors.Is(err, ErrProtocol) {
		closeFDs(fds)
		t.Fatalf("got %d descriptors, %v; want ErrProtocol", len(fds), err)
	}
	b.dropFDs()
	if n := openFDs(t); n != base {
		t.Errorf("%d descriptors open, %d before", n, base)
	}
}

func TestChunks(t *testing.T) {
	for _, tc := range []struct {
		sizes []int
		want  [][2]int
	}{
		{nil, nil},
		{[]int{1}, [][2]int{{0, 1}}},
		{make([]int, 2*maxBatch+1), [][2]int{{0, maxBatch}, {maxBatch, 2 * maxBatch}, {2 * maxBatch, 2*maxBatch + 1}}},
		{[]int{frameBudget / 2, frameBudget / 2, 1, frameBudget * 2, 1}, [][2]int{{0, 2}, {2, 3}, {3, 4}, {4, 5}}},
	} {
		got := chunks(len(tc.sizes), func(i int) int { return tc.sizes[i] })
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("chunks of %d: %v, want %v", len(tc.sizes), got, tc.want)
		}
	}
	// An item's size bounds its encoding.
	tup := Tuple{Local: netip.MustParseAddrPort("[fe80::1%eth0]:7000"), Remote: netip.MustParseAddrPort("[2001:db8::1]:65535")}
	for _, it := range []item{
		{ID: 1 << 63, Tuple: &tup, Snapshot: bytes.Repeat([]byte{0}, MaxSnapshot), FD: true},
		{ID: 1, Error: strings.Repeat("\x01", maxErrorLen), Code: codeNoConn},
	} {
		b, _ := json.Marshal(&it)
		if len(b) > it.size() {
			t.Errorf("item encodes to %d bytes, size says %d", len(b), it.size())
		}
	}
}

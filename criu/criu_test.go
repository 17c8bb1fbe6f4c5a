package criu

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	sk_inet "github.com/checkpoint-restore/go-criu/v7/crit/images/sk-inet"
	tcpstream "github.com/checkpoint-restore/go-criu/v7/crit/images/tcp-stream"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// filesImg builds a files.img holding the given entries.
func filesImg(t *testing.T, ents ...*fdinfo.FileEntry) []byte {
	t.Helper()
	b := binary.LittleEndian.AppendUint32(nil, magicCommon)
	b = binary.LittleEndian.AppendUint32(b, magicFiles)
	for _, e := range ents {
		eb, err := proto.MarshalOptions{AllowPartial: true}.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(eb)))
		b = append(b, eb...)
	}
	return b
}

func inetEntry(id uint32, family uint32, src, dst netip.AddrPort, state uint32) *fdinfo.FileEntry {
	typ := fdinfo.FdTypes_INETSK
	return &fdinfo.FileEntry{Type: &typ, Id: proto.Uint32(id), Isk: &sk_inet.InetSkEntry{
		Id: proto.Uint32(id), Ino: proto.Uint32(1000 + id), Family: proto.Uint32(family), Type: proto.Uint32(1), Proto: proto.Uint32(6),
		State: proto.Uint32(state), SrcPort: proto.Uint32(uint32(src.Port())), DstPort: proto.Uint32(uint32(dst.Port())),
		Flags: proto.Uint32(0), Backlog: proto.Uint32(0),
		SrcAddr: addrWords(src.Addr()), DstAddr: addrWords(dst.Addr()),
	}}
}

func TestRewriteFiles(t *testing.T) {
	s1, s2 := netip.MustParseAddr("10.77.2.11"), netip.MustParseAddr("10.77.2.12")
	s16, s26 := netip.MustParseAddr("fd77:2::11"), netip.MustParseAddr("fd77:2::12")
	client := netip.MustParseAddrPort("10.77.1.2:40000")
	mapped := netip.AddrFrom16(s1.As16())
	ents := []*fdinfo.FileEntry{
		inetEntry(1, afInet, netip.AddrPortFrom(s1, 6379), client, 1),                                                                 // established, rewritten
		inetEntry(2, afInet, netip.MustParseAddrPort("0.0.0.0:6379"), netip.MustParseAddrPort("0.0.0.0:0"), 10),                       // wildcard listener: kept
		inetEntry(3, afInet6, netip.AddrPortFrom(mapped, 6379), netip.AddrPortFrom(netip.AddrFrom16(client.Addr().As16()), 40001), 1), // mapped: rewritten, stays mapped
		inetEntry(4, afInet6, netip.AddrPortFrom(s16, 6379), netip.MustParseAddrPort("[fd77:1::2]:40002"), 1),                         // v6: rewritten
		inetEntry(5, afInet, netip.MustParseAddrPort("127.0.0.1:6379"), netip.MustParseAddrPort("127.0.0.1:5000"), 1),                 // loopback: kept
	}
	// An entry with a field this package's definitions do not know must
	// keep it through a rewrite.
	ents[0].Isk.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 999, protowire.VarintType), 42))
	img := filesImg(t, ents...)
	out, n, err := rewriteFiles(img, map[netip.Addr]netip.Addr{s1: s2, s16: s26})
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Fatalf("rewrote %d sockets, want 3", n)
	}
	dir := t.TempDir()
	if err := writeFile(dir+"/files.img", out); err != nil {
		t.Fatal(err)
	}
	socks, err := Sockets(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.77.2.12:6379", "0.0.0.0:6379", "[::ffff:10.77.2.12]:6379", "[fd77:2::12]:6379", "127.0.0.1:6379"}
	if len(socks) != len(want) {
		t.Fatalf("got %d sockets, want %d", len(socks), len(want))
	}
	for i, s := range socks {
		if s.Local.String() != want[i] {
			t.Errorf("socket %d: local %v, want %s", i, s.Local, want[i])
		}
	}
	if socks[0].Remote != client {
		t.Errorf("remote changed: %v", socks[0].Remote)
	}
	// The unknown field survived.
	var fe fdinfo.FileEntry
	size := binary.LittleEndian.Uint32(out[8:])
	if err := partial.Unmarshal(out[12:12+size], &fe); err != nil {
		t.Fatal(err)
	}
	if len(fe.GetIsk().ProtoReflect().GetUnknown()) == 0 {
		t.Error("the unknown field of the rewritten entry was lost")
	}
	// Untouched entries are kept byte for byte: a rewrite with nothing
	// to change gives the input back.
	same, n, err := rewriteFiles(img, map[netip.Addr]netip.Addr{netip.MustParseAddr("10.9.9.9"): s2})
	if err != nil || n != 0 || string(same) != string(img) {
		t.Errorf("no-op rewrite: n=%d err=%v identical=%v", n, err, string(same) == string(img))
	}
}

func TestRewriteFilesRefusesBadInput(t *testing.T) {
	s1, s2 := netip.MustParseAddr("10.77.2.11"), netip.MustParseAddr("10.77.2.12")
	good := filesImg(t, inetEntry(1, afInet, netip.AddrPortFrom(s1, 1), netip.MustParseAddrPort("10.0.0.1:2"), 1))
	for name, tc := range map[string]struct {
		img   []byte
		addrs map[netip.Addr]netip.Addr
	}{
		"bad magic":      {append([]byte{1, 2, 3, 4}, good[4:]...), map[netip.Addr]netip.Addr{s1: s2}},
		"truncated":      {good[:len(good)-3], map[netip.Addr]netip.Addr{s1: s2}},
		"short":          {good[:6], map[netip.Addr]netip.Addr{s1: s2}},
		"mixed families": {good, map[netip.Addr]netip.Addr{s1: netip.MustParseAddr("fd77::1")}},
	} {
		if _, _, err := rewriteFiles(tc.img, tc.addrs); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestCheckVersion(t *testing.T) {
	for _, tc := range []struct {
		v      Version
		kernel string
		ok     bool
		says   string
	}{
		{Version{4, 2, 1}, "6.18.0", true, ""},
		{Version{5, 0, 0}, "6.18.0", true, ""},
		{Version{3, 17, 1}, "6.18.0", false, "cannot run on Linux ≥ 6.13"},
		{Version{4, 1, 1}, "6.16.2-amd64", false, "cannot dump TCP sockets on Linux ≥ 6.16"},
		{Version{4, 1, 0}, "6.1.0", false, "too old"},
	} {
		err := checkVersion("/usr/sbin/criu", tc.v, tc.kernel)
		if (err == nil) != tc.ok {
			t.Errorf("%v on %s: err %v", tc.v, tc.kernel, err)
			continue
		}
		if err != nil {
			if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), tc.says) || !strings.Contains(err.Error(), "setup-criu.sh") {
				t.Errorf("%v on %s: %v", tc.v, tc.kernel, err)
			}
		}
	}
	if v := parseVersion("6.18.3-cloud-amd64"); v != (Version{6, 18, 3}) {
		t.Errorf("parseVersion: %v", v)
	}
}

func TestValidImageName(t *testing.T) {
	for name, ok := range map[string]bool{"files.img": true, "pages-1.img": true, "stats-dump": true,
		"": false, ".": false, "..": false, "../x": false, "a/b": false, "dump.log": false, "x\x00": false} {
		if ValidImageName(name) != ok {
			t.Errorf("ValidImageName(%q) = %v", name, !ok)
		}
	}
}

// tcpImg builds a tcp-stream image: the entry, then the queues' bytes.
func tcpImg(t *testing.T, e *tcpstream.TcpStreamEntry, queues []byte) []byte {
	t.Helper()
	b := binary.LittleEndian.AppendUint32(nil, magicCommon)
	b = binary.LittleEndian.AppendUint32(b, magicTCP)
	eb, err := proto.MarshalOptions{AllowPartial: true}.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(eb)))
	return append(append(b, eb...), queues...)
}

func TestAdvanceClock(t *testing.T) {
	queues := []byte("in-queue bytes|out-queue bytes")
	for _, tc := range []struct {
		name     string
		ts, want uint32
		d        time.Duration
	}{
		{"milliseconds", 1000, 2234, 1234 * time.Millisecond},
		{"odd milliseconds stay even", 1000, 1002, 3 * time.Millisecond},
		{"microseconds keep their flag", 1001, 1001 + 1_500_000, 1500 * time.Millisecond},
		{"wraps", 0xfffffff0, 1000 - 0x10, 1000 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := &tcpstream.TcpStreamEntry{InqLen: proto.Uint32(14), OutqLen: proto.Uint32(16), Timestamp: proto.Uint32(tc.ts)}
			out, changed, err := advanceClock(tcpImg(t, e, queues), tc.d)
			if err != nil || !changed {
				t.Fatalf("advanceClock: changed %v, %v", changed, err)
			}
			size := binary.LittleEndian.Uint32(out[8:])
			var got tcpstream.TcpStreamEntry
			if err := (proto.UnmarshalOptions{AllowPartial: true}).Unmarshal(out[12:12+size], &got); err != nil {
				t.Fatal(err)
			}
			if got.GetTimestamp() != tc.want {
				t.Errorf("timestamp %d, want %d", got.GetTimestamp(), tc.want)
			}
			if got.GetInqLen() != 14 || got.GetOutqLen() != 16 {
				t.Errorf("other fields changed: %v", &got)
			}
			if string(out[12+size:]) != string(queues) {
				t.Errorf("queues changed: %q", out[12+size:])
			}
		})
	}
	// No timestamps on the connection: nothing to do.
	img := tcpImg(t, &tcpstream.TcpStreamEntry{InqLen: proto.Uint32(0)}, nil)
	if _, changed, err := advanceClock(img, time.Second); err != nil || changed {
		t.Errorf("without a timestamp: changed %v, %v", changed, err)
	}
	// Not a tcp-stream image.
	if _, _, err := advanceClock(filesImg(t), time.Second); err == nil {
		t.Error("a files image was taken for a tcp-stream image")
	}
	bad := tcpImg(t, &tcpstream.TcpStreamEntry{Timestamp: proto.Uint32(2)}, nil)
	if _, _, err := advanceClock(bad[:len(bad)-1], time.Second); err == nil {
		t.Error("a truncated image was accepted")
	}
}

func TestAdvanceClocksDir(t *testing.T) {
	dir := t.TempDir()
	e := &tcpstream.TcpStreamEntry{Timestamp: proto.Uint32(4000)}
	if err := writeFile(dir+"/tcp-stream-2a.img", tcpImg(t, e, []byte("q"))); err != nil {
		t.Fatal(err)
	}
	if err := writeFile(dir+"/files.img", filesImg(t)); err != nil {
		t.Fatal(err)
	}
	n, err := AdvanceClocks(dir, 2*time.Second)
	if err != nil || n != 1 {
		t.Fatalf("AdvanceClocks: %d, %v", n, err)
	}
	if _, err := AdvanceClocks(dir, -time.Second); err == nil {
		t.Error("a negative duration was accepted")
	}
}

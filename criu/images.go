package criu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	criucore "github.com/checkpoint-restore/go-criu/v7/crit/images/criu-core"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	tcpstream "github.com/checkpoint-restore/go-criu/v7/crit/images/tcp-stream"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/proto"
)

// CRIU image layout (CRIU's Documentation/images, "protobuf images"): two
// little-endian magics (the common one, then the image's own), then
// entries, each a little-endian uint32 size and that many bytes of
// protobuf.
var (
	magics      = magic.LoadMagic()
	magicCommon = uint32(magics.ByName["IMG_COMMON"])
	magicFiles  = uint32(magics.ByName["FILES"])
	magicTCP    = uint32(magics.ByName["TCP_STREAM"])
	magicCore   = uint32(magics.ByName["CORE"])
)

// CRIU's definitions may drop a field that go-criu's older ones require:
// decode and encode without insisting on required fields.
var (
	partial    = proto.UnmarshalOptions{AllowPartial: true}
	partialOut = proto.MarshalOptions{AllowPartial: true}
)

// Address families in inet_sk_entry.family (linux/socket.h).
const (
	afInet  = 2  // AF_INET
	afInet6 = 10 // AF_INET6
)

// filesImage is the image holding the file table, sockets included.
const filesImage = "files.img"

// Rewrite changes the local address of every inet socket in the
// checkpoint in dir whose local address is a key of addrs to that key's
// value (an IPv4 key matches an IPv4-mapped IPv6 socket address too, which
// stays mapped). It returns how many sockets it changed. Entries it does
// not change are kept byte for byte, and fields this package's CRIU
// definitions do not know survive a rewrite (protobuf keeps unknown
// fields).
func Rewrite(dir string, addrs map[netip.Addr]netip.Addr) (int, error) {
	path := filepath.Join(dir, filesImage)
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, &OpError{Op: "rewrite", Err: err}
	}
	out, n, err := rewriteFiles(b, addrs)
	if err != nil {
		return 0, &OpError{Op: "rewrite", Err: fmt.Errorf("%s: %w", path, err)}
	}
	if n == 0 {
		return 0, nil
	}
	if err := replaceFile(path, out); err != nil {
		return 0, &OpError{Op: "rewrite", Err: err}
	}
	return n, nil
}

// rewriteFiles rewrites the contents of a files.img.
func rewriteFiles(b []byte, addrs map[netip.Addr]netip.Addr) ([]byte, int, error) {
	for k, v := range addrs {
		if !k.Unmap().IsValid() || k.Unmap().Is4() != v.Unmap().Is4() {
			return nil, 0, fmt.Errorf("cannot rewrite %v to %v: both addresses must be of one family", k, v)
		}
	}
	ents, err := splitImage(b, magicFiles)
	if err != nil {
		return nil, 0, fmt.Errorf("files image: %w", err)
	}
	out := append(make([]byte, 0, len(b)+64), b[:8]...)
	n := 0
	for _, ent := range ents {
		var fe fdinfo.FileEntry
		if err := partial.Unmarshal(ent, &fe); err != nil {
			return nil, 0, fmt.Errorf("file entry: %w", err)
		}
		isk := fe.GetIsk()
		if isk == nil || !rewriteAddr(&isk.SrcAddr, isk.GetFamily(), addrs) {
			out = binary.LittleEndian.AppendUint32(out, uint32(len(ent)))
			out = append(out, ent...)
			continue
		}
		nb, err := partialOut.Marshal(&fe)
		if err != nil {
			return nil, 0, err
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(len(nb)))
		out = append(out, nb...)
		n++
	}
	return out, n, nil
}

// splitImage checks that b is a CRIU image with the given magic and
// returns its entries.
func splitImage(b []byte, magic uint32) ([][]byte, error) {
	if len(b) < 8 || binary.LittleEndian.Uint32(b) != magicCommon || binary.LittleEndian.Uint32(b[4:]) != magic {
		return nil, errors.New("bad magic")
	}
	var out [][]byte
	for rest := b[8:]; len(rest) > 0; {
		if len(rest) < 4 {
			return nil, errors.New("truncated entry size")
		}
		size := binary.LittleEndian.Uint32(rest)
		if uint64(size) > uint64(len(rest)-4) {
			return nil, fmt.Errorf("entry of %d bytes, %d left", size, len(rest)-4)
		}
		out = append(out, rest[4:4+size])
		rest = rest[4+size:]
	}
	return out, nil
}

// rewriteAddr rewrites one socket address, kept by CRIU as the kernel's
// bytes in uint32 words (one for IPv4, four for IPv6, native order).
func rewriteAddr(words *[]uint32, family uint32, addrs map[netip.Addr]netip.Addr) bool {
	a, ok := wordsAddr(*words, family)
	if !ok {
		return false
	}
	to, ok := addrs[a.Unmap()]
	if !ok {
		to, ok = addrs[a]
	}
	if !ok {
		return false
	}
	to = to.Unmap()
	if a.Is4In6() && to.Is4() {
		to = netip.AddrFrom16(to.As16())
	}
	if (family == afInet) != to.Is4() {
		return false
	}
	*words = addrWords(to)
	return true
}

func wordsAddr(w []uint32, family uint32) (netip.Addr, bool) {
	var b []byte
	for _, x := range w {
		b = binary.NativeEndian.AppendUint32(b, x)
	}
	switch {
	case family == afInet && len(b) == 4:
		return netip.AddrFrom4([4]byte(b)), true
	case family == afInet6 && len(b) == 16:
		return netip.AddrFrom16([16]byte(b)), true
	}
	return netip.Addr{}, false
}

func addrWords(a netip.Addr) []uint32 {
	b := a.AsSlice()
	w := make([]uint32, len(b)/4)
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// AdvanceClocks moves the TCP timestamp clock of every connection in the
// checkpoint in dir forward by d, and returns how many it changed.
//
// CRIU saves each connection's timestamp clock (TCP_TIMESTAMP) when it
// dumps, and the restored socket's clock carries on from that value: it
// lags the source's by the time between dump and restore. But the
// source's sockets, stopped in repair mode, keep running their
// retransmission timers while the client's acknowledgements are held, and
// their retransmissions carry the source's live clock. A client that saw
// one of them drops every segment of the restored socket whose timestamp
// is older (PAWS, RFC 7323) and the connection stalls on retransmission
// timeouts. With d at least the time from the dump to the restore, the
// restored clock runs ahead of anything the source sent; a forward jump is
// harmless (PAWS only rejects timestamps that go back).
func AdvanceClocks(dir string, d time.Duration) (int, error) {
	if d < 0 {
		return 0, &OpError{Op: "advance clocks", Err: fmt.Errorf("negative duration %v", d)}
	}
	return rewriteImages(dir, "tcp-stream-", "advance clocks", func(b []byte) ([]byte, bool, error) { return advanceClock(b, d) })
}

// advanceClock rewrites one tcp-stream image: its entry, then the queues'
// bytes, which are kept as they are.
func advanceClock(b []byte, d time.Duration) ([]byte, bool, error) {
	if len(b) < 12 || binary.LittleEndian.Uint32(b) != magicCommon || binary.LittleEndian.Uint32(b[4:]) != magicTCP {
		return nil, false, errors.New("not a CRIU tcp-stream image (bad magic)")
	}
	size := binary.LittleEndian.Uint32(b[8:])
	if uint64(size) > uint64(len(b)-12) {
		return nil, false, fmt.Errorf("entry of %d bytes, %d left", size, len(b)-12)
	}
	var te tcpstream.TcpStreamEntry
	if err := partial.Unmarshal(b[12:12+size], &te); err != nil {
		return nil, false, fmt.Errorf("tcp stream entry: %w", err)
	}
	if te.Timestamp == nil || *te.Timestamp == 0 {
		return b, false, nil // no timestamps on this connection
	}
	*te.Timestamp = advanceTimestamp(*te.Timestamp, d)
	nb, err := partialOut.Marshal(&te)
	if err != nil {
		return nil, false, err
	}
	out := append(make([]byte, 0, len(b)+8), b[:8]...)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(nb)))
	out = append(out, nb...)
	return append(out, b[12+size:]...), true, nil
}

// advanceTimestamp adds d to a TCP_TIMESTAMP value. Its lowest bit tells
// the unit (linux/net/ipv4/tcp.c: set for microseconds, clear for
// milliseconds) and must survive: the step added is even.
func advanceTimestamp(ts uint32, d time.Duration) uint32 {
	step := uint32(d.Milliseconds())
	if ts&1 != 0 {
		step = uint32(d.Microseconds())
	}
	return ts + step&^1
}

// Images lists the files of a checkpoint in dir that the target needs:
// every regular file except CRIU's logs, sorted by name.
func Images(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if e.Type().IsRegular() && !strings.HasSuffix(e.Name(), ".log") {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// IsPagesImage reports whether name is one of a checkpoint's memory page
// images (pages-N.img), the bulk of a checkpoint.
func IsPagesImage(name string) bool {
	return strings.HasPrefix(name, "pages-") && strings.HasSuffix(name, ".img")
}

// ValidImageName reports whether name can be a file of a checkpoint
// directory: a plain file name, no path. A target writes files received
// from the network only under such names.
func ValidImageName(name string) bool {
	if name == "" || len(name) > 255 || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return false
	}
	return !strings.HasSuffix(name, ".log")
}

// Sockets lists the inet sockets of the checkpoint in dir, for reports and
// tests: local and remote address and port, TCP state number.
func Sockets(dir string) ([]Socket, error) {
	b, err := os.ReadFile(filepath.Join(dir, filesImage))
	if err != nil {
		return nil, err
	}
	if len(b) < 8 || binary.LittleEndian.Uint32(b[4:]) != magicFiles {
		return nil, errors.New("not a CRIU files image")
	}
	var out []Socket
	for rest := b[8:]; len(rest) >= 4; {
		size := binary.LittleEndian.Uint32(rest)
		if uint64(size) > uint64(len(rest)-4) {
			return nil, errors.New("truncated files image")
		}
		var fe fdinfo.FileEntry
		if err := partial.Unmarshal(rest[4:4+size], &fe); err != nil {
			return nil, err
		}
		rest = rest[4+size:]
		if isk := fe.GetIsk(); isk != nil {
			src, ok1 := wordsAddr(isk.GetSrcAddr(), isk.GetFamily())
			dst, ok2 := wordsAddr(isk.GetDstAddr(), isk.GetFamily())
			if !ok1 || !ok2 {
				continue
			}
			out = append(out, Socket{
				Local:  netip.AddrPortFrom(src, uint16(isk.GetSrcPort())),
				Remote: netip.AddrPortFrom(dst, uint16(isk.GetDstPort())),
				State:  int(isk.GetState()), Proto: int(isk.GetProto()),
			})
		}
	}
	return out, nil
}

// Socket is one inet socket of a checkpoint.
type Socket struct {
	Local, Remote netip.AddrPort
	// State is the kernel's TCP state number (1 ESTABLISHED, 10 LISTEN).
	State int
	// Proto is the IP protocol (6 TCP, 17 UDP).
	Proto int
}

// writeFile writes a whole file (tests, and the daemon's received images).
func writeFile(path string, b []byte) error { return os.WriteFile(path, b, 0o600) }

// ClearDeathSignals clears the parent-death signal (prctl
// PR_SET_PDEATHSIG) of every thread in the checkpoint in dir, and returns
// how many it changed. The signal names the death of the process's parent
// on the source, which stays there; restored, the process's parent is
// whoever ran the restore (mtcpd, CRIU's restore sibling), and a restart
// of that must not kill it (`unshare --fork --kill-child`, which README
// suggests for starting a process to migrate, sets SIGKILL).
func ClearDeathSignals(dir string) (int, error) {
	return rewriteImages(dir, "core-", "clear death signals", clearDeathSignal)
}

// rewriteImages passes each image of the checkpoint in dir whose name
// starts with prefix through fn, replaces those fn changed, and returns
// how many it changed; op names the work in errors.
func rewriteImages(dir, prefix, op string, fn func([]byte) ([]byte, bool, error)) (int, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, &OpError{Op: op, Err: err}
	}
	n := 0
	for _, e := range ents {
		if !e.Type().IsRegular() || !strings.HasPrefix(e.Name(), prefix) || !strings.HasSuffix(e.Name(), ".img") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			return n, &OpError{Op: op, Err: err}
		}
		out, changed, err := fn(b)
		if err != nil {
			return n, &OpError{Op: op, Err: fmt.Errorf("%s: %w", path, err)}
		}
		if !changed {
			continue
		}
		if err := replaceFile(path, out); err != nil {
			return n, &OpError{Op: op, Err: err}
		}
		n++
	}
	return n, nil
}

// clearDeathSignal rewrites one core image's entry, keeping what follows.
func clearDeathSignal(b []byte) ([]byte, bool, error) {
	if len(b) < 12 || binary.LittleEndian.Uint32(b) != magicCommon && binary.LittleEndian.Uint32(b) != magicCore {
		return nil, false, errors.New("not a CRIU core image (bad magic)")
	}
	// Core images have the image's own magic only.
	hdr := 4
	if binary.LittleEndian.Uint32(b) == magicCommon {
		if binary.LittleEndian.Uint32(b[4:]) != magicCore {
			return nil, false, errors.New("not a CRIU core image (bad magic)")
		}
		hdr = 8
	}
	size := binary.LittleEndian.Uint32(b[hdr:])
	if uint64(size) > uint64(len(b)-hdr-4) {
		return nil, false, fmt.Errorf("entry of %d bytes, %d left", size, len(b)-hdr-4)
	}
	var ce criucore.CoreEntry
	if err := partial.Unmarshal(b[hdr+4:hdr+4+int(size)], &ce); err != nil {
		return nil, false, fmt.Errorf("core entry: %w", err)
	}
	if ce.ThreadCore == nil || ce.ThreadCore.GetPdeathSig() == 0 {
		return b, false, nil
	}
	ce.ThreadCore.PdeathSig = nil
	nb, err := partialOut.Marshal(&ce)
	if err != nil {
		return nil, false, err
	}
	out := append(make([]byte, 0, len(b)), b[:hdr]...)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(nb)))
	out = append(out, nb...)
	return append(out, b[hdr+4+int(size):]...), true, nil
}

// replaceFile writes b to path through a temporary file and a rename.
func replaceFile(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

package repair

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// userfaultfd's ioctls and messages (linux/userfaultfd.h).
const (
	uffdioUnregister = 0x8010aa01 // _IOR(0xAA, 0x01, struct uffdio_range)
	uffdioWake       = 0x8010aa02 // _IOR(0xAA, 0x02, struct uffdio_range)
	uffdioCopy       = 0xc028aa03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	uffdioZeropage   = 0xc020aa04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	uffdMsgSize      = 32
)

// UFFD is a userfaultfd(2) descriptor handed over by the process that
// registered memory with it (CRIU's restorer): [UFFD.ReadEvent] reports
// the registered process's page faults and memory map changes, and
// [UFFD.Copy] fills its missing pages. All of it is safe for concurrent
// use.
type UFFD struct {
	f  *os.File
	rc syscall.RawConn
}

// NewUFFD takes ownership of fd, a userfaultfd descriptor opened
// non-blocking (CRIU's restorer opens it so).
func NewUFFD(fd int) (*UFFD, error) {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		unix.Close(fd)
		return nil, &OpError{Op: "userfaultfd", Err: err}
	}
	if fl&unix.O_NONBLOCK == 0 {
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return nil, &OpError{Op: "userfaultfd", Err: err}
		}
	}
	f := os.NewFile(uintptr(fd), "userfaultfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, &OpError{Op: "userfaultfd", Err: err}
	}
	return &UFFD{f: f, rc: rc}, nil
}

// Close closes the descriptor. Pages still missing in the ranges it
// registered read as zeros from then on, so only close it once every page
// is in place or the process is gone.
func (u *UFFD) Close() error { return u.f.Close() }

// UFFDEventKind says what a [UFFDEvent] reports.
type UFFDEventKind uint8

// The events a userfaultfd registered with CRIU's features reports.
const (
	UFFDPageFault UFFDEventKind = 0x12 // a missing page was touched: Addr
	UFFDFork      UFFDEventKind = 0x13 // the process forked: FD is the child's userfaultfd
	UFFDRemap     UFFDEventKind = 0x14 // mremap(2) moved Len bytes From To
	UFFDRemove    UFFDEventKind = 0x15 // madvise(2) dropped [Start, End)
	UFFDUnmap     UFFDEventKind = 0x16 // munmap(2) removed [Start, End)
)

// UFFDEvent is one message of a userfaultfd.
type UFFDEvent struct {
	Kind       UFFDEventKind
	Addr       uint64 // page fault: the faulting address
	FD         int    // fork: the child's userfaultfd, owned by the caller (NewUFFD)
	From, To   uint64 // remap
	Len        uint64 // remap
	Start, End uint64 // remove, unmap
}

// ReadEvent waits for the next event. It locks l before each attempt to
// read one and, when it returns an event, returns with l still locked, so
// that the caller applies the event before anything else (a [UFFD.Copy]
// done under l) can act on the memory map it describes: reading a remap
// or unmap event is what lets the kernel carry on with the change. On an
// error l is unlocked. io.EOF means the registered process is gone.
func (u *UFFD) ReadEvent(l sync.Locker) (UFFDEvent, error) {
	var msg [uffdMsgSize]byte
	var n int
	var rerr error
	locked := false
	err := u.rc.Read(func(fd uintptr) bool {
		l.Lock()
		n, rerr = unix.Read(int(fd), msg[:])
		if rerr == unix.EAGAIN {
			l.Unlock()
			return false
		}
		locked = true
		return true
	})
	if err == nil {
		err = rerr
	}
	if err == nil && n == uffdMsgSize {
		return parseUFFDMsg(msg[:]), nil
	}
	if locked {
		l.Unlock()
	}
	switch {
	case err != nil:
		return UFFDEvent{}, &OpError{Op: "userfaultfd read", Err: err}
	case n == 0:
		return UFFDEvent{}, io.EOF
	default:
		return UFFDEvent{}, &OpError{Op: "userfaultfd read", Err: fmt.Errorf("a %d-byte message", n)}
	}
}

// parseUFFDMsg decodes a struct uffd_msg: the event in its first byte,
// its arguments from byte 8 on, in the host's byte order.
func parseUFFDMsg(m []byte) UFFDEvent {
	le := binary.NativeEndian
	e := UFFDEvent{Kind: UFFDEventKind(m[0])}
	switch e.Kind {
	case UFFDPageFault:
		e.Addr = le.Uint64(m[16:]) // after the flags
	case UFFDFork:
		e.FD = int(le.Uint32(m[8:]))
	case UFFDRemap:
		e.From, e.To, e.Len = le.Uint64(m[8:]), le.Uint64(m[16:]), le.Uint64(m[24:])
	case UFFDRemove, UFFDUnmap:
		e.Start, e.End = le.Uint64(m[8:]), le.Uint64(m[16:])
	}
	return e
}

// ErrUFFDGone reports that the process a userfaultfd served has exited
// (or is exiting): its memory cannot be filled any more.
var ErrUFFDGone = errors.New("the process is gone")

// ErrUFFDExists reports that a page [UFFD.Copy] was to fill is present
// already.
var ErrUFFDExists = errors.New("page present already")

// ErrUFFDNoRange reports that the range [UFFD.Copy] was to fill is not
// (or no longer) registered: unmapped, or handed back with
// [UFFD.Unregister].
var ErrUFFDNoRange = errors.New("range not registered")

// ErrUFFDAgain reports that the process's memory map is changing (an
// event is not read yet): try again once it is.
var ErrUFFDAgain = errors.New("memory map changing")

// Copy fills the missing pages at dst with src (whole pages) and wakes
// the threads waiting for them. It returns how many bytes it copied; when
// that is short of len(src) the error says why, as one of the ErrUFFD
// errors where it can.
func (u *UFFD) Copy(dst uint64, src []byte) (int, error) {
	if len(src) == 0 {
		return 0, nil
	}
	// struct uffdio_copy: dst, src, len, mode, copy (s64, out).
	var arg [5]uint64
	arg[0], arg[1], arg[2] = dst, uint64(uintptr(unsafe.Pointer(&src[0]))), uint64(len(src))
	err := u.ioctl(uffdioCopy, unsafe.Pointer(&arg[0]))
	n := int64(arg[4])
	if err == nil {
		return len(src), nil
	}
	if n < 0 {
		n = 0
	}
	return int(n), uffdErr("copy", err)
}

// ZeroPage maps zero pages at [addr, addr+n) and wakes the threads waiting
// for them.
func (u *UFFD) ZeroPage(addr, n uint64) error {
	// struct uffdio_zeropage: range (start, len), mode, zeropage (out).
	var arg [4]uint64
	arg[0], arg[1] = addr, n
	return uffdErr("zeropage", u.ioctl(uffdioZeropage, unsafe.Pointer(&arg[0])))
}

// Wake wakes the threads waiting for pages in [addr, addr+n).
func (u *UFFD) Wake(addr, n uint64) error {
	arg := [2]uint64{addr, n}
	return uffdErr("wake", u.ioctl(uffdioWake, unsafe.Pointer(&arg[0])))
}

// Unregister stops reporting faults in [addr, addr+n): missing pages there
// fill with zeros, as anonymous memory does.
func (u *UFFD) Unregister(addr, n uint64) error {
	arg := [2]uint64{addr, n}
	return uffdErr("unregister", u.ioctl(uffdioUnregister, unsafe.Pointer(&arg[0])))
}

func (u *UFFD) ioctl(req uintptr, arg unsafe.Pointer) error {
	var errno syscall.Errno
	err := u.rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg))
	})
	if err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// uffdErr maps an ioctl's errno to the ErrUFFD errors.
func uffdErr(op string, err error) error {
	var sentinel error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOSPC):
		sentinel = ErrUFFDGone
	case errors.Is(err, unix.EEXIST):
		sentinel = ErrUFFDExists
	case errors.Is(err, unix.ENOENT):
		sentinel = ErrUFFDNoRange
	case errors.Is(err, unix.EAGAIN):
		sentinel = ErrUFFDAgain
	default:
		return &OpError{Op: "userfaultfd " + op, Err: err}
	}
	return &OpError{Op: "userfaultfd " + op, Err: fmt.Errorf("%w (%v)", sentinel, err)}
}

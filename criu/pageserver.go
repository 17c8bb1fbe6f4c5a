package criu

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
)

// CRIU's page-server protocol, the part a lazy-pages daemon speaks: each
// message is a page_server_iov (cmd u32, 4 bytes of padding, nr_pages,
// vaddr and dst_id u64, in the host's byte order: little endian on the
// machines CRIU runs on). The daemon asks for pages with PS_IOV_GET
// (dst_id is the process's PID as the checkpoint names it); the answer is
// the same header, its cmd PS_IOV_ADD_F with the PE_PRESENT flag and
// nr_pages what is sent, followed by the pages. PS_IOV_CLOSE or
// PS_IOV_FORCE_CLOSE ends the session, answered with a 32-bit status (0).
//
// mtcp's extension: the padding word carries flags, echoed in the answer.
// psUrgent marks a request for a page a process faulted on: its answer
// goes out before those of the background requests still waiting. CRIU's
// own daemon sends zero there and is served in order.
const (
	psIOVAddF      = 6
	psIOVGet       = 7
	psClose        = 0x1023
	psForceClose   = 0x1024
	psCmdBits      = 16
	pePresent      = 1 << 2
	psUrgent       = 1
	psRequestSize  = 32
	pageSize       = 4096
	maxRequestPage = 1 << 12 // 16 MiB: CRIU asks for at most 4 MiB at once
)

// psRequest encodes a page_server_iov.
func psRequest(cmd uint32, nrPages, vaddr, dstID uint64) []byte {
	b := make([]byte, psRequestSize)
	putPSRequest(b, cmd, nrPages, vaddr, dstID)
	return b
}

// putPSRequest encodes a page_server_iov into b's first psRequestSize
// bytes.
func putPSRequest(b []byte, cmd uint32, nrPages, vaddr, dstID uint64) {
	binary.LittleEndian.PutUint32(b[0:], cmd)
	clear(b[4:8])
	binary.LittleEndian.PutUint64(b[8:], nrPages)
	binary.LittleEndian.PutUint64(b[16:], vaddr)
	binary.LittleEndian.PutUint64(b[24:], dstID)
}

// ServeLazyPages answers the page requests of a lazy-pages daemon (see
// [StartLazyPages]) arriving on rw, reading the pages from the memory of
// the processes a lazy dump left stopped ([DumpOptions].Lazy), until the
// daemon says it has every page (nil) or the stream ends or breaks, or
// ctx ends. procs maps each process's PID as the checkpoint names it to
// its PID here ([CheckpointPIDs]). A request for another process, or
// malformed, ends the session with an error: the daemon then fails and
// the restored process with it. Requests for pages a process faulted on
// are answered before the background ones waiting.
//
// It replaces CRIU's own lazy page server, which would serve from pipes
// through one more process and socket on the path of every page fault of
// the restored process.
func ServeLazyPages(ctx context.Context, rw io.ReadWriter, procs map[uint64]int) error {
	mems := map[uint64]*os.File{}
	defer func() {
		for _, f := range mems {
			f.Close()
		}
	}()
	for vpid, pid := range procs {
		f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
		if err != nil {
			return fmt.Errorf("lazy pages: %w", err)
		}
		mems[vpid] = f
	}
	if c, ok := rw.(io.Closer); ok {
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
	}
	var wmu sync.Mutex
	answer := func(q psReq, buf *[]byte) error {
		n := psRequestSize + int(q.nr)*pageSize
		if cap(*buf) < n {
			*buf = make([]byte, n)
		}
		b := (*buf)[:n]
		putPSRequest(b, psIOVAddF|pePresent<<psCmdBits, q.nr, q.vaddr, q.dst)
		binary.LittleEndian.PutUint32(b[4:], q.flags)
		wmu.Lock()
		defer wmu.Unlock()
		if _, err := mems[q.dst].ReadAt(b[psRequestSize:], int64(q.vaddr)); err != nil {
			return fmt.Errorf("lazy pages: reading %d pages at %#x of process %d: %w", q.nr, q.vaddr, procs[q.dst], err)
		}
		if _, err := rw.Write(b); err != nil {
			return fmt.Errorf("lazy pages: sending pages: %w", err)
		}
		return nil
	}
	background := make(chan psReq, 256)
	readErr := make(chan error, 1)
	quit := make(chan struct{})
	defer close(quit)
	go func() { readErr <- readPSRequests(rw, mems, answer, background, quit) }()
	var buf []byte
	for {
		var q psReq
		select {
		case q = <-background:
		case err := <-readErr:
			if ctx.Err() != nil {
				return fmt.Errorf("lazy pages: %w", ctx.Err())
			}
			if err == nil {
				continue // the close is in background
			}
			return err
		}
		if q.close {
			var status [4]byte
			wmu.Lock()
			_, err := rw.Write(status[:])
			wmu.Unlock()
			if err != nil {
				return fmt.Errorf("lazy pages: answering the close: %w", err)
			}
			return nil
		}
		if err := answer(q, &buf); err != nil {
			return err
		}
	}
}

// psReq is one request of a lazy-pages daemon.
type psReq struct {
	close          bool
	flags          uint32
	nr, vaddr, dst uint64
}

// readPSRequests reads and checks requests from r. It answers urgent
// ones at once itself (one wake-up less on the path of a page fault) and
// hands the others, and the close, to background. It returns nil after a
// close request.
func readPSRequests(r io.Reader, mems map[uint64]*os.File, answer func(psReq, *[]byte) error, background chan<- psReq, quit <-chan struct{}) error {
	br := bufio.NewReaderSize(r, 4096)
	req := make([]byte, psRequestSize)
	var buf []byte
	for {
		if _, err := io.ReadFull(br, req); err != nil {
			if err == io.EOF {
				return errors.New("lazy pages: the lazy-pages daemon went away before it had every page")
			}
			return fmt.Errorf("lazy pages: reading a request: %w", err)
		}
		q := psReq{flags: binary.LittleEndian.Uint32(req[4:]), nr: binary.LittleEndian.Uint64(req[8:]),
			vaddr: binary.LittleEndian.Uint64(req[16:]), dst: binary.LittleEndian.Uint64(req[24:])}
		switch cmd := binary.LittleEndian.Uint32(req[0:]); {
		case cmd == psClose || cmd == psForceClose:
			q = psReq{close: true}
		case cmd != psIOVGet:
			return fmt.Errorf("lazy pages: unexpected request %#x", cmd)
		case mems[q.dst] == nil:
			return fmt.Errorf("lazy pages: request for process %d, not in the checkpoint", q.dst)
		case q.nr == 0 || q.nr > maxRequestPage:
			return fmt.Errorf("lazy pages: request for %d pages", q.nr)
		case q.vaddr%pageSize != 0 || q.vaddr > 1<<62:
			return fmt.Errorf("lazy pages: request at address %#x", q.vaddr)
		case q.flags&^psUrgent != 0:
			return fmt.Errorf("lazy pages: request flags %#x", q.flags)
		case q.flags&psUrgent != 0:
			if err := answer(q, &buf); err != nil {
				return err
			}
			continue
		}
		select {
		case background <- q:
		case <-quit:
			return nil
		}
		if q.close {
			return nil
		}
	}
}

// CheckpointPIDs maps the PIDs a checkpoint of the processes pids gives
// them (the PIDs they have in their own PID namespace, as CRIU names
// them) to their PIDs here, for [ServeLazyPages].
func CheckpointPIDs(pids []int) (map[uint64]int, error) {
	out := map[uint64]int{}
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return nil, err
		}
		vpid := pid
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
				f := strings.Fields(v)
				if len(f) > 0 {
					if vpid, err = strconv.Atoi(f[len(f)-1]); err != nil {
						return nil, fmt.Errorf("/proc/%d/status: NSpid %q", pid, v)
					}
				}
			}
		}
		out[uint64(vpid)] = pid
	}
	return out, nil
}

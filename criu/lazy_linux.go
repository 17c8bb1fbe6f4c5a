package criu

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/mtcp-dev/mtcp/repair"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// CRIU's restore hands each restored process's userfaultfd to the
// lazy-pages daemon through a unix socket in its working directory: the
// PID as a 32-bit integer, then, if it is positive (negative is a zombie,
// with no memory), one byte carrying the descriptor. Once every process
// runs it sends lazyRestoreFinished (criu/uffd.c).
const (
	lazySocketName      = "lazy-pages.socket"
	lazyRestoreFinished = 0x52535446
)

// The background transfer: one request in flight at a time, of
// lazyChunkPages pages after a page fault, doubling with each request
// while no fault comes, up to lazyMaxChunk. What is in flight delays the
// answer to the next fault, which waits behind it; CRIU's daemon works the
// same way. Measured with BenchmarkProcessMigration: four requests of 32
// pages in flight raised the mean fault wait from about 0.45 ms to 1.2 ms
// and the median client pause from about 245 ms to 380 ms; asking for
// more than the faulting page (4 or 16) halved the faults but made each
// slower, for no gain: a fault asks for its page alone.
const (
	lazyChunkPages = 16
	lazyMaxChunk   = 256
	lazyWindow     = 1
	// lazyAgainLimit bounds the retries of a page copy refused while the
	// process's memory map changes (an event not read yet).
	lazyAgainLimit = 10 * time.Second
)

// LazyPages is mtcpd's lazy-pages daemon: it gives a post-copy restore
// ([RestoreOptions].Lazy) its missing memory pages. CRIU's restore hands it
// each restored process's userfaultfd; it fetches the pages from
// [ServeLazyPages] at the other end of its stream, first those the process
// faults on (they overtake the rest at the source), then all the others in
// the background, and fills them in. It is done once every page is in
// place.
//
// It does the work of `criu lazy-pages` inside the daemon, so that a page
// fault costs one network round trip and two wake-ups instead of going
// through CRIU's daemon and a relay on each side.
type LazyPages struct {
	conn io.ReadWriter
	dir  string
	ln   *net.UnixListener

	wmu      sync.Mutex // serializes writes to conn
	mu       sync.Mutex
	procs    []*lazyProc
	restored bool // the restore said it finished
	inflight int  // background requests not answered yet
	chunk    int  // pages per background request now
	pending  int  // requests of any kind not answered yet
	closing  bool // every page is in place; the close is sent
	killed   bool // Kill has let go of the userfaultfds
	stats    LazyStats
	asked    map[uint64]time.Time // when each fault's page was asked for
	out      chan [psRequestSize]byte
	kick     chan struct{}
	done     chan struct{}
	end      sync.Once
	err      error // once done is closed
}

// lazyProc is one restored process (or a child it forked since).
type lazyProc struct {
	pid    uint64 // as the checkpoint names it
	uffd   *repair.UFFD
	m      *lazyMap
	from   uint64 // the background transfer's next checkpoint address
	exited bool
}

// StartLazyPages starts a lazy-pages daemon on the checkpoint in o.Dir,
// fetching pages through o.Conn, and returns once it listens for the
// restore. The checkpoint's images (all but the lazy pages) must be in
// o.Dir already, and the restore must run there.
func StartLazyPages(ctx context.Context, o LazyOptions) (*LazyPages, error) {
	if o.Conn == nil {
		return nil, &OpError{Op: "lazy pages", Err: errors.New("no page stream given")}
	}
	path := filepath.Join(o.Dir, lazySocketName)
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, &OpError{Op: "lazy pages", Err: err}
	}
	lp := &LazyPages{conn: o.Conn, dir: o.Dir, ln: ln, asked: map[uint64]time.Time{},
		out: make(chan [psRequestSize]byte, 4096), kick: make(chan struct{}, 1), done: make(chan struct{})}
	go lp.accept()
	go lp.write()
	go lp.read()
	go lp.background()
	return lp, nil
}

// Wait returns once every page is in place (nil), or the daemon failed or
// was killed.
func (lp *LazyPages) Wait(ctx context.Context) error {
	select {
	case <-lp.done:
	case <-ctx.Done():
		return &OpError{Op: "lazy pages", Err: fmt.Errorf("still fetching pages: %w", ctx.Err())}
	}
	if lp.err != nil {
		return &OpError{Op: "lazy pages", Err: lp.err}
	}
	return nil
}

// Kill stops the daemon at once and lets go of the processes'
// userfaultfds. A restored process still missing pages cannot run on
// without it: its missing pages read as zeros from then on, so kill the
// process first. (A daemon that failed, its page stream broken, keeps
// them until Kill: a process that faults on a missing page waits, to be
// killed, rather than run on with zeros.)
func (lp *LazyPages) Kill() {
	lp.finish(errors.New("stopped"))
	lp.mu.Lock()
	defer lp.mu.Unlock()
	lp.killed = true
	for _, p := range lp.procs {
		if !p.exited {
			p.exited = true
			closeUFFD(p.uffd)
		}
	}
}

// Stats reports what the daemon did so far.
func (lp *LazyPages) Stats() LazyStats {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	return lp.stats
}

// finish ends the daemon with err (nil: every page is in place), once.
// Failed, it keeps the userfaultfds (see Kill).
func (lp *LazyPages) finish(err error) {
	lp.end.Do(func() {
		lp.mu.Lock()
		lp.err = err
		for _, p := range lp.procs {
			if !p.exited && err == nil {
				p.exited = true
				closeUFFD(p.uffd)
			}
		}
		lp.mu.Unlock()
		lp.ln.Close()
		os.Remove(filepath.Join(lp.dir, lazySocketName))
		close(lp.done)
	})
}

func (lp *LazyPages) ended() bool {
	select {
	case <-lp.done:
		return true
	default:
		return false
	}
}

// accept takes the restore's connection and the userfaultfds it sends.
func (lp *LazyPages) accept() {
	c, err := lp.ln.AcceptUnix()
	lp.ln.Close()
	os.Remove(filepath.Join(lp.dir, lazySocketName))
	if err != nil {
		if !lp.ended() {
			lp.finish(fmt.Errorf("waiting for the restore: %w", err))
		}
		return
	}
	defer c.Close()
	go func() {
		<-lp.done
		c.Close()
	}()
	for {
		var b [4]byte
		if _, _, err := readMsg(c, b[:]); err != nil {
			if !lp.ended() {
				lp.finish(fmt.Errorf("the restore's lazy-pages socket: %w", err))
			}
			return
		}
		v := binary.NativeEndian.Uint32(b[:])
		if v == lazyRestoreFinished {
			break
		}
		pid := int32(v)
		if pid <= 0 {
			continue // a zombie: no memory
		}
		var one [1]byte
		fds, _, err := readMsg(c, one[:])
		if err == nil && len(fds) != 1 {
			for _, fd := range fds {
				unix.Close(fd)
			}
			err = fmt.Errorf("%d descriptors with process %d's userfaultfd", len(fds), pid)
		}
		if err == nil {
			err = lp.add(uint64(pid), fds[0])
		}
		if err != nil {
			lp.finish(fmt.Errorf("the restore's lazy-pages socket: %w", err))
			return
		}
	}
	lp.mu.Lock()
	lp.restored = true
	lp.checkDone()
	lp.mu.Unlock()
	lp.poke()
}

// readMsg fills b from c, returning the descriptors that came with it.
func readMsg(c *net.UnixConn, b []byte) ([]int, int, error) {
	var fds []int
	n := 0
	for n < len(b) {
		oob := make([]byte, unix.CmsgSpace(4*4))
		k, oobn, _, _, err := c.ReadMsgUnix(b[n:], oob)
		if oobn > 0 {
			msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
			if perr == nil {
				for _, m := range msgs {
					if f, err := unix.ParseUnixRights(&m); err == nil {
						fds = append(fds, f...)
					}
				}
			}
		}
		n += k
		if err == nil && k == 0 {
			err = io.EOF
		}
		if err != nil {
			if err == io.EOF && n > 0 {
				err = io.ErrUnexpectedEOF
			}
			for _, fd := range fds {
				unix.Close(fd)
			}
			return nil, n, err
		}
	}
	return fds, n, nil
}

// add starts serving the restored process pid through its userfaultfd.
func (lp *LazyPages) add(pid uint64, fd int) error {
	m, err := loadLazyMap(lp.dir, int(pid))
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("process %d: %w", pid, err)
	}
	u, err := repair.NewUFFD(fd)
	if err != nil {
		return err
	}
	lp.mu.Lock()
	lp.start(&lazyProc{pid: pid, uffd: u, m: m})
	lp.mu.Unlock()
	return nil
}

// start serves p. lp.mu is held.
func (lp *LazyPages) start(p *lazyProc) {
	if lp.ended() {
		if lp.err != nil && !lp.killed {
			lp.procs = append(lp.procs, p) // kept until Kill, unserved
		} else {
			closeUFFD(p.uffd)
		}
		return
	}
	lp.procs = append(lp.procs, p)
	lp.stats.Processes++
	go lp.events(p)
	lp.poke()
}

// events handles p's page faults and memory map changes.
func (lp *LazyPages) events(p *lazyProc) {
	for {
		ev, err := p.uffd.ReadEvent(&lp.mu)
		if err != nil {
			lp.mu.Lock()
			quiet := p.exited || lp.ended()
			if !quiet && err == io.EOF {
				lp.exit(p)
				quiet = true
			}
			lp.mu.Unlock()
			if !quiet {
				lp.finish(fmt.Errorf("process %d: %w", p.pid, err))
			}
			return
		}
		var urgent []byte
		urgent, err = lp.event(p, ev)
		lp.mu.Unlock()
		if err == nil && urgent != nil {
			// Sent from here rather than through the writer: one
			// wake-up less on the path of a page fault.
			err = lp.send(urgent)
		}
		if err != nil {
			lp.finish(fmt.Errorf("process %d: %w", p.pid, err))
			return
		}
	}
}

// closeUFFD closes u without waiting: closing waits for the reads under
// way, and the goroutine reading u may be waiting for lp.mu.
func closeUFFD(u *repair.UFFD) { go u.Close() }

// event applies one event of p, returning the request to send for a page
// fault. lp.mu is held.
func (lp *LazyPages) event(p *lazyProc, ev repair.UFFDEvent) ([]byte, error) {
	if p.exited {
		if ev.Kind == repair.UFFDFork {
			unix.Close(ev.FD)
		}
		return nil, nil
	}
	switch ev.Kind {
	case repair.UFFDPageFault:
		addr := ev.Addr &^ (pageSize - 1)
		s, i, ok := p.m.find(addr)
		if !ok || s.state[i] == pgGone {
			// Not among the checkpoint's pages: it was never
			// touched before the dump.
			return nil, lp.zero(p, addr)
		}
		if s.state[i] == pgUrgent {
			return nil, nil // asked for already
		}
		return lp.askUrgent(p, s, i), nil
	case repair.UFFDFork:
		u, err := repair.NewUFFD(ev.FD)
		if err != nil {
			return nil, err
		}
		lp.start(&lazyProc{pid: p.pid, uffd: u, m: p.m.fork()})
	case repair.UFFDRemap:
		p.m.remap(ev.From, ev.To, ev.Len)
	case repair.UFFDRemove:
		// Dropped memory reads as zeros: the old pages must not
		// come back.
		if err := p.uffd.Unregister(ev.Start, ev.End-ev.Start); err != nil {
			switch {
			case errors.Is(err, repair.ErrUFFDGone):
				lp.exit(p)
				return nil, nil
			case !errors.Is(err, repair.ErrUFFDNoRange):
				return nil, err
			}
		}
		p.m.drop(ev.Start, ev.End)
	case repair.UFFDUnmap:
		p.m.drop(ev.Start, ev.End)
	default:
		return nil, fmt.Errorf("unexpected userfaultfd event %#x", ev.Kind)
	}
	lp.checkDone()
	return nil, nil
}

// askUrgent marks page i of segment s, which p faulted on, asked for, and
// returns the request for it, which overtakes the background transfer.
// lp.mu is held.
func (lp *LazyPages) askUrgent(p *lazyProc, s *lazySeg, i int) []byte {
	p.m.set(s, i, pgUrgent)
	img := s.img + uint64(i)*pageSize
	lp.stats.Faults++
	lp.chunk = lazyChunkPages
	lp.asked[img] = time.Now()
	lp.pending++
	return psGet(psUrgent, p.pid, img, 1)
}

// zero maps a zero page at addr in p. lp.mu is held. While the memory
// map changes (an event waits to be read, which only p's events
// goroutine does, the one calling this), the kernel refuses: the page is
// then left to zeroLater, so that the event can be read.
func (lp *LazyPages) zero(p *lazyProc, addr uint64) error {
	again, err := lp.tryZero(p, addr)
	if again {
		go lp.zeroLater(p, addr, time.Now())
	}
	return err
}

// tryZero tries once to map a zero page at addr in p; again says the
// kernel refused while the memory map changes. lp.mu is held.
func (lp *LazyPages) tryZero(p *lazyProc, addr uint64) (again bool, err error) {
	err = p.uffd.ZeroPage(addr, pageSize)
	switch {
	case err == nil, errors.Is(err, repair.ErrUFFDNoRange):
		return false, nil
	case errors.Is(err, repair.ErrUFFDExists):
		return false, p.uffd.Wake(addr, pageSize)
	case errors.Is(err, repair.ErrUFFDGone):
		lp.exit(p)
		return false, nil
	case errors.Is(err, repair.ErrUFFDAgain):
		return true, nil
	}
	return false, err
}

// zeroLater answers p's fault at addr with a zero page once the memory
// map has stopped changing, trying again for up to lazyAgainLimit since
// first (the daemon fails after that). A page that a move (mremap) has
// meanwhile brought to addr from the checkpoint is asked for instead.
func (lp *LazyPages) zeroLater(p *lazyProc, addr uint64, first time.Time) {
	for {
		time.Sleep(50 * time.Microsecond)
		lp.mu.Lock()
		if p.exited || lp.ended() {
			lp.mu.Unlock()
			return
		}
		if s, i, ok := p.m.find(addr); ok && s.state[i] != pgGone {
			if s.state[i] == pgMissing {
				lp.out <- [psRequestSize]byte(lp.askUrgent(p, s, i))
			}
			lp.mu.Unlock()
			return
		}
		again, err := lp.tryZero(p, addr)
		lp.mu.Unlock()
		switch {
		case err != nil:
			lp.finish(fmt.Errorf("process %d: %w", p.pid, err))
			return
		case !again:
			return
		case time.Since(first) > lazyAgainLimit:
			lp.finish(fmt.Errorf("process %d: a zero page refused for %v while the memory map changed", p.pid, lazyAgainLimit))
			return
		}
	}
}

// exit forgets p, which is gone. lp.mu is held.
func (lp *LazyPages) exit(p *lazyProc) {
	if p.exited {
		return
	}
	p.exited = true
	closeUFFD(p.uffd)
	for k := range p.m.segs {
		s := &p.m.segs[k]
		for i := range s.state {
			p.m.set(s, i, pgGone)
		}
	}
	lp.checkDone()
}

// psGet encodes a request for pages.
func psGet(flags uint32, pid, img uint64, pages int) []byte {
	r := psRequest(psIOVGet, uint64(pages), img, pid)
	binary.LittleEndian.PutUint32(r[4:], flags)
	return r
}

// request queues a request for the writer. lp.mu is held.
func (lp *LazyPages) request(flags uint32, pid, img uint64, pages int) {
	lp.pending++
	lp.out <- [psRequestSize]byte(psGet(flags, pid, img, pages))
}

// send writes requests to the source.
func (lp *LazyPages) send(b []byte) error {
	lp.wmu.Lock()
	defer lp.wmu.Unlock()
	if _, err := lp.conn.Write(b); err != nil {
		return fmt.Errorf("sending a page request: %w", err)
	}
	return nil
}

// write sends the requests, as many at once as are waiting.
func (lp *LazyPages) write() {
	buf := make([]byte, 0, 64*psRequestSize)
	for {
		select {
		case r := <-lp.out:
			buf = append(buf[:0], r[:]...)
		more:
			for len(buf) < cap(buf) {
				select {
				case r := <-lp.out:
					buf = append(buf, r[:]...)
				default:
					break more
				}
			}
			if err := lp.send(buf); err != nil {
				if !lp.ended() {
					lp.finish(err)
				}
				return
			}
		case <-lp.done:
			return
		}
	}
}

// read receives the pages and fills them in.
func (lp *LazyPages) read() {
	err := lp.readPages()
	if !lp.ended() {
		lp.finish(err)
	}
}

func (lp *LazyPages) readPages() error {
	r := bufio.NewReaderSize(lp.conn, 64<<10)
	hdr := make([]byte, psRequestSize)
	var data []byte
	for {
		// Once every page is in place and no answer is due, what
		// comes is the 4-byte answer to the close.
		_, err := io.ReadFull(r, hdr[:4])
		lp.mu.Lock()
		closing := lp.closing
		lp.mu.Unlock()
		if err == nil && closing {
			return nil
		}
		if err == nil {
			_, err = io.ReadFull(r, hdr[4:])
		}
		if err != nil {
			if lp.ended() {
				return nil
			}
			return fmt.Errorf("receiving pages: %w", err)
		}
		cmd := binary.LittleEndian.Uint32(hdr[0:])
		flags := binary.LittleEndian.Uint32(hdr[4:])
		nr := binary.LittleEndian.Uint64(hdr[8:])
		vaddr := binary.LittleEndian.Uint64(hdr[16:])
		pid := binary.LittleEndian.Uint64(hdr[24:])
		if cmd != psIOVAddF|pePresent<<psCmdBits || nr == 0 || nr > maxRequestPage || vaddr%pageSize != 0 {
			return fmt.Errorf("receiving pages: malformed answer (command %#x, %d pages at %#x)", cmd, nr, vaddr)
		}
		n := int(nr) * pageSize
		if cap(data) < n {
			data = make([]byte, n)
		}
		data = data[:n]
		if _, err := io.ReadFull(r, data); err != nil {
			return fmt.Errorf("receiving pages: %w", err)
		}
		lp.mu.Lock()
		lp.pending--
		if flags&psUrgent == 0 {
			lp.inflight--
		} else if t, ok := lp.asked[vaddr]; ok {
			d := time.Since(t)
			delete(lp.asked, vaddr)
			lp.stats.FaultWait += d
			lp.stats.FaultWaitMax = max(lp.stats.FaultWaitMax, d)
		}
		err = lp.fill(pid, vaddr, data)
		lp.checkDone()
		lp.mu.Unlock()
		if err != nil {
			return err
		}
		lp.poke()
	}
}

// fill copies pages of the checkpoint's process pid, from checkpoint
// address img on, into every process that still misses them. lp.mu is
// held.
func (lp *LazyPages) fill(pid, img uint64, data []byte) error {
	for _, p := range lp.procs {
		if p.pid != pid || p.exited {
			continue
		}
		if err := lp.fillProc(p, img, data); err != nil {
			return err
		}
	}
	return nil
}

func (lp *LazyPages) fillProc(p *lazyProc, img uint64, data []byte) error {
	for t0 := time.Now(); ; {
		again := false
		var ferr error
		p.m.overlapping(img, uint64(len(data)), func(s *lazySeg, i, count int, off uint64) {
			for j := i; j < i+count && ferr == nil && !p.exited; {
				if s.state[j] >= pgPresent {
					j++
					continue
				}
				k := j
				for k < i+count && s.state[k] < pgPresent {
					k++
				}
				src := data[off+uint64(j-i)*pageSize : off+uint64(k-i)*pageSize]
				n, err := p.uffd.Copy(s.run+uint64(j)*pageSize, src)
				for end := j + n/pageSize; j < end; j++ {
					p.m.set(s, j, pgPresent)
					lp.stats.Pages++
				}
				switch {
				case err == nil:
				case errors.Is(err, repair.ErrUFFDExists):
					p.m.set(s, j, pgPresent)
					j++
				case errors.Is(err, repair.ErrUFFDNoRange):
					p.m.set(s, j, pgGone)
					j++
				case errors.Is(err, repair.ErrUFFDGone):
					lp.exit(p)
				case errors.Is(err, repair.ErrUFFDAgain):
					again = true
					j = k
				default:
					ferr = err
				}
			}
		})
		if ferr != nil || !again || p.exited {
			return ferr
		}
		if time.Since(t0) > lazyAgainLimit {
			return fmt.Errorf("process %d: its memory map did not settle for %v", p.pid, lazyAgainLimit)
		}
		lp.mu.Unlock()
		time.Sleep(50 * time.Microsecond)
		lp.mu.Lock()
	}
}

// poke wakes the background transfer.
func (lp *LazyPages) poke() {
	select {
	case lp.kick <- struct{}{}:
	default:
	}
}

// background asks for the pages nobody faulted on, lazyWindow requests at
// a time, once the restore has finished (before, a process's memory may
// not be registered yet).
func (lp *LazyPages) background() {
	for {
		select {
		case <-lp.kick:
		case <-lp.done:
			return
		}
		lp.mu.Lock()
		for lp.restored && !lp.closing && lp.inflight < lazyWindow {
			p, img, pages := lp.nextChunk(max(lp.chunk, lazyChunkPages))
			lp.chunk = min(max(lp.chunk, lazyChunkPages)*2, lazyMaxChunk)
			if p == nil {
				break
			}
			p.m.overlapping(img, uint64(pages)*pageSize, func(s *lazySeg, i, count int, _ uint64) {
				for j := i; j < i+count; j++ {
					p.m.set(s, j, pgBackground)
				}
			})
			p.from = img + uint64(pages)*pageSize
			lp.inflight++
			lp.request(0, p.pid, img, pages)
		}
		lp.mu.Unlock()
	}
}

// nextChunk finds the next pages to ask for in the background. lp.mu is
// held.
func (lp *LazyPages) nextChunk(chunk int) (*lazyProc, uint64, int) {
	for _, p := range lp.procs {
		if p.exited {
			continue
		}
		if img, pages, ok := p.m.next(p.from, chunk); ok {
			return p, img, pages
		}
	}
	return nil, 0, 0
}

// checkDone sends the close once every page is in place. lp.mu is held.
func (lp *LazyPages) checkDone() {
	if !lp.restored || lp.closing || lp.pending > 0 {
		return
	}
	for _, p := range lp.procs {
		if !p.exited && p.m.missing > 0 {
			return
		}
	}
	lp.closing = true
	var r [psRequestSize]byte
	putPSRequest(r[:], psForceClose, 0, 0, 0)
	lp.out <- r
}

// CheckLazyRestore asks CRIU whether this kernel lets it restore lazily
// (userfaultfd with non-cooperative events). The error says why not.
func CheckLazyRestore(ctx context.Context, o Options) error {
	s, err := startSwrk(o)
	if err != nil {
		return &OpError{Op: "feature check", Err: err}
	}
	resp, err := s.call(ctx, &rpc.CriuReq{Type: rpc.CriuReqType_FEATURE_CHECK.Enum(),
		Features: &rpc.CriuFeatures{LazyPages: proto.Bool(true)}}, nil)
	cerr := s.close()
	if err != nil {
		return &OpError{Op: "feature check", Err: errors.Join(err, cerr)}
	}
	if !resp.GetFeatures().GetLazyPages() {
		return &OpError{Op: "feature check", Err: fmt.Errorf("%w: this kernel does not let CRIU restore lazily (no userfaultfd with non-cooperative events); migrate processes eagerly (process_pages: eager)", ErrUnavailable)}
	}
	return nil
}

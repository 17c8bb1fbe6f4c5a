package criu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"google.golang.org/protobuf/proto"
)

// swrk is one `criu swrk` child and the RPC socket to it. CRIU serves one
// request per swrk (or several with keep_open), then exits.
type swrk struct {
	cmd    *exec.Cmd
	sk     *net.UnixConn // our end of the SOCK_SEQPACKET pair
	stderr *bytes.Buffer
	done   chan struct{}
	err    error // cmd.Wait's, once done is closed
}

// The descriptors swrk gets: the RPC socket, then the extra files.
const (
	swrkRPCFd   = 3
	swrkExtraFd = 4
)

// startSwrk runs criu swrk with the RPC socket as fd 3 and extra as fd 4
// and on. The socket pair is made here: it is the one piece of plumbing
// os/exec cannot make, and the pair never leaves this file.
func startSwrk(o Options, extra ...*os.File) (*swrk, error) {
	path, err := o.path()
	if err != nil {
		return nil, err
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair for criu swrk: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "criu-rpc")
	theirs := os.NewFile(uintptr(fds[1]), "criu-rpc-swrk")
	defer theirs.Close()
	fc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, fmt.Errorf("criu swrk socket: %w", err)
	}
	s := &swrk{sk: fc.(*net.UnixConn), stderr: &bytes.Buffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(path, "swrk", fmt.Sprint(swrkRPCFd))
	s.cmd.ExtraFiles = append([]*os.File{theirs}, extra...)
	s.cmd.Stdout = s.stderr
	s.cmd.Stderr = s.stderr
	// A page server forked by swrk inherits its output: do not wait for
	// that child to close it once swrk itself has exited.
	s.cmd.WaitDelay = 200 * time.Millisecond
	if err := s.cmd.Start(); err != nil {
		s.sk.Close()
		return nil, fmt.Errorf("%w: starting %s swrk: %v: %s", ErrUnavailable, path, err, advice)
	}
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

// close ends the RPC session and waits for swrk to exit (killing it if it
// does not within a few seconds).
func (s *swrk) close() error {
	s.sk.Close()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
	if s.err != nil {
		return fmt.Errorf("criu swrk: %w: %s", s.err, strings.TrimSpace(s.stderr.String()))
	}
	return nil
}

// kill stops swrk at once (the caller gave up).
func (s *swrk) kill() {
	s.cmd.Process.Kill()
	s.sk.Close()
	<-s.done
}

// call sends one request and returns the final response, answering CRIU's
// notifications with notify (nil: accept them all). When ctx ends first,
// swrk is killed.
func (s *swrk) call(ctx context.Context, req *rpc.CriuReq, notify func(*rpc.CriuNotify) error) (*rpc.CriuResp, error) {
	stop := context.AfterFunc(ctx, func() { s.cmd.Process.Kill(); s.sk.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, 1<<16)
	want := req.GetType() // req becomes a NOTIFY answer after a notification
	for {
		b, err := proto.Marshal(req)
		if err != nil {
			return nil, err
		}
		if _, err := s.sk.Write(b); err != nil {
			return nil, s.failed(ctx, err)
		}
		n, err := s.sk.Read(buf)
		if err != nil {
			return nil, s.failed(ctx, err)
		}
		resp := &rpc.CriuResp{}
		if err := proto.Unmarshal(buf[:n], resp); err != nil {
			return nil, fmt.Errorf("criu swrk sent a malformed answer: %w", err)
		}
		if !resp.GetSuccess() {
			msg := resp.GetCrErrmsg()
			if msg == "" || strings.Contains(msg, "RLIMIT_NOFILE") {
				// CRIU's first error, which it reports here, is often
				// that it could not raise its own RLIMIT_NOFILE, which
				// it carries on after (see logTail): the log says why
				// it failed.
				msg = "failed"
			}
			if e := resp.GetCrErrno(); e != 0 {
				msg += fmt.Sprintf(" (%v)", syscall.Errno(e))
			}
			return resp, errors.New(msg)
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			// CRIU answers PAGE_SERVER_CHLD as PAGE_SERVER.
			if resp.GetType() != want && !(want == rpc.CriuReqType_PAGE_SERVER_CHLD && resp.GetType() == rpc.CriuReqType_PAGE_SERVER) {
				return resp, fmt.Errorf("criu swrk answered a %v request with %v", want, resp.GetType())
			}
			return resp, nil
		}
		var nerr error
		if notify != nil {
			nerr = notify(resp.GetNotify())
		}
		req = &rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: proto.Bool(nerr == nil)}
		if nerr != nil {
			// CRIU aborts the operation on a failed notification; its
			// answer follows.
			if _, err := s.sk.Write(mustMarshal(req)); err != nil {
				return nil, nerr
			}
			s.sk.Read(buf)
			return nil, nerr
		}
	}
}

func mustMarshal(m proto.Message) []byte {
	b, _ := proto.Marshal(m)
	return b
}

// failed explains a broken RPC socket: the caller gave up, or swrk died.
func (s *swrk) failed(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (criu swrk was killed)", ctx.Err())
	}
	select {
	case <-s.done:
		return fmt.Errorf("criu swrk exited: %v: %s", s.err, strings.TrimSpace(s.stderr.String()))
	case <-time.After(time.Second):
	}
	return fmt.Errorf("criu swrk: %w", err)
}

// Check runs CRIU's VERSION request and returns the version, or an error
// wrapping ErrUnavailable that says what to do when CRIU is missing or
// older than MinVersion.
func Check(ctx context.Context, o Options) (Version, error) {
	s, err := startSwrk(o)
	if err != nil {
		return Version{}, &OpError{Op: "version", Err: err}
	}
	resp, err := s.call(ctx, &rpc.CriuReq{Type: rpc.CriuReqType_VERSION.Enum()}, nil)
	cerr := s.close()
	if err != nil {
		return Version{}, &OpError{Op: "version", Err: fmt.Errorf("%w: %s does not answer CRIU's VERSION request (%v, %v): %s", ErrUnavailable, s.cmd.Path, err, cerr, advice)}
	}
	rv := resp.GetVersion()
	v := Version{int(rv.GetMajorNumber()), int(rv.GetMinorNumber()), int(rv.GetSublevel())}
	if err := checkVersion(s.cmd.Path, v, kernelRelease()); err != nil {
		return v, &OpError{Op: "version", Err: err}
	}
	return v, nil
}

// openDir opens an images directory for CRIU, which reaches it through
// /proc/<our pid>/fd/N.
func openDir(dir string) (*os.File, error) {
	if dir == "" {
		return nil, errors.New("no images directory given")
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || !fi.IsDir() {
		f.Close()
		return nil, fmt.Errorf("%s is not a directory", dir)
	}
	return f, nil
}

// logTail returns the last lines of a CRIU log that say something went
// wrong (or just the last lines).
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	var errs []string
	for _, l := range lines {
		if strings.HasPrefix(l, "Error") || strings.Contains(l, "Error (") {
			// CRIU cannot raise RLIMIT_NOFILE where the hard limit is
			// fixed; it says so as an error and carries on.
			if strings.Contains(l, "RLIMIT_NOFILE") {
				continue
			}
			errs = append(errs, l)
		}
	}
	if len(errs) == 0 {
		errs = lines[max(0, len(lines)-5):]
	}
	return strings.Join(errs[max(0, len(errs)-8):], "\n")
}

// pagePipe is a socket pair whose one end goes to CRIU (as the page-server
// socket) and whose other end is relayed to and from an io.ReadWriter.
type pagePipe struct {
	criu  *os.File      // CRIU's end, passed to swrk
	ours  *net.UnixConn // ours
	toPS  chan error    // rw -> ours finished
	fromP chan error    // ours -> rw finished
}

func newPagePipe() (*pagePipe, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair for the page stream: %w", err)
	}
	for _, fd := range fds {
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, pageSockBuf)
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, pageSockBuf)
	}
	f := os.NewFile(uintptr(fds[0]), "criu-pages")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		syscall.Close(fds[1])
		return nil, err
	}
	return &pagePipe{criu: os.NewFile(uintptr(fds[1]), "criu-pages-swrk"), ours: fc.(*net.UnixConn),
		toPS: make(chan error, 1), fromP: make(chan error, 1)}, nil
}

// pageSockBuf is the socket buffer of each end of the page stream's
// socket pair.
const pageSockBuf = 8 << 20

// relay copies rw to CRIU and CRIU to rw until each side ends. When CRIU's
// side is done (every copy of its end closed), rw's write half is closed.
func (p *pagePipe) relay(rw io.ReadWriter) {
	go func() {
		err := copyAll(p.ours, rw)
		p.ours.CloseWrite()
		p.toPS <- err
	}()
	go func() {
		err := copyAll(rw, p.ours)
		if cw, ok := rw.(interface{ CloseWrite() error }); ok {
			err = errors.Join(err, cw.CloseWrite())
		}
		p.fromP <- err
	}()
}

// copyAll copies r to w until r ends. It is a plain read/write loop with
// a large buffer: io.Copy would pick splice(2) paths between the socket
// types, which the page stream does not need.
func copyAll(w io.Writer, r io.Reader) error {
	buf := make([]byte, 256<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// Dump checkpoints the tree rooted at o.PID (see [DumpOptions]). On error
// the tree runs on as before: CRIU resumes it and takes its sockets out of
// repair mode, unless CRIU itself died (ctx ended), which can leave the
// sockets in repair mode: the caller then thaws them.
func Dump(ctx context.Context, o DumpOptions) (*DumpResult, error) {
	p, err := PrepareDump(o)
	if err != nil {
		return nil, err
	}
	return p.Run(ctx)
}

// PreparedDump is a [Dump] whose `criu swrk` already runs, waiting for the
// request: its start-up, some milliseconds, is then not spent while the
// caller holds the process's connections.
type PreparedDump struct {
	o    DumpOptions
	dir  *os.File
	pp   *pagePipe
	conf string // a CRIU configuration file to remove, or ""
	opts *rpc.CriuOpts
	s    *swrk
	ran  atomic.Bool // Run or Close was called
}

// PrepareDump starts CRIU for the dump o describes; [PreparedDump.Run]
// sends the request. Call Close if Run is not called.
func PrepareDump(o DumpOptions) (*PreparedDump, error) {
	p, err := prepareDump(o)
	if err != nil {
		return nil, &OpError{Op: "dump", Err: err}
	}
	return p, nil
}

func prepareDump(o DumpOptions) (_ *PreparedDump, err error) {
	if o.PID <= 0 {
		return nil, fmt.Errorf("pid %d: give the pid of the process to dump", o.PID)
	}
	if o.Lazy && (o.Pages != nil || !o.LeaveStopped) {
		return nil, errors.New("a lazy dump leaves the tree stopped (LeaveStopped) and sends no pages itself (no Pages): ServeLazyPages serves them")
	}
	p := &PreparedDump{o: o}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if p.dir, err = openDir(o.Dir); err != nil {
		return nil, err
	}
	p.opts = &rpc.CriuOpts{
		ImagesDirFd:    proto.Int32(int32(p.dir.Fd())),
		Pid:            proto.Int32(int32(o.PID)),
		LogLevel:       proto.Int32(o.logLevel()),
		LogFile:        proto.String("dump.log"),
		TcpEstablished: proto.Bool(true),
		NetworkLock:    rpc.CriuNetworkLockMethod_SKIP.Enum(),
		LeaveStopped:   proto.Bool(o.LeaveStopped),
		ShellJob:       proto.Bool(o.ShellJob),
		ExtUnixSk:      proto.Bool(o.ExtUnixSockets),
	}
	if o.SkipInFlight {
		p.opts.TcpSkipInFlight = proto.Bool(true)
	}
	var extra []*os.File
	switch {
	case o.Lazy:
		// CRIU would serve a lazy dump's pages itself after the dump,
		// from pipes it filled while the tree was frozen; mtcp serves
		// them from the stopped tree instead (ServeLazyPages). CRIU's
		// page server gets a socket with the order to close already in
		// it (through a configuration file: CRIU's RPC takes no
		// page-server socket for a lazy dump), so the dump returns as
		// soon as the images are written.
		if p.pp, err = newPagePipe(); err != nil {
			return nil, err
		}
		extra = append(extra, p.pp.criu)
		if _, err = p.pp.ours.Write(psRequest(psForceClose, 0, 0, 0)); err != nil {
			p.pp.criu.Close()
			return nil, err
		}
		if p.conf, err = lazyDumpConfig(); err != nil {
			p.pp.criu.Close()
			return nil, err
		}
		p.opts.ConfigFile = proto.String(p.conf)
		p.opts.LazyPages = proto.Bool(true)
	case o.Pages != nil:
		if p.pp, err = newPagePipe(); err != nil {
			return nil, err
		}
		extra = append(extra, p.pp.criu)
		p.opts.Ps = &rpc.CriuPageServerInfo{Fd: proto.Int32(swrkExtraFd)}
	}
	p.s, err = startSwrk(o.Options, extra...)
	if p.pp != nil {
		p.pp.criu.Close() // swrk has its copy
	}
	if err != nil {
		return nil, err
	}
	return p, nil
}

// Close releases a prepared dump that was not run (CRIU exits without
// touching the process); after Run it does nothing.
func (p *PreparedDump) Close() {
	if p.ran.Swap(true) {
		return
	}
	if p.s != nil {
		p.s.kill()
	}
	p.release()
}

func (p *PreparedDump) release() {
	if p.pp != nil {
		p.pp.ours.Close()
	}
	if p.dir != nil {
		p.dir.Close()
	}
	if p.conf != "" {
		os.Remove(p.conf)
	}
}

// Run sends the dump request and returns as [Dump] does. It runs once.
func (p *PreparedDump) Run(ctx context.Context) (*DumpResult, error) {
	if p.ran.Swap(true) {
		return nil, &OpError{Op: "dump", Err: errors.New("a prepared dump runs once, and not after Close")}
	}
	defer p.release()
	res, err := p.run(ctx)
	if err != nil {
		log := logTail(filepath.Join(p.o.Dir, "dump.log"))
		if strings.Contains(log, "In-flight connection") {
			err = fmt.Errorf("%w: %w", ErrInFlight, err)
		}
		return nil, &OpError{Op: "dump", Err: err, Log: log}
	}
	return res, nil
}

func (p *PreparedDump) run(ctx context.Context) (*DumpResult, error) {
	if p.pp != nil && !p.o.Lazy {
		p.pp.relay(p.o.Pages)
	}
	start := time.Now()
	_, err := p.s.call(ctx, &rpc.CriuReq{Type: rpc.CriuReqType_DUMP.Enum(), Opts: p.opts}, nil)
	took := time.Since(start)
	cerr := p.s.close()
	if err != nil {
		return nil, errors.Join(err, cerr)
	}
	if p.pp != nil && !p.o.Lazy {
		// swrk has exited: CRIU's end is closed, the last bytes (the
		// page server's final answer went the other way) are flushed.
		select {
		case err := <-p.pp.fromP:
			if err != nil && !errors.Is(err, net.ErrClosed) {
				return nil, fmt.Errorf("page stream: %w", err)
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	res := &DumpResult{Took: took}
	// A lazy dump's page server starts CRIU's statistics anew: only
	// an eager dump's say how the dump went.
	if st, err := stats.CriuGetDumpStats(p.dir); err == nil && !p.o.Lazy {
		us := func(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }
		res.Freezing, res.Frozen = us(st.GetFreezingTime()), us(st.GetFrozenTime())
		res.MemDump, res.MemWrite = us(st.GetMemdumpTime()), us(st.GetMemwriteTime())
		res.PagesWritten = st.GetPagesWritten()
	}
	return res, nil
}

// PageServerOptions say where [ServePages] puts the pages.
type PageServerOptions struct {
	Options
	// Dir receives the page images. It must exist.
	Dir string
	// Conn carries the dump's page stream (the other end of a Dump's
	// Pages). If it has a CloseWrite method, ServePages calls it at the
	// end.
	Conn io.ReadWriter
}

// ServePages receives the memory pages that a [Dump] sends through its
// Pages and writes them into o.Dir, next to which the dump's other images
// must be put before [Restore]. It returns once CRIU's page server has
// received and written everything, or failed.
func ServePages(ctx context.Context, o PageServerOptions) error {
	if err := servePages(ctx, o); err != nil {
		return &OpError{Op: "page server", Err: err, Log: logTail(filepath.Join(o.Dir, "page-server.log"))}
	}
	return nil
}

func servePages(ctx context.Context, o PageServerOptions) error {
	dir, err := openDir(o.Dir)
	if err != nil {
		return err
	}
	defer dir.Close()
	pp, err := newPagePipe()
	if err != nil {
		return err
	}
	defer pp.ours.Close()
	s, err := startSwrk(o.Options, pp.criu)
	pp.criu.Close()
	if err != nil {
		return err
	}
	defer s.kill()
	opts := &rpc.CriuOpts{
		ImagesDirFd: proto.Int32(int32(dir.Fd())),
		LogLevel:    proto.Int32(o.logLevel()),
		LogFile:     proto.String("page-server.log"),
		Ps:          &rpc.CriuPageServerInfo{Fd: proto.Int32(swrkExtraFd)},
	}
	// PAGE_SERVER_CHLD runs the page server as a child of swrk, which
	// WAIT_PID then waits for: its exit status says whether every page
	// was written.
	resp, err := s.call(ctx, &rpc.CriuReq{Type: rpc.CriuReqType_PAGE_SERVER_CHLD.Enum(), Opts: opts, KeepOpen: proto.Bool(true)}, nil)
	if err != nil {
		return err
	}
	pp.relay(o.Conn)
	pid := resp.GetPs().GetPid()
	resp, err = s.call(ctx, &rpc.CriuReq{Type: rpc.CriuReqType_WAIT_PID.Enum(), Pid: proto.Uint32(uint32(pid))}, nil)
	if err != nil {
		return err
	}
	if err := s.close(); err != nil {
		return err
	}
	if st := syscall.WaitStatus(resp.GetStatus()); !st.Exited() || st.ExitStatus() != 0 {
		return fmt.Errorf("the page server ended with %v", describeStatus(st))
	}
	// Every copy of CRIU's end is closed now: what the page server sent
	// last (its answer to the dump's final request) reaches the dump.
	select {
	case err := <-pp.fromP:
		if err != nil && !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("page stream: %w", err)
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

func describeStatus(st syscall.WaitStatus) string {
	switch {
	case st.Exited():
		return fmt.Sprintf("exit status %d", st.ExitStatus())
	case st.Signaled():
		return "signal " + st.Signal().String()
	}
	return fmt.Sprintf("wait status %#x", uint32(st))
}

// Restore restores the tree checkpointed in o.Dir, in the caller's
// network namespace, and returns once it runs. The restored root is a
// child of the caller (see [RestoreResult.PID]). On error nothing of the
// tree is left running.
func Restore(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	p, err := PrepareRestore(o.Options)
	if err != nil {
		return nil, err
	}
	return p.Run(ctx, o)
}

// PreparedRestore is a `criu swrk` started ahead of a [Restore], so that
// its start-up is not spent while the connections are held.
type PreparedRestore struct {
	s   *swrk
	ran atomic.Bool // Run or Close was called
}

// PrepareRestore starts CRIU for a restore; [PreparedRestore.Run] sends
// the request. Call Close if Run is not called.
func PrepareRestore(o Options) (*PreparedRestore, error) {
	s, err := startSwrk(o)
	if err != nil {
		return nil, &OpError{Op: "restore", Err: err}
	}
	return &PreparedRestore{s: s}, nil
}

// Close releases a prepared restore that was not run; after Run it does
// nothing.
func (p *PreparedRestore) Close() {
	if !p.ran.Swap(true) {
		p.s.kill()
	}
}

// Run restores as [Restore] does, with the CRIU that PrepareRestore
// started (o.Options is not looked at). It runs once.
func (p *PreparedRestore) Run(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	if p.ran.Swap(true) {
		return nil, &OpError{Op: "restore", Err: errors.New("a prepared restore runs once, and not after Close")}
	}
	res, err := p.run(ctx, o)
	if err != nil {
		return nil, &OpError{Op: "restore", Err: err, Log: logTail(filepath.Join(o.Dir, "restore.log"))}
	}
	return res, nil
}

var restoreMu sync.Mutex

func (p *PreparedRestore) run(ctx context.Context, o RestoreOptions) (*RestoreResult, error) {
	dir, err := openDir(o.Dir)
	if err != nil {
		p.s.kill()
		return nil, err
	}
	defer dir.Close()
	opts := &rpc.CriuOpts{
		ImagesDirFd:    proto.Int32(int32(dir.Fd())),
		LogLevel:       proto.Int32(o.logLevel()),
		LogFile:        proto.String("restore.log"),
		TcpEstablished: proto.Bool(true),
		NetworkLock:    rpc.CriuNetworkLockMethod_SKIP.Enum(),
		RstSibling:     proto.Bool(true),
		ShellJob:       proto.Bool(o.ShellJob),
		ExtUnixSk:      proto.Bool(o.ExtUnixSockets),
		LazyPages:      proto.Bool(o.Lazy),
	}
	// Two restores at once would compete for the same PIDs.
	restoreMu.Lock()
	defer restoreMu.Unlock()
	start := time.Now()
	resp, err := p.s.call(ctx, &rpc.CriuReq{Type: rpc.CriuReqType_RESTORE.Enum(), Opts: opts}, nil)
	took := time.Since(start)
	// swrk's exit status adds nothing once the restore answered.
	cerr := p.s.close()
	if err != nil {
		return nil, errors.Join(err, cerr)
	}
	return &RestoreResult{PID: int(resp.GetRestore().GetPid()), Took: took}, nil
}

// lazyDumpConfig writes a CRIU configuration file that makes a lazy
// dump's page server use the socket swrk has as swrkExtraFd, and returns
// its path. The caller removes it.
func lazyDumpConfig() (string, error) {
	f, err := os.CreateTemp("", "mtcp-criu-*.conf")
	if err != nil {
		return "", fmt.Errorf("CRIU configuration for a lazy dump: %w", err)
	}
	_, err = fmt.Fprintf(f, "ps-socket %d\n", swrkExtraFd)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("CRIU configuration for a lazy dump: %w", err)
	}
	return f.Name(), nil
}

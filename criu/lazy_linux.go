package criu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// LazyPages is a running `criu lazy-pages` daemon: it gives a post-copy
// restore ([RestoreOptions].Lazy) its missing memory pages, fetching them
// from [ServeLazyPages] at the other end of its stream, first those the
// restored process faults on, then all the others. It exits once every
// page is in place.
type LazyPages struct {
	cmd  *exec.Cmd
	pp   *pagePipe
	out  *bytes.Buffer
	dir  string
	done chan struct{}
	err  error // cmd.Wait's, once done is closed
}

// StartLazyPages starts a lazy-pages daemon on the checkpoint in o.Dir,
// fetching pages through o.Conn, and returns once it waits for the
// restore. The checkpoint's images (all but the lazy pages) must be in
// o.Dir already. CRIU has no RPC request for this daemon: it runs as
// `criu lazy-pages`, with the page stream and a readiness pipe as its
// descriptors 3 and 4.
func StartLazyPages(ctx context.Context, o LazyOptions) (*LazyPages, error) {
	lp, err := startLazyPages(ctx, o)
	if err != nil {
		return nil, &OpError{Op: "lazy pages", Err: err, Log: logTail(filepath.Join(o.Dir, "lazy-pages.log"))}
	}
	return lp, nil
}

func startLazyPages(ctx context.Context, o LazyOptions) (*LazyPages, error) {
	path, err := o.path()
	if err != nil {
		return nil, err
	}
	if o.Conn == nil {
		return nil, errors.New("no page stream given")
	}
	d, err := openDir(o.Dir)
	if err != nil {
		return nil, err
	}
	d.Close()
	pp, err := newPagePipe()
	if err != nil {
		return nil, err
	}
	ready, readyW, err := os.Pipe()
	if err != nil {
		pp.criu.Close()
		pp.ours.Close()
		return nil, err
	}
	defer ready.Close()
	lp := &LazyPages{pp: pp, out: &bytes.Buffer{}, dir: o.Dir, done: make(chan struct{})}
	lp.cmd = exec.Command(path, "lazy-pages", "--page-server", "--ps-socket", "3", "--status-fd", "4",
		"-D", o.Dir, "-W", o.Dir, "-o", "lazy-pages.log", "-v"+fmt.Sprint(o.lazyLogLevel()))
	lp.cmd.ExtraFiles = []*os.File{pp.criu, readyW}
	lp.cmd.Stdout, lp.cmd.Stderr = lp.out, lp.out
	lp.cmd.WaitDelay = 200 * time.Millisecond
	err = lp.cmd.Start()
	pp.criu.Close()
	readyW.Close()
	if err != nil {
		pp.ours.Close()
		return nil, fmt.Errorf("%w: starting %s lazy-pages: %v: %s", ErrUnavailable, path, err, advice)
	}
	go func() {
		lp.err = lp.cmd.Wait()
		close(lp.done)
	}()
	pp.relay(o.Conn)
	// CRIU writes one byte to its status descriptor when it listens for
	// the restore; it closes it unwritten if it fails first.
	got := make(chan error, 1)
	go func() {
		b := make([]byte, 1)
		n, err := ready.Read(b)
		if n == 1 {
			err = nil
		} else if err == nil || err == io.EOF {
			err = errors.New("it exited before it was ready")
		}
		got <- err
	}()
	select {
	case err = <-got:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		lp.Kill()
		return nil, fmt.Errorf("criu lazy-pages: %w%s", err, lp.output())
	}
	return lp, nil
}

// Wait returns once the daemon has exited: nil if every page was fetched
// and handed to the restored process.
func (lp *LazyPages) Wait(ctx context.Context) error {
	select {
	case <-lp.done:
	case <-ctx.Done():
		return &OpError{Op: "lazy pages", Err: fmt.Errorf("still fetching pages: %w", ctx.Err())}
	}
	lp.pp.ours.Close()
	if lp.err != nil {
		return &OpError{Op: "lazy pages", Err: fmt.Errorf("criu lazy-pages: %w%s", lp.err, lp.output()),
			Log: logTail(filepath.Join(lp.dir, "lazy-pages.log"))}
	}
	return nil
}

// Kill stops the daemon at once and waits for it to go. A restored
// process still missing pages cannot run on without it.
func (lp *LazyPages) Kill() {
	lp.cmd.Process.Signal(syscall.SIGKILL)
	<-lp.done
	lp.pp.ours.Close()
}

// output is what the daemon printed, if anything, as an error suffix.
func (lp *LazyPages) output() string {
	select {
	case <-lp.done:
	default:
		return ""
	}
	if s := strings.TrimSpace(lp.out.String()); s != "" {
		return ": " + s
	}
	return ""
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

package criu

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// What Room keeps free on the checkpoint file system for everything else
// (a tmpfs is memory): a share of its size, and a floor.
const (
	RoomReservePercent = 10       // percent of the file system's size
	RoomReserveMin     = 64 << 20 // bytes
)

// ErrUnavailable is wrapped by the errors of [Check] and of every operation
// when CRIU is missing or too old. The error's text says what to do.
var ErrUnavailable = errors.New("CRIU is unavailable")

// ErrInFlight is wrapped by the error of a dump that failed because a
// listening socket of the tree had connections not accepted yet (see
// DumpOptions.SkipInFlight).
var ErrInFlight = errors.New("a listening socket has connections it has not accepted yet")

// OpError is the error of a CRIU operation: which one, and why. For
// failures inside CRIU, Log holds the last lines of CRIU's log.
type OpError struct {
	// Op is "dump", "restore", "page server", "lazy pages", "feature
	// check", "version" or "rewrite".
	Op string
	// Err is the cause.
	Err error
	// Log is the end of CRIU's log for this operation ("" if none).
	Log string
}

// Error implements error.
func (e *OpError) Error() string {
	s := "criu: " + e.Op + ": " + e.Err.Error()
	if e.Log != "" {
		s += "; CRIU's log ends with:\n" + e.Log
	}
	return s
}

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

// Version is a CRIU release.
type Version struct {
	Major, Minor, Sub int
}

// String formats v as "4.2.1".
func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Sub) }

// Less reports whether v is older than w.
func (v Version) Less(w Version) bool {
	if v.Major != w.Major {
		return v.Major < w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor < w.Minor
	}
	return v.Sub < w.Sub
}

// MinVersion is the oldest CRIU process mode works with on current
// kernels.
var MinVersion = Version{4, 2, 0}

// DefaultPath is where tests/setup-criu.sh installs CRIU; [Options.Path]
// falls back to it when PATH has no criu.
const DefaultPath = "/usr/local/sbin/criu"

// Options say which CRIU to run. The zero value finds criu in PATH, or
// else at DefaultPath.
type Options struct {
	// Path is the criu binary. "" means "criu" from PATH, else
	// DefaultPath.
	Path string
	// LogLevel is CRIU's log verbosity (0-4) for its log files. 0 means
	// 2 (errors and warnings), or 1 (errors) for the lazy-pages daemon:
	// more costs time on the frozen window.
	LogLevel int
}

// path resolves the criu binary.
func (o Options) path() (string, error) {
	if o.Path != "" {
		if _, err := os.Stat(o.Path); err != nil {
			return "", fmt.Errorf("%w: %s: %v: %s", ErrUnavailable, o.Path, err, advice)
		}
		return o.Path, nil
	}
	if p, err := exec.LookPath("criu"); err == nil {
		return p, nil
	}
	if _, err := os.Stat(DefaultPath); err == nil {
		return DefaultPath, nil
	}
	return "", fmt.Errorf("%w: CRIU is not installed (no criu in PATH, none at %s): %s", ErrUnavailable, DefaultPath, advice)
}

func (o Options) logLevel() int32 {
	if o.LogLevel <= 0 {
		return 2
	}
	return int32(min(o.LogLevel, 4))
}

// advice is what to do about a missing or old CRIU.
const advice = "process mode needs CRIU ≥ 4.2; run tests/setup-criu.sh as root (it builds CRIU 4.2.1 from Debian's source package into /usr/local/sbin), or install your distribution's criu if it is 4.2 or newer"

// checkVersion turns a found version into nil or an error that says what
// to do, naming the known failing pairs for this kernel.
func checkVersion(path string, v Version, kernel string) error {
	if !v.Less(MinVersion) {
		return nil
	}
	why := ""
	kv := parseVersion(kernel)
	switch {
	case v.Major < 4 && !kv.Less(Version{6, 13, 0}):
		why = fmt.Sprintf(" (criu %d.x cannot run on Linux ≥ 6.13, and this is %s)", v.Major, kernel)
	case v.Major == 4 && v.Minor == 1 && !kv.Less(Version{6, 16, 0}):
		why = fmt.Sprintf(" (criu 4.1.x cannot dump TCP sockets on Linux ≥ 6.16, and this is %s)", kernel)
	}
	return fmt.Errorf("%w: %s is CRIU %s, too old%s: %s", ErrUnavailable, path, v, why, advice)
}

// parseVersion reads "6.18.3-amd64" or "4.2" leniently: missing or
// non-numeric parts are 0.
func parseVersion(s string) Version {
	s, _, _ = strings.Cut(s, "-")
	s, _, _ = strings.Cut(s, "+")
	var n [3]int
	for i, p := range strings.SplitN(s, ".", 3) {
		n[i], _ = strconv.Atoi(strings.TrimFunc(p, func(r rune) bool { return r < '0' || r > '9' }))
	}
	return Version{n[0], n[1], n[2]}
}

// kernelRelease returns uname -r, read from /proc.
func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// DumpOptions say what to checkpoint and where the images go.
type DumpOptions struct {
	Options
	// PID is the root of the process tree to dump (its threads and
	// children come along). It must not be the caller or an ancestor.
	PID int
	// Dir receives the images, except the memory pages when Pages is
	// set. It must exist. Put it on a tmpfs: nothing in it needs to
	// survive a reboot, and the restore reads it on the frozen window.
	Dir string
	// Pages, if not nil, carries the memory pages to a [ServePages] at
	// the other end while the dump runs (CRIU's page-server protocol).
	// If it has a CloseWrite method (a *net.TCPConn, a *tls.Conn), Dump
	// calls it once everything is sent. nil: pages go into Dir.
	Pages io.ReadWriter
	// LeaveStopped keeps the tree alive and stopped after a successful
	// dump, its TCP sockets in repair mode. false: CRIU kills it.
	LeaveStopped bool
	// ShellJob allows a tree whose session or process group leader is
	// outside it (a process started from a shell). Not needed for a
	// process that is its own session leader.
	ShellJob bool
	// ExtUnixSockets allows unix sockets connected to processes outside
	// the tree (a syslog socket, say); they are reconnected by path.
	ExtUnixSockets bool
	// Lazy makes a post-copy dump: the memory pages that can wait are
	// left out of the images, and the dump returns as soon as the other
	// images are in Dir, with the tree stopped (LeaveStopped is then
	// required). The target can restore from then on
	// (RestoreOptions.Lazy, with a [LazyPages] daemon), while
	// [ServeLazyPages] answers its page requests from the stopped tree's
	// memory. Pages must be nil: CRIU's own lazy page server is not used.
	Lazy bool
	// SkipInFlight dumps a listening socket without the connections
	// waiting in its queue, not accepted yet: they are not restored, and
	// their clients are reset when the dumped tree's listener closes.
	// false: such a socket fails the dump with an error wrapping
	// ErrInFlight, and the tree carries on.
	SkipInFlight bool
}

// DumpResult reports a dump, with CRIU's own figures.
type DumpResult struct {
	// Took is the whole dump call, from the request to CRIU's answer.
	Took time.Duration
	// Freezing is how long CRIU took to freeze the tree; Frozen how long
	// the tree was frozen while CRIU dumped it (CRIU's stats).
	Freezing, Frozen time.Duration
	// MemDump and MemWrite are CRIU's times to collect the memory and to
	// write (or send) it.
	MemDump, MemWrite time.Duration
	// PagesWritten counts the memory pages dumped (4 KiB each).
	PagesWritten uint64
}

// RestoreOptions say which images to restore.
type RestoreOptions struct {
	Options
	// Dir holds the images (with the pages, as ServePages left them).
	Dir string
	// ShellJob and ExtUnixSockets must match the dump's.
	ShellJob, ExtUnixSockets bool
	// Lazy restores a post-copy dump (DumpOptions.Lazy): the missing
	// pages come from the [LazyPages] daemon running on Dir, which must
	// be started first.
	Lazy bool
}

// LazyOptions say where a [LazyPages] daemon works.
type LazyOptions struct {
	// Dir is the checkpoint to restore (its images but the lazy pages).
	// The daemon listens for the restore there.
	Dir string
	// Conn carries CRIU's page-server protocol both ways, to and from
	// [ServeLazyPages] at the other end.
	Conn io.ReadWriter
}

// RestoreResult reports a restore.
type RestoreResult struct {
	// PID is the restored tree's root, as this host's PID namespace
	// sees it. The process is a child of the caller, which must wait
	// for it (os.FindProcess(PID).Wait()) so that it does not stay a
	// zombie when it exits.
	PID int
	// Took is the whole restore call.
	Took time.Duration
}

// LazyStats counts what a [LazyPages] did.
type LazyStats struct {
	// Processes is how many userfaultfds it served (restored processes
	// and their forked children).
	Processes int
	// Pages is how many pages it filled in; Faults how many page faults
	// it answered from the source.
	Pages, Faults int
	// FaultWait is the total time the faults' pages took to arrive,
	// FaultWaitMax the longest.
	FaultWait, FaultWaitMax time.Duration
}

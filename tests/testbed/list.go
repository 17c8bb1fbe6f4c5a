package testbed

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// hostNames are the HOST parts of a bed's namespace names.
var hostNames = []string{HostClient, HostGateway, HostS1, HostS2, HostS3, HostSwitch}

// namespaces returns the names of the named network namespaces present.
func namespaces() ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("testbed: list namespaces: %w", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

// bedPrefix returns the bed prefix of a namespace name PREFIX-HOST.
func bedPrefix(ns string) (string, bool) {
	for _, h := range hostNames {
		if p, ok := strings.CutSuffix(ns, "-"+h); ok && ValidatePrefix(p) == nil {
			return p, true
		}
	}
	return "", false
}

// List returns the prefixes of the beds present on this machine (with at
// least one namespace left), sorted.
func List(ctx context.Context) ([]string, error) {
	names, err := namespaces()
	if err != nil {
		return nil, err
	}
	var prefixes []string
	for _, n := range names {
		if p, ok := bedPrefix(n); ok {
			prefixes = append(prefixes, p)
		}
	}
	slices.Sort(prefixes)
	return slices.Compact(prefixes), nil
}

var testPrefixRE = regexp.MustCompile(`^mtt([0-9]{1,10})x[0-9a-f]{4}$`)

// OwnerPID returns the pid of the process that created a test bed, encoded
// in its prefix mtt<pid>x<hex>. ok is false for other prefixes (beds made
// with an explicit prefix, like the CLI's mtcp-NAME).
func OwnerPID(prefix string) (pid int, ok bool) {
	m := testPrefixRE.FindStringSubmatch(prefix)
	if m == nil {
		return 0, false
	}
	pid, err := strconv.Atoi(m[1])
	if err != nil || pid <= 0 {
		return 0, false
	}
	return pid, true
}

// Orphaned reports whether prefix names a test bed whose creating process
// is gone, the beds [Sweep] deletes.
func Orphaned(prefix string) bool {
	pid, ok := OwnerPID(prefix)
	return ok && !processAlive(pid)
}

func processAlive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid)))
	return err == nil
}

// Sweep deletes the test beds (prefix mtt<pid>x<hex>) whose creating
// process is no longer alive, such as those of a test run killed with
// SIGKILL or by its timeout, and every other namespace named
// mtt<pid>x<hex>-NAME after such a process (tests that need a namespace
// of their own, not a bed, name it so). Beds of live processes and beds
// with other prefixes are left alone. A reused pid keeps a dead run's bed
// until that pid exits too.
func Sweep(ctx context.Context) error {
	names, err := namespaces()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if p, _, ok := strings.Cut(n, "-"); ok && Orphaned(p) {
			errs = append(errs, removeNetNS(ctx, n))
		}
	}
	return errors.Join(errs...)
}

// Leftovers returns what remains of the bed prefix: its namespaces still
// present ("netns NAME") and the processes inside them ("pid N (COMM) in
// netns NAME"). It is empty after a successful [Bed.Down].
func Leftovers(ctx context.Context, prefix string) ([]string, error) {
	var left []string
	for _, h := range Describe(prefix).Hosts() {
		if h.Exists() {
			left = append(left, "netns "+h.NetNS)
		}
	}
	procs, err := Running(ctx, prefix)
	return append(left, procs...), err
}

// Running returns the processes inside the bed prefix's namespaces ("pid
// N (COMM) in netns NAME").
func Running(ctx context.Context, prefix string) ([]string, error) {
	var left []string
	var errs []error
	for _, h := range Describe(prefix).Hosts() {
		if !h.Exists() {
			continue
		}
		pids, err := netnsPIDs(ctx, h.NetNS)
		if err != nil {
			errs = append(errs, err)
		}
		for _, pid := range pids {
			left = append(left, fmt.Sprintf("pid %d (%s) in netns %s", pid, comm(pid), h.NetNS))
		}
	}
	return left, errors.Join(errs...)
}

func comm(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// netnsPIDs returns the processes whose network namespace is ns.
func netnsPIDs(ctx context.Context, ns string) ([]int, error) {
	out, err := run(ctx, nil, "ip", "netns", "pids", ns)
	if err != nil {
		if !namespaceExists(ns) {
			return nil, nil
		}
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("ip netns pids %s: unexpected output %q", ns, out)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

func namespaceExists(ns string) bool {
	_, err := os.Stat(filepath.Join(netnsDir, ns))
	return err == nil
}

// removeNetNS kills the processes inside ns, waits for them to be gone and
// deletes ns. An absent namespace is not an error.
func removeNetNS(ctx context.Context, ns string) error {
	if !namespaceExists(ns) {
		return nil
	}
	self := os.Getpid()
	err := poll(ctx, 30*time.Second, "the processes in netns "+ns+" to exit", func(ctx context.Context) (bool, string, error) {
		pids, err := netnsPIDs(ctx, ns)
		if err != nil {
			return false, "", err
		}
		if len(pids) == 0 {
			return true, "", nil
		}
		var alive []string
		for _, pid := range pids {
			if pid == self {
				return false, "", fmt.Errorf("this process (pid %d) runs in netns %s: refusing to kill itself", pid, ns)
			}
			if p, err := os.FindProcess(pid); err == nil {
				p.Kill() // may already be gone: ip netns pids is a snapshot
				p.Release()
			}
			alive = append(alive, fmt.Sprintf("%d (%s)", pid, comm(pid)))
		}
		return false, "still running: " + strings.Join(alive, ", "), nil
	})
	if err != nil {
		return fmt.Errorf("netns %s: %w", ns, err)
	}
	if _, err := run(ctx, nil, "ip", "netns", "del", ns); err != nil && namespaceExists(ns) {
		return err
	}
	return nil
}

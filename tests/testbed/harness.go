package testbed

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// HarnessEnv is the environment variable that selects where [ForTest]
// builds its bed: [HarnessNetns] (the default, also when it is empty) or
// [HarnessVagrant].
const HarnessEnv = "MTCP_HARNESS"

// The harnesses [ForTest] can give a test.
const (
	// HarnessNetns is the network-namespace testbed on this machine.
	HarnessNetns = "netns"
	// HarnessVagrant is the five VMs of the repository's Vagrantfile; the
	// test binary runs inside the client VM.
	HarnessVagrant = "vagrant"
)

// Harness returns the harness [HarnessEnv] selects, or an error naming the
// valid values.
func Harness() (string, error) {
	switch v := os.Getenv(HarnessEnv); v {
	case "", HarnessNetns:
		return HarnessNetns, nil
	case HarnessVagrant:
		return HarnessVagrant, nil
	default:
		return "", fmt.Errorf("testbed: %s=%q: use %q (network namespaces on this machine, the default) or %q (the Vagrantfile's VMs, from inside the client VM)", HarnessEnv, v, HarnessNetns, HarnessVagrant)
	}
}

// ForTest gives the test a fresh bed of the harness [HarnessEnv] selects
// and takes it down when the test and its other cleanups are done.
//
// With the netns harness it skips the test (with the reason) unless the
// process is root and ip, nft, sysctl and nsenter are installed. It first
// calls [Sweep], so beds of earlier test runs that were killed do not
// accumulate. The bed's prefix is a fresh test prefix mtt<pid>x<hex>. The
// cleanup calls [Bed.Down] and fails the test if [Leftovers] reports
// anything (a namespace or a process still in one). Tests may call
// ForTest several times for several beds.
//
// With the vagrant harness it returns [Vagrant]'s bed: the VMs, reset to
// their provisioned state. There is one set of VMs, so a test asking for
// a second bed while it holds one fails. The cleanup resets the VMs again
// and fails the test if a process the test started or an nftables table
// survived the reset.
func ForTest(t testing.TB) *Bed {
	t.Helper()
	harness, err := Harness()
	if err != nil {
		t.Fatal(err)
	}
	if harness == HarnessVagrant {
		return forTestVagrant(t)
	}
	if reason := SkipReason(); reason != "" {
		t.Skip(reason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := Sweep(ctx); err != nil {
		// Another run's debris must not fail this test; say so and go on.
		t.Logf("testbed: sweeping beds of dead test processes: %v", err)
	}
	b, err := Up(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// t.Context is already canceled when cleanups run.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// The test's own cleanups, which stop what it started, ran
		// first: a process still in the bed was left behind (a
		// restored copy, say), which Down would kill unseen.
		var running []string
		for end := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			var err error
			if running, err = Running(ctx, b.Prefix); err != nil {
				t.Errorf("testbed: listing what runs in %s: %v", b.Prefix, err)
			}
			if len(running) == 0 || time.Now().After(end) {
				break
			}
		}
		if len(running) > 0 {
			t.Errorf("testbed: still running in bed %s once the test's cleanups ran: %s", b.Prefix, strings.Join(running, "; "))
		}
		if err := b.Down(ctx); err != nil {
			t.Error(err)
		}
		left, err := Leftovers(ctx, b.Prefix)
		if err != nil {
			t.Errorf("testbed: checking what %s left: %v", b.Prefix, err)
		}
		if len(left) > 0 {
			t.Errorf("testbed: bed %s left behind: %s", b.Prefix, strings.Join(left, "; "))
		}
	})
	return b
}

// RequireNetns skips the test unless the selected harness is the netns
// one: for tests that run code inside a server's network namespace in the
// test process (nat/netns.Do on [Host.NetNSPath]), which only works when
// the servers are namespaces of this machine, and for tests of the
// namespace testbed itself.
func RequireNetns(t testing.TB) {
	t.Helper()
	harness, err := Harness()
	if err != nil {
		t.Fatal(err)
	}
	if harness != HarnessNetns {
		t.Skipf("testbed: this test needs the netns harness (%s=%s): it enters the hosts' network namespaces from the test process", HarnessEnv, harness)
	}
}

// Remote reports whether the host is a separate machine (a VM of the
// vagrant harness other than the client, where the test binary runs).
// Code in the test process cannot enter a remote host's network: its
// [Host.NetNSPath] names no file here.
func (h *Host) Remote() bool { return h.vm != nil && !h.vm.local }

// WriteFile writes data to the file path on the host (creating its
// directory), replacing it atomically, with permissions perm.
func (h *Host) WriteFile(ctx context.Context, path string, data []byte, perm os.FileMode) error {
	if h.vm == nil {
		if err := os.MkdirAll(dirOf(path), 0o700); err != nil {
			return fmt.Errorf("testbed: %s: %w", h.Name, err)
		}
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, data, perm); err != nil {
			return fmt.Errorf("testbed: %s: %w", h.Name, err)
		}
		if err := os.Chmod(tmp, perm); err != nil {
			return fmt.Errorf("testbed: %s: %w", h.Name, err)
		}
		if err := os.Rename(tmp, path); err != nil {
			return fmt.Errorf("testbed: %s: %w", h.Name, err)
		}
		return nil
	}
	script := fmt.Sprintf("mkdir -p %s && cat >%s.tmp && chmod %o %s.tmp && mv -f %s.tmp %s",
		shq(dirOf(path)), shq(path), perm.Perm(), shq(path), shq(path), shq(path))
	_, err := h.vm.sh(ctx, data, script)
	return err
}

func dirOf(path string) string {
	if i := strings.LastIndexByte(path, '/'); i > 0 {
		return path[:i]
	}
	return "/"
}

// CommandEnv is [Host.Command] with environment variables (KEY=VALUE)
// added to the process's environment. Use it rather than setting the
// returned command's Env: on a remote host that would only change the
// local ssh client's environment.
func (h *Host) CommandEnv(ctx context.Context, env []string, name string, args ...string) *exec.Cmd {
	if h.vm == nil {
		cmd := h.Command(ctx, name, args...)
		cmd.Env = append(os.Environ(), env...)
		return cmd
	}
	return h.vm.command(ctx, env, name, args)
}

// Signal sends sig to the process cmd runs, a command made by
// [Host.Command] or [Host.CommandEnv] and started. For a host of the
// netns harness that is cmd.Process.Signal; on a remote host it signals
// the remote process, not the local ssh client that carries its output.
func Signal(cmd *exec.Cmd, sig os.Signal) error {
	if p := lookupProc(cmd); p != nil {
		return p.signal(sig)
	}
	if cmd.Process == nil {
		return errors.New("testbed: signal: the command has not been started")
	}
	return cmd.Process.Signal(sig)
}

// PID returns the process id, on its host, of the process cmd runs (see
// [Signal]). On a remote host it waits up to ten seconds for the process
// to have started.
func PID(ctx context.Context, cmd *exec.Cmd) (int, error) {
	if p := lookupProc(cmd); p != nil {
		return p.pid(ctx)
	}
	if cmd.Process == nil {
		return 0, errors.New("testbed: pid: the command has not been started")
	}
	return cmd.Process.Pid, nil
}

// ForwardUnix makes a unix socket of the host usable from this process and
// returns the local path to dial: for a host of this machine, path itself;
// for a remote host, a local socket that ssh forwards to path (which need
// not exist yet: each connection is forwarded when it is made). stop ends
// the forwarding.
func (h *Host) ForwardUnix(ctx context.Context, path string) (local string, stop func(), err error) {
	if !h.Remote() {
		return path, func() {}, nil
	}
	return h.vm.forwardUnix(ctx, path)
}

// vagrantInUse is set while a test holds the VMs.
var (
	vagrantMu    sync.Mutex
	vagrantInUse bool
)

func forTestVagrant(t testing.TB) *Bed {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testbed: the vagrant harness runs as root inside the client VM (sudo)")
	}
	vagrantMu.Lock()
	if vagrantInUse {
		vagrantMu.Unlock()
		t.Fatal("testbed: the vagrant harness has one set of VMs, and this test already holds them; it cannot have a second bed")
	}
	vagrantInUse = true
	vagrantMu.Unlock()
	release := func() {
		vagrantMu.Lock()
		vagrantInUse = false
		vagrantMu.Unlock()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b, err := Vagrant(ctx)
	if err != nil {
		release()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		defer release()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := b.Down(ctx); err != nil {
			t.Error(err)
		}
	})
	return b
}

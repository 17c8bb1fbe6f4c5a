package testbed

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The vagrant harness's host operations, run for real against a stand-in
// "VM": a network namespace of this machine with veths carrying s1's MACs,
// reached with `ip netns exec` (which also mounts the namespace's /sys,
// as a VM has its own) instead of ssh. Everything but the ssh transport is
// the code the harness runs on the VMs: the network script, the reset
// (kill marked processes, flush nftables, re-apply the network), Run, Nft,
// WriteFile, Command with its pid file and marker, Signal, PID, cancel.

func TestShellQuoting(t *testing.T) {
	args := []string{"plain", "two words", "it's", `"dq"`, "$HOME", "`id`", "a\nb", "", "*", "x=1;y"}
	out, err := exec.Command("sh", "-c", shJoin("printf", append([]string{`%s\0`}, args...))).Output()
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	if !slices.Equal(got, args) {
		t.Fatalf("through sh: %q, want %q", got, args)
	}
}

// standInVM makes a namespace wired like VM s1 (its NICs' MACs, under
// other names) and a Host of the vagrant harness that reaches it.
func standInVM(t *testing.T) (*Host, string) {
	t.Helper()
	if reason := SkipReason(); reason != "" {
		t.Skip(reason)
	}
	if _, err := exec.LookPath("ethtool"); err != nil {
		t.Skip("needs ethtool")
	}
	ctx := context.Background()
	prefix := fmt.Sprintf("mtt%dx%04x", os.Getpid(), rand.N(0x10000))
	ns := prefix + "-s1"
	if _, err := run(ctx, nil, "ip", "netns", "add", ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := removeNetNS(context.Background(), ns); err != nil {
			t.Error(err)
		}
	})
	for i, n := range VMNICs() {
		if n.Host != "s1" {
			continue
		}
		a, b := fmt.Sprintf("nic%d", i), fmt.Sprintf("peer%d", i)
		if _, err := run(ctx, nil, "ip", "-n", ns, "link", "add", a, "address", n.MAC, "type", "veth", "peer", "name", b); err != nil {
			t.Fatal(err)
		}
		if _, err := run(ctx, nil, "ip", "-n", ns, "link", "set", b, "up"); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	script, err := VMNetScript("s1")
	if err != nil {
		t.Fatal(err)
	}
	netScript := filepath.Join(dir, "net.sh")
	if err := os.WriteFile(netScript, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := &vmConfig{runDir: filepath.Join(dir, "run"), netScript: netScript, wrap: []string{"ip", "netns", "exec", ns}}
	h := Describe(prefix).S1
	h.vm = &vmHost{name: "s1", local: true, prefix: prefix, cfg: cfg}
	return h, ns
}

// marked returns the pids of this machine's processes marked with
// prefix.
func markedPIDs(t *testing.T, prefix string) []int {
	t.Helper()
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err == nil && slices.Contains(strings.Split(string(env), "\x00"), vmMarker+"="+prefix) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestVMOperations(t *testing.T) {
	h, ns := standInVM(t)
	v := h.vm
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if h.Remote() || h.NetNSPath() != fmt.Sprintf("/proc/%d/ns/net", os.Getpid()) {
		// A local VM is the client's case: enterable, not remote.
		t.Fatalf("local stand-in: Remote %v, NetNSPath %s", h.Remote(), h.NetNSPath())
	}

	// The attach reset applies the network script: NICs found by MAC
	// and renamed, the plan's addresses, routes and sysctls.
	if err := v.reset(ctx, true); err != nil {
		t.Fatal(err)
	}
	out, err := run(ctx, nil, "ip", "-n", ns, "-j", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	var links []ipLink
	if err := json.Unmarshal(out, &links); err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, l := range links {
		for _, a := range l.AddrInfo {
			if a.Scope == "global" {
				got[l.IfName] = append(got[l.IfName], fmt.Sprintf("%s/%d", a.Local, a.PrefixLen))
			}
		}
	}
	want := map[string][]string{
		"lan0":  {"10.77.2.11/24", "fd77:2::11/64"},
		"ctl0":  {"10.77.3.11/24", "fd77:3::11/64"},
		"mgmt0": {"10.77.9.11/24"},
	}
	for ifc, w := range want {
		g := got[ifc]
		slices.Sort(g)
		if !slices.Equal(g, w) {
			t.Errorf("%s: addresses %v, want %v (all: %v)", ifc, g, w, got)
		}
	}
	if r, err := h.Run(ctx, "ip", "route", "get", "10.77.1.2"); err != nil || !strings.Contains(string(r), "via 10.77.2.1 dev lan0") {
		t.Errorf("route to the client net: %q, %v", r, err)
	}
	if r, err := h.Run(ctx, "sysctl", "-n", "net.ipv4.conf.lan0.send_redirects", "net.ipv4.ip_forward"); err != nil || strings.Fields(string(r))[0] != "0" || strings.Fields(string(r))[1] != "1" {
		t.Errorf("sysctls: %q, %v", r, err)
	}
	if r, err := h.Run(ctx, "ethtool", "-k", "lan0"); err != nil || !strings.Contains(string(r), "tx-checksumming: off") {
		t.Errorf("checksum offload on lan0: %q, %v", r, err)
	}
	// Idempotent: a second run (the tests' reset) changes nothing.
	if err := v.reset(ctx, true); err != nil {
		t.Fatalf("second reset: %v", err)
	}

	// Run quotes its arguments; errors carry the output.
	if r, err := h.Run(ctx, "printf", "%s|", "a b", "it's"); err != nil || string(r) != "a b|it's|" {
		t.Errorf("Run: %q, %v", r, err)
	}
	if _, err := h.Run(ctx, "sh", "-c", "echo oops >&2; exit 3"); err == nil || !strings.Contains(err.Error(), "oops") {
		t.Errorf("failing Run: %v", err)
	}
	// Nft loads a script; WriteFile writes a file.
	if err := h.Nft(ctx, "table inet mtcpvmtest {\n chain c {\n  type filter hook input priority 0\n }\n}\n"); err != nil {
		t.Fatal(err)
	}
	if r, _ := h.Run(ctx, "nft", "list", "tables"); !strings.Contains(string(r), "mtcpvmtest") {
		t.Errorf("nft tables: %q", r)
	}
	file := filepath.Join(v.cfg.runDir, v.prefix, "x", "f")
	if err := h.WriteFile(ctx, file, []byte("data\n'q'"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data\n'q'" {
		t.Errorf("WriteFile: %q, %v", b, err)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("WriteFile mode: %v, %v", fi, err)
	}

	// Command: environment, pid, signal.
	cmd := h.CommandEnv(ctx, []string{"FOO=bar baz"}, "sh", "-c", `echo "$FOO"; exec sleep 1000`)
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "bar baz\n" {
		t.Fatalf("the process's output: %q, %v", line, err)
	}
	pid, err := PID(ctx, cmd)
	if err != nil {
		t.Fatal(err)
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "sleep" {
		t.Errorf("pid %d is %q, want sleep", pid, comm)
	}
	if !slices.Contains(markedPIDs(t, v.prefix), pid) {
		t.Errorf("pid %d is not marked", pid)
	}
	if err := Signal(cmd, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var ee *exec.ExitError
	if err := cmd.Wait(); !errors.As(err, &ee) {
		t.Errorf("after SIGTERM, Wait: %v", err)
	}

	// Canceling the context kills the process on the VM, not only the
	// local end.
	cctx, ccancel := context.WithCancel(ctx)
	cmd = h.Command(cctx, "sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if pid, err = PID(ctx, cmd); err != nil {
		t.Fatal(err)
	}
	ccancel()
	cmd.Wait()
	waitGone(t, pid)

	// The reset at Down kills what is left (children too) and leaves no
	// table; it fails if something survives.
	cmd = h.Command(ctx, "sh", "-c", "sleep 1000 & sleep 1000; wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	eventuallyT(t, func() bool { return len(markedPIDs(t, v.prefix)) == 3 })
	if err := v.reset(ctx, false); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if left := markedPIDs(t, v.prefix); len(left) > 0 {
		t.Errorf("marked processes after the reset: %v", left)
	}
	if r, _ := h.Run(ctx, "nft", "list", "tables"); len(strings.TrimSpace(string(r))) > 0 {
		t.Errorf("tables after the reset: %q", r)
	}
	if _, err := os.Stat(filepath.Join(v.cfg.runDir, v.prefix)); !os.IsNotExist(err) {
		t.Errorf("the bed's directory survived the reset: %v", err)
	}
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	eventuallyT(t, func() bool {
		_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
		return err != nil
	})
}

func eventuallyT(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestHarnessSwitch(t *testing.T) {
	for _, tc := range []struct{ env, want string }{{"", HarnessNetns}, {"netns", HarnessNetns}, {"vagrant", HarnessVagrant}, {"vm", ""}} {
		t.Setenv(HarnessEnv, tc.env)
		got, err := Harness()
		if got != tc.want || (err != nil) != (tc.want == "") {
			t.Errorf("%s=%q: %q, %v", HarnessEnv, tc.env, got, err)
		}
	}
	// Vagrant without its key fails with a message that says what to do.
	t.Setenv(VagrantKeyEnv, filepath.Join(t.TempDir(), "none"))
	if _, err := Vagrant(context.Background()); err == nil || !strings.Contains(err.Error(), "vagrant up") {
		t.Errorf("Vagrant without a key: %v", err)
	}
}

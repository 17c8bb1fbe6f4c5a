package testbed

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The vagrant harness: the hosts are the VMs of the repository's
// Vagrantfile, wired with the same plan as a namespace bed (same networks,
// same addresses), plus a management network that carries the tests' own
// traffic (ssh) from the client VM, where the test binary runs, to the
// others. Each VM is provisioned by `tests/setup.sh --node NAME`, which
// installs the network script [VMNetScript] writes as /etc/mtcp/net.sh.

// MgmtNet4 is the vagrant harness's management network: the client VM
// reaches the other VMs' root accounts over ssh at MgmtAddr. It is not part
// of the namespace testbed, and no test traffic crosses it.
var MgmtNet4 = netip.MustParsePrefix("10.77.9.0/24")

// VM-side paths and settings of the vagrant harness.
const (
	// VMRunDir holds, on every VM, one directory per bed (its prefix)
	// for the files tests put there; [Bed.Down] removes it.
	VMRunDir = "/run/mtcp-testbed"
	// VMNetScriptPath is where provisioning installs [VMNetScript]; the
	// harness runs it to restore a VM's addresses, routes and sysctls.
	VMNetScriptPath = "/etc/mtcp/net.sh"
	// VagrantKeyEnv names the private key that reaches the VMs as root;
	// default DefaultVagrantKey (installed by provisioning).
	VagrantKeyEnv = "MTCP_VAGRANT_KEY"
	// DefaultVagrantKey is the client VM's key for the other VMs.
	DefaultVagrantKey = "/root/.ssh/mtcp_testbed"
	// vmMarker marks, in their environment, the processes the harness
	// starts on a VM, so that a reset finds and kills them (and their
	// children) even after the test process died.
	vmMarker = "MTCP_TESTBED"
)

// vmHost is one host of the vagrant harness.
type vmHost struct {
	name   string
	mgmt   netip.Addr // management address (remote hosts)
	local  bool       // the client VM: the machine the test runs on
	absent bool       // the switch, which VMs do not have
	key    string     // ssh private key
	prefix string     // the bed's prefix, the value of vmMarker
	cfg    *vmConfig
}

// vmConfig holds what tests of this package change to run a "VM" in a
// namespace of this machine.
type vmConfig struct {
	runDir    string   // VMRunDir
	netScript string   // VMNetScriptPath
	wrap      []string // argv before "sh -c SCRIPT" for the local host
	systemd   bool     // stop and restart the provisioned mtcpd
}

var defaultVMConfig = vmConfig{runDir: VMRunDir, netScript: VMNetScriptPath, systemd: true}

// MgmtAddr returns the host's address on [MgmtNet4] in the vagrant
// harness (the zero Addr for the switch, which that harness lacks).
func MgmtAddr(h *Host) netip.Addr {
	a := h.LAN4
	if h.Name == HostSwitch || !a.IsValid() {
		return netip.Addr{}
	}
	b := MgmtNet4.Addr().As4()
	b[3] = a.As4()[3] // client .2, gateway .1, s1 .11, s2 .12, s3 .13
	return netip.AddrFrom4(b)
}

// Vagrant returns the bed of the vagrant harness: the VMs of the
// Vagrantfile, reached from the client VM (this machine) over ssh with
// the key [VagrantKeyEnv] names. It resets every VM first: kills the
// processes earlier beds started, stops the provisioned mtcpd (restarted
// by [Bed.Down]), flushes the nftables ruleset, removes [VMRunDir] and
// re-applies [VMNetScriptPath], which restores the plan's addresses,
// routes and sysctls. The bed's Prefix is fresh, vgt<pid>x<hex>, and its
// hosts have no NetNS.
func Vagrant(ctx context.Context) (*Bed, error) {
	key := os.Getenv(VagrantKeyEnv)
	if key == "" {
		key = DefaultVagrantKey
	}
	if _, err := os.Stat(key); err != nil {
		return nil, fmt.Errorf("testbed: the vagrant harness reaches the VMs with the ssh key %s, which `tests/setup.sh --node client` installs in the client VM: run the tests inside the client VM (vagrant ssh client) after `vagrant up`, or name another key with %s: %w", key, VagrantKeyEnv, err)
	}
	if _, err := exec.LookPath("ssh"); err != nil {
		return nil, fmt.Errorf("testbed: the vagrant harness needs ssh (openssh-client): %w", err)
	}
	return attachVMs(ctx, fmt.Sprintf("vgt%dx%04x", os.Getpid(), rand.N(0x10000)), key, &defaultVMConfig)
}

// attachVMs describes the bed of VMs and resets them.
func attachVMs(ctx context.Context, prefix, key string, cfg *vmConfig) (*Bed, error) {
	b := Describe(prefix)
	for _, h := range b.Hosts() {
		h.NetNS = ""
		h.vm = &vmHost{name: h.Name, mgmt: MgmtAddr(h), local: h == b.Client, absent: h == b.Switch, key: key, prefix: prefix, cfg: cfg}
	}
	if err := b.eachVM(func(h *Host) error { return h.vm.reset(ctx, true) }); err != nil {
		return nil, fmt.Errorf("testbed: vagrant: resetting the VMs: %w", err)
	}
	return b, nil
}

// eachVM runs fn for every VM of the bed at once.
func (b *Bed) eachVM(fn func(h *Host) error) error {
	var wg sync.WaitGroup
	errs := make([]error, len(b.Hosts()))
	for i, h := range b.Hosts() {
		if h.vm == nil || h.vm.absent {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(h); err != nil {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// downVMs is Down for the vagrant harness.
func (b *Bed) downVMs(ctx context.Context) error {
	if err := b.eachVM(func(h *Host) error { return h.vm.reset(ctx, false) }); err != nil {
		return fmt.Errorf("testbed: down %s: %w", b.Prefix, err)
	}
	return nil
}

// killMarked is a shell fragment that kills the processes whose
// environment holds vmMarker=PATTERN (a grep pattern) until none is left.
// It prints nothing and fails if some survive SIGKILL for 10 s.
func killMarked(pattern string) string {
	return `marked() {
	for e in /proc/[0-9]*/environ; do
		p=${e#/proc/}; p=${p%/environ}
		if tr '\0' '\n' 2>/dev/null <"$e" | grep -q '^` + vmMarker + `=` + pattern + `$'; then echo "$p"; fi
	done
}
i=0
while pids=$(marked) && [ -n "$pids" ]; do
	kill -9 $pids 2>/dev/null
	i=$((i+1))
	if [ $i -gt 100 ]; then echo "processes survive SIGKILL: $pids" >&2; exit 1; fi
	sleep 0.1
done
`
}

// reset brings a VM back to its provisioned state; see [Vagrant] (attach)
// and [Bed.Down] (not attach).
func (v *vmHost) reset(ctx context.Context, attach bool) error {
	var s strings.Builder
	s.WriteString("set -u\n")
	if attach && v.cfg.systemd {
		// The tests start their own daemons, with their own
		// configuration, on the same ports and sockets.
		s.WriteString("if systemctl is-active -q mtcpd.service; then systemctl stop mtcpd.service; fi\n")
	}
	pattern := regexp.QuoteMeta(v.prefix)
	if attach {
		pattern = ".*" // earlier runs' leftovers too
	}
	s.WriteString(killMarked(pattern))
	s.WriteString("nft flush ruleset || exit 1\n")
	dir := v.cfg.runDir
	if !attach {
		dir = filepath.Join(dir, v.prefix)
	}
	fmt.Fprintf(&s, "rm -rf %s\n", shq(dir))
	fmt.Fprintf(&s, "if [ ! -f %[1]s ]; then echo %[2]s >&2; exit 1; fi\nsh %[1]s >/dev/null || exit 1\n",
		shq(v.cfg.netScript), shq("testbed: "+v.cfg.netScript+" is missing: provision this VM first (vagrant provision "+v.name+")"))
	if !attach {
		// What the reset must have removed.
		s.WriteString(`left=$(marked)
if [ -n "$left" ]; then echo "processes left: $left" >&2; exit 1; fi
tables=$(nft list tables)
if [ -n "$tables" ]; then echo "nftables tables left: $tables" >&2; exit 1; fi
`)
		if v.cfg.systemd {
			s.WriteString("if systemctl is-enabled -q mtcpd.service 2>/dev/null; then systemctl start mtcpd.service; fi\n")
		}
	}
	_, err := v.sh(ctx, []byte(s.String()), "sh -s")
	return err
}

// sshArgs are the options of every ssh to the VM. Host keys are not
// checked: the management network is private to the VMs, which are made
// afresh by `vagrant up` (new host keys each time).
func (v *vmHost) sshArgs(extra ...string) []string {
	a := []string{"-i", v.key,
		"-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
		"-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6"}
	a = append(a, extra...)
	return append(a, "root@"+v.mgmt.String())
}

// argv returns the command line that runs the shell script on the VM.
func (v *vmHost) argv(script string) ([]string, error) {
	switch {
	case v.absent:
		return nil, fmt.Errorf("testbed: %s: the vagrant harness has no switch host (the VMs share the provider's private networks)", v.name)
	case v.local:
		return append(append([]string(nil), v.cfg.wrap...), "sh", "-c", script), nil
	}
	return append(append([]string{"ssh"}, v.sshArgs()...), "--", script), nil
}

func (v *vmHost) where() string {
	if v.local {
		return v.name + " (this VM)"
	}
	return v.name + " (VM, ssh root@" + v.mgmt.String() + ")"
}

// sh runs a shell script on the VM and returns its standard output; the
// error names the host and the script and carries the combined output.
func (v *vmHost) sh(ctx context.Context, stdin []byte, script string) ([]byte, error) {
	argv, err := v.argv(script)
	if err != nil {
		return nil, err
	}
	shown := script
	if len(shown) > 200 {
		shown = shown[:200] + "..."
	}
	out, err := runAs(ctx, stdin, "sh -c "+shq(shown), argv[0], argv[1:]...)
	if err != nil {
		return out, fmt.Errorf("testbed: %s: %w", v.where(), err)
	}
	return out, nil
}

// vmProc is a process started on a VM by [Host.Command].
type vmProc struct {
	vm      *vmHost
	pidfile string
}

var (
	procSeq atomic.Uint64
	procsMu sync.Mutex
	procs   = map[*exec.Cmd]*vmProc{}
)

func lookupProc(cmd *exec.Cmd) *vmProc {
	procsMu.Lock()
	defer procsMu.Unlock()
	return procs[cmd]
}

// command returns a command that runs name on the VM, marked with
// vmMarker, its pid written to a file of the bed's directory.
func (v *vmHost) command(ctx context.Context, env []string, name string, args []string) *exec.Cmd {
	dir := filepath.Join(v.cfg.runDir, v.prefix, "procs")
	p := &vmProc{vm: v, pidfile: filepath.Join(dir, strconv.FormatUint(procSeq.Add(1), 10)+".pid")}
	inner := `echo $$ >` + shq(p.pidfile) + ` && exec "$@"`
	script := "mkdir -p " + shq(dir) + " && exec sh -c " + shq(inner) + " sh env " + shq(vmMarker+"="+v.prefix) + " " +
		shJoin("", env) + shJoin(name, args)
	argv, err := v.argv(script)
	if err != nil {
		cmd := exec.CommandContext(ctx, "false")
		cmd.Err = err
		return cmd
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Cancel = func() error {
		// The remote process outlives its ssh client: kill it first.
		kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.signalCtx(kctx, syscall.SIGKILL)
		return cmd.Process.Kill()
	}
	procsMu.Lock()
	procs[cmd] = p
	procsMu.Unlock()
	return cmd
}

// waitPID is a shell fragment that waits up to 10 s for the pid file.
func (p *vmProc) waitPID() string {
	return fmt.Sprintf(`i=0; while [ ! -s %[1]s ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; `+
		`if [ ! -s %[1]s ]; then echo "the process has not started (no pid file %[1]s)" >&2; exit 1; fi; `, shq(p.pidfile))
}

func (p *vmProc) signal(sig os.Signal) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return p.signalCtx(ctx, sig)
}

func (p *vmProc) signalCtx(ctx context.Context, sig os.Signal) error {
	s, ok := sig.(syscall.Signal)
	if !ok {
		return fmt.Errorf("testbed: signal %v: not a syscall.Signal", sig)
	}
	_, err := p.vm.sh(ctx, nil, p.waitPID()+fmt.Sprintf(`exec kill -%d "$(cat %s)"`, int(s), shq(p.pidfile)))
	return err
}

func (p *vmProc) pid(ctx context.Context) (int, error) {
	out, err := p.vm.sh(ctx, nil, p.waitPID()+"exec cat "+shq(p.pidfile))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		return 0, fmt.Errorf("testbed: %s: pid file %s: %q", p.vm.where(), p.pidfile, out)
	}
	return pid, nil
}

// forwardUnix starts an ssh client forwarding a local unix socket to path
// on the VM.
func (v *vmHost) forwardUnix(ctx context.Context, path string) (string, func(), error) {
	dir, err := os.MkdirTemp("", "mtcp-fwd-")
	if err != nil {
		return "", nil, fmt.Errorf("testbed: %s: %w", v.name, err)
	}
	local := filepath.Join(dir, "s.sock")
	cmd := exec.Command("ssh", v.sshArgs("-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes", "-L", local+":"+path)...)
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("testbed: %s: forwarding %s: %w", v.where(), path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() {
		cmd.Process.Kill()
		<-exited
		os.RemoveAll(dir)
	}
	err = poll(ctx, 30*time.Second, "ssh to forward "+local+" to "+v.name+":"+path, func(context.Context) (bool, string, error) {
		select {
		case err := <-exited:
			exited <- err
			return false, "", fmt.Errorf("ssh exited: %v: %s", err, strings.TrimSpace(out.b.String()))
		default:
		}
		_, err := os.Stat(local)
		return err == nil, "no local socket yet", nil
	})
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("testbed: %s: %w", v.where(), err)
	}
	return local, stop, nil
}

var shSafe = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// shq quotes s for a POSIX shell.
func shq(s string) string {
	if shSafe.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// shJoin quotes name and args into one shell command line ("" name: only
// the args, each followed by a space).
func shJoin(name string, args []string) string {
	var b strings.Builder
	if name != "" {
		b.WriteString(shq(name))
	}
	for _, a := range args {
		if name != "" {
			b.WriteByte(' ')
		}
		b.WriteString(shq(a))
		if name == "" {
			b.WriteByte(' ')
		}
	}
	return b.String()
}

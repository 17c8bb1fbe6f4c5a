package pool

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/nat/netns"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// TB is what the pool needs of a test (testing.TB satisfies it); the demo
// provides its own.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Logf(format string, args ...any)
	Cleanup(func())
	TempDir() string
}

// The binaries under test, built once per process.
var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// Binaries builds mtcpd, mtcpctl, mtcp-kv and mtcp-bulk once per process
// and returns the directory holding them.
func Binaries(t TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "mtcp-bin-")
		if buildErr != nil {
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Dir(filepath.Dir(filepath.Dir(file)))
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/mtcpd", "./cmd/mtcpctl", "./cmd/mtcp-kv", "./cmd/mtcp-bulk")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("%v", buildErr)
	}
	return binDir
}

// Pool is a running pool on a testbed: mtcpd on s1, s2, s3 (and the
// gateway with gateway steering) and an application on each server.
//
// It runs on either harness of tests/testbed ([testbed.ForTest]): on the
// VMs of the vagrant harness the binaries are copied to each VM, each
// host's files live in its own VM, and admin clients reach each daemon's
// socket through an ssh-forwarded unix socket.
type Pool struct {
	t     TB
	Bed   *testbed.Bed
	dir   string
	procs map[string]*exec.Cmd
	ended map[string]chan struct{} // closed once the named process has exited
	// mayEnd are the processes that may exit before their cleanup: the
	// test signalled them, or had them exit.
	mayEnd sync.Map // *exec.Cmd → true
	ca     *peer.CA
	opts   Options

	fwdMu sync.Mutex
	fwd   map[*testbed.Host]string // local paths of remote admin sockets
}

// Options shape a pool; zero values give the defaults.
type Options struct {
	// Steering is "forward" (default) or "gateway".
	Steering string
	// App is the application every server runs: "mtcp-kv" (default) or
	// "mtcp-bulk".
	App string
	// AppArgs are extra arguments for every server's application.
	AppArgs []string
	// Port is the application's port; default 7000.
	Port uint16
	// Env adds environment variables to the named process ("mtcpd-s2",
	// "app-s1", ...), for fault injection.
	Env map[string][]string
	// Quiet keeps the processes' output out of the test log.
	Quiet bool
	// FailOn fails the test if a process prints a line containing one
	// of these (quiet or not), as for a panic.
	FailOn []string
	// Policy, when set, is the policy file every server's mtcpd runs,
	// with load scope netns and a metrics endpoint (policy.go).
	Policy string
	// ProcessPages is the daemons' process_pages ("" means their
	// default, lazy).
	ProcessPages string
	// FlowIdle is the daemons' flow_idle (0 means their default).
	FlowIdle time.Duration
}

const peerPort = 7700

// RemoveBinaries deletes what Binaries built; call it when the process is
// done with every pool (TestMain).
func RemoveBinaries() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}

// Start brings up the pool on bed; everything stops at the test's cleanup.
func Start(t TB, bed *testbed.Bed, o Options) *Pool {
	t.Helper()
	if o.Steering == "" {
		o.Steering = "forward"
	}
	if o.App == "" {
		o.App = "mtcp-kv"
	}
	if o.Port == 0 {
		o.Port = 7000
	}
	Binaries(t)
	p := &Pool{t: t, Bed: bed, dir: t.TempDir(), procs: map[string]*exec.Cmd{}, ended: map[string]chan struct{}{}, opts: o, fwd: map[*testbed.Host]string{}}
	var err error
	if p.ca, err = peer.NewCA("mtcp-test-pool", time.Hour); err != nil {
		t.Fatalf("%v", err)
	}
	members := bed.Servers()
	if o.Steering == "gateway" {
		members = append(members, bed.Gateway)
	}
	for _, h := range members {
		p.startDaemon(h, members)
	}
	for _, h := range bed.Servers() {
		p.startApp(h)
	}
	for _, h := range bed.Servers() {
		Eventually(t, 15*time.Second, h.Name+"'s application to register", func() (bool, string) {
			st, err := p.Admin(h).Status(context.Background())
			if err != nil {
				return false, err.Error()
			}
			return slices.Contains(st.Services, fmt.Sprintf(":%d", o.Port)), strings.Join(st.Services, ",")
		})
	}
	return p
}

// ctlAddr is the host's control-network address (the gateway has none:
// it uses its LAN address).
func ctlAddr(h *testbed.Host) netip.Addr {
	if h.Ctl4.IsValid() {
		return h.Ctl4
	}
	return h.LAN4
}

// hostDir is the directory of h's files (certificates, configuration,
// sockets) on h: under the test's temporary directory for a host of this
// machine, under the bed's directory on a remote VM (which Bed.Down
// removes).
func (p *Pool) hostDir(h *testbed.Host) string {
	if h.Remote() {
		return filepath.Join(testbed.VMRunDir, p.Bed.Prefix, filepath.Base(p.dir), h.Name)
	}
	return filepath.Join(p.dir, h.Name)
}

// SocketDir is the directory of h's mtcpd admin and application sockets,
// which mtcpd makes itself, as it makes /run/mtcp.
func (p *Pool) SocketDir(h *testbed.Host) string { return filepath.Join(p.hostDir(h), "run") }

// writeFile writes a file on h, failing the test on error.
func (p *Pool) writeFile(h *testbed.Host, path string, data []byte, perm os.FileMode) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := h.WriteFile(ctx, path, data, perm); err != nil {
		p.t.Fatalf("%v", err)
	}
}

// Admin returns a client of h's mtcpd admin socket (on a remote VM, of a
// local socket that ssh forwards to it, made on first use and closed at
// the test's cleanup).
func (p *Pool) Admin(h *testbed.Host) *admin.Client {
	path := filepath.Join(p.SocketDir(h), "admin.sock")
	if !h.Remote() {
		return admin.NewClient(path)
	}
	p.fwdMu.Lock()
	defer p.fwdMu.Unlock()
	if local, ok := p.fwd[h]; ok {
		return admin.NewClient(local)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	local, stop, err := h.ForwardUnix(ctx, path)
	if err != nil {
		p.t.Fatalf("%v", err)
	}
	p.fwd[h] = local
	p.t.Cleanup(stop)
	return admin.NewClient(local)
}

// The binaries copied to remote VMs, by VM and name: the path there.
var (
	remoteBinMu sync.Mutex
	remoteBins  = map[string]string{}
)

// Bin returns the path, on host h, of the binary name that [Binaries]
// built (mtcpd, mtcpctl, mtcp-kv, mtcp-bulk): for a remote VM it copies
// the binary there first, once per process, into a cache directory named
// after the binary's checksum.
func (p *Pool) Bin(h *testbed.Host, name string) string {
	p.t.Helper()
	local := filepath.Join(Binaries(p.t), name)
	if !h.Remote() {
		return local
	}
	key := testbed.MgmtAddr(h).String() + "/" + name
	remoteBinMu.Lock()
	defer remoteBinMu.Unlock()
	if path, ok := remoteBins[key]; ok {
		return path
	}
	data, err := os.ReadFile(local)
	if err != nil {
		p.t.Fatalf("%v", err)
	}
	sum := sha256.Sum256(data)
	path := filepath.Join("/var/cache/mtcp-testbed/bin", hex.EncodeToString(sum[:8]), name)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := h.Run(ctx, "test", "-x", path); err != nil {
		if err := h.WriteFile(ctx, path, data, 0o755); err != nil {
			p.t.Fatalf("copying %s to %s: %v", name, h.Name, err)
		}
	}
	remoteBins[key] = path
	return path
}

func (p *Pool) startDaemon(h *testbed.Host, members []*testbed.Host) {
	t := p.t
	dir := p.hostDir(h)
	cert, key, err := p.ca.Issue(h.Name, []netip.Addr{ctlAddr(h)}, nil, time.Hour)
	if err != nil {
		t.Fatalf("%v", err)
	}
	caPEM, _ := p.ca.PEM()
	p.writeFile(h, filepath.Join(dir, "ca.pem"), caPEM, 0o600)
	p.writeFile(h, filepath.Join(dir, "cert.pem"), cert, 0o600)
	p.writeFile(h, filepath.Join(dir, "key.pem"), key, 0o600)
	var b strings.Builder
	role := "server"
	if h == p.Bed.Gateway {
		role = "gateway"
	}
	fmt.Fprintf(&b, "name: %s\nrole: %s\nsteering: %s\n", h.Name, role, p.opts.Steering)
	if p.opts.Steering == "gateway" {
		fmt.Fprintf(&b, "gateway: %s\n", p.Bed.Gateway.Name)
	}
	if role == "server" {
		fmt.Fprintf(&b, "service_addrs: [%s, %q]\n", h.LAN4, h.LAN6.String())
	}
	if p.opts.FlowIdle != 0 {
		fmt.Fprintf(&b, "flow_idle: %s\n", p.opts.FlowIdle)
	}
	if p.opts.ProcessPages != "" {
		fmt.Fprintf(&b, "process_pages: %s\n", p.opts.ProcessPages)
	}
	fmt.Fprintf(&b, "peer_listen: %s\n", netip.AddrPortFrom(ctlAddr(h), peerPort))
	fmt.Fprintf(&b, "tls: {ca: %s, cert: %s, key: %s}\n", filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	fmt.Fprintf(&b, "admin_socket: %s\napp_socket: %s\n", filepath.Join(p.SocketDir(h), "admin.sock"), filepath.Join(p.SocketDir(h), "app.sock"))
	b.WriteString("peers:\n")
	for _, m := range members {
		if m == h {
			continue
		}
		fmt.Fprintf(&b, "  - name: %s\n    addr: %s\n", m.Name, netip.AddrPortFrom(ctlAddr(m), peerPort))
		if m != p.Bed.Gateway {
			fmt.Fprintf(&b, "    service_addrs: [%s, %q]\n", m.LAN4, m.LAN6.String())
		}
	}
	b.WriteString(p.policyConfig(h, dir))
	cfg := filepath.Join(dir, "mtcpd.yaml")
	p.writeFile(h, cfg, []byte(b.String()), 0o600)
	p.Spawn(h, "mtcpd-"+h.Name, p.Bin(h, "mtcpd"), "-config", cfg)
	Eventually(t, 15*time.Second, h.Name+"'s mtcpd to answer", func() (bool, string) {
		_, err := p.Admin(h).Status(context.Background())
		return err == nil, fmt.Sprint(err)
	})
}

// StartApp starts one more application (Options.App, mtcp-kv by default)
// on h, listening on listen (":7001", "10.77.2.11:7001") and registered
// with h's mtcpd as that service; name names it in the log.
func (p *Pool) StartApp(h *testbed.Host, name, listen string) {
	p.Spawn(h, name, p.Bin(h, p.opts.App), "--listen", listen, "--daemon", filepath.Join(p.SocketDir(h), "app.sock"), "--name", h.Name)
	Eventually(p.t, 15*time.Second, h.Name+" to register "+listen, func() (bool, string) {
		st, err := p.Admin(h).Status(context.Background())
		if err != nil {
			return false, err.Error()
		}
		return slices.Contains(st.Services, listen), strings.Join(st.Services, ", ")
	})
}

func (p *Pool) startApp(h *testbed.Host) {
	args := append([]string{"--listen", fmt.Sprintf(":%d", p.opts.Port), "--daemon", filepath.Join(p.SocketDir(h), "app.sock"), "--name", h.Name}, p.opts.AppArgs...)
	p.Spawn(h, "app-"+h.Name, p.Bin(h, p.opts.App), args...)
}

// Spawn starts a process in h's network namespace only (nsenter --net),
// logging its output to the test, and kills it at cleanup. On a remote VM
// it runs there (path is a path on the VM: see [Pool.Bin]), and the
// returned command is its local ssh client: signal it with [Pool.Signal]
// or testbed.Signal.
func (p *Pool) Spawn(h *testbed.Host, name, path string, args ...string) *exec.Cmd {
	t := p.t
	cmd := h.CommandEnv(context.Background(), p.opts.Env[name], path, args...)
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	ended := make(chan struct{})
	var tail []string    // a quiet process's last lines, for a failure
	var crashed []string // lines that say it crashed, read before ended
	go func() {
		defer close(ended)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if crashLine(sc.Text()) || slices.ContainsFunc(p.opts.FailOn, func(s string) bool { return strings.Contains(sc.Text(), s) }) {
				crashed = append(crashed, sc.Text())
			}
			if !p.opts.Quiet {
				t.Logf("%s: %s", name, sc.Text())
				continue
			}
			if len(tail) == quietTail {
				tail = tail[1:]
			}
			tail = append(tail, sc.Text())
		}
		cmd.Wait() // after the last read of its output
	}()
	p.procs[name], p.ended[name] = cmd, ended
	mayCrash := slices.ContainsFunc(p.opts.Env[name], func(e string) bool {
		return strings.HasPrefix(e, "MTCP_FAULT=") && strings.Contains(e, "-crash")
	})
	t.Cleanup(func() {
		select {
		case <-ended:
			if _, ok := p.mayEnd.Load(cmd); !ok && !mayCrash {
				t.Errorf("%s exited before the test ended (%v)", name, cmd.ProcessState)
			}
		default:
		}
		testbed.Signal(cmd, syscall.SIGTERM)
		select {
		case <-ended:
		case <-time.After(5 * time.Second):
			t.Errorf("%s still runs 5 s after SIGTERM: killed", name)
			cmd.Process.Kill()
			<-ended
		}
		if len(crashed) > 0 {
			t.Errorf("%s crashed or failed:\n%s", name, strings.Join(crashed, "\n"))
		}
		if f, ok := t.(interface{ Failed() bool }); ok && f.Failed() && len(tail) > 0 {
			t.Logf("%s's last %d lines of output:\n%s", name, len(tail), strings.Join(tail, "\n"))
		}
	})
	return cmd
}

// RestartDaemon stops h's mtcpd (SIGTERM, as an operator would) and starts
// it again with the same configuration, or just starts it if it died; the
// applications stay up and reconnect to it.
func (p *Pool) RestartDaemon(h *testbed.Host) {
	p.t.Helper()
	name := "mtcpd-" + h.Name
	select {
	case <-p.ended[name]: // dead already (a fault injected a crash)
	default:
		// It may be exiting on its own already (a fault injected a
		// crash), unnoticed yet.
		if err := p.Signal(name, syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
			p.t.Fatalf("stop %s: %v", name, err)
		}
		select {
		case <-p.ended[name]:
		case <-time.After(15 * time.Second):
			p.t.Fatalf("%s did not exit on SIGTERM", name)
		}
	}
	cfg := filepath.Join(p.hostDir(h), "mtcpd.yaml")
	p.Spawn(h, name, p.Bin(h, "mtcpd"), "-config", cfg)
	Eventually(p.t, 15*time.Second, h.Name+"'s restarted mtcpd to answer", func() (bool, string) {
		_, err := p.Admin(h).Status(context.Background())
		return err == nil, fmt.Sprint(err)
	})
}

// Ended is closed once the process name has exited.
func (p *Pool) Ended(name string) <-chan struct{} { return p.ended[name] }

// RunDaemonAgain starts a second mtcpd on h with h's configuration, as an
// operator might by mistake while the first runs, and returns its exit
// code once it has exited.
func (p *Pool) RunDaemonAgain(h *testbed.Host) int {
	p.t.Helper()
	name := "mtcpd-" + h.Name + "-again"
	cmd := p.Spawn(h, name, p.Bin(h, "mtcpd"), "-config", filepath.Join(p.hostDir(h), "mtcpd.yaml"))
	p.mayEnd.Store(cmd, true)
	select {
	case <-p.ended[name]:
	case <-time.After(15 * time.Second):
		p.t.Fatalf("the second mtcpd on %s keeps running", h.Name)
	}
	return cmd.ProcessState.ExitCode()
}

// crashLine tells whether a line of a process's output says that it
// crashed: a Go panic or fatal error, or a data race (under -race).
func crashLine(l string) bool {
	return strings.HasPrefix(l, "panic: ") || strings.HasPrefix(l, "fatal error: ") || strings.Contains(l, "WARNING: DATA RACE")
}

// quietTail is how many lines of a quiet process's output a failed test
// shows.
const quietTail = 100

// Dial connects from the client host to server s's application.
func (p *Pool) Dial(s *testbed.Host, v6 bool) *net.TCPConn {
	return p.DialAddr(netip.AddrPortFrom(Addr(s, v6), p.opts.Port))
}

// DialAddr connects from the client host to ap.
func (p *Pool) DialAddr(ap netip.AddrPort) *net.TCPConn {
	t := p.t
	var c net.Conn
	err := netns.Do(p.Bed.Client.NetNSPath(), func() (err error) {
		c, err = net.DialTimeout("tcp", ap.String(), 10*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("dial %v: %v", ap, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// Migrate moves the flow of client connection c from host from to host
// to, failing the test unless it moved.
func (p *Pool) Migrate(from, to *testbed.Host, c *net.TCPConn) *admin.Report {
	p.t.Helper()
	return p.MigrateFlow(from, to, Unmap(c.LocalAddr().(*net.TCPAddr).AddrPort()).String())
}

// MigrateFlow is Migrate for the connection of client address flow
// (IP:PORT), a client the test does not hold as a net.Conn (another
// program's).
func (p *Pool) MigrateFlow(from, to *testbed.Host, flow string) *admin.Report {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := p.Admin(from).Migrate(ctx, &admin.MigrateRequest{Flows: []string{flow}, To: to.Name})
	if err != nil {
		p.t.Fatalf("migrate %s -> %s: %v (report %+v)", from.Name, to.Name, err, rep)
	}
	if len(rep.Moved) != 1 {
		p.t.Fatalf("migrate %s -> %s: %+v", from.Name, to.Name, rep)
	}
	return rep
}

// Unmap turns a v4-mapped address into IPv4.
func Unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Addr returns h's service address of the family of v6.
func Addr(h *testbed.Host, v6 bool) netip.Addr {
	if v6 {
		return h.LAN6
	}
	return h.LAN4
}

// Eventually polls cond until it holds or the timeout passes.
func Eventually(t TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, now := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (now: %s)", what, now)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// CA is the pool's certificate authority, for tests that play a peer.
func (p *Pool) CA() *peer.CA { return p.ca }

// Signal sends sig to the named process ("mtcpd-s2", "app-s1", ...).
func (p *Pool) Signal(name string, sig os.Signal) error {
	cmd, ok := p.procs[name]
	if !ok {
		return fmt.Errorf("no process %s", name)
	}
	switch sig {
	case syscall.SIGTERM, syscall.SIGKILL, syscall.SIGINT, syscall.SIGQUIT:
		p.mayEnd.Store(cmd, true)
	}
	return testbed.Signal(cmd, sig)
}

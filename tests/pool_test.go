package tests

import (
	"bufio"
	"context"
	"fmt"
	"io"
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
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// The binaries under test, built once per test run.
var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "mtcp-bin-")
		if buildErr != nil {
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Dir(filepath.Dir(file))
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/mtcpd", "./cmd/mtcpctl", "./cmd/mtcp-kv", "./cmd/mtcp-bulk")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// pool is a running pool on a testbed: mtcpd on s1, s2, s3 (and the
// gateway with gateway steering) and an application on each server.
type pool struct {
	t     testing.TB
	bed   *testbed.Bed
	dir   string
	procs map[string]*exec.Cmd
	ca    *peer.CA
	opts  poolOpts
}

type poolOpts struct {
	steering string // "forward" (default) or "gateway"
	app      string // "mtcp-kv" (default) or "mtcp-bulk"
	port     uint16 // application port, default 7000
	env      map[string][]string
}

const peerPort = 7700

func startPool(t testing.TB, bed *testbed.Bed, o poolOpts) *pool {
	t.Helper()
	if o.steering == "" {
		o.steering = "forward"
	}
	if o.app == "" {
		o.app = "mtcp-kv"
	}
	if o.port == 0 {
		o.port = 7000
	}
	binaries(t)
	p := &pool{t: t, bed: bed, dir: t.TempDir(), procs: map[string]*exec.Cmd{}, opts: o}
	var err error
	if p.ca, err = peer.NewCA("mtcp-test-pool", time.Hour); err != nil {
		t.Fatal(err)
	}
	caPEM, _ := p.ca.PEM()
	os.WriteFile(filepath.Join(p.dir, "ca.pem"), caPEM, 0o600)
	members := bed.Servers()
	if o.steering == "gateway" {
		members = append(members, bed.Gateway)
	}
	for _, h := range members {
		p.startDaemon(h, members)
	}
	for _, h := range bed.Servers() {
		p.startApp(h)
	}
	for _, h := range bed.Servers() {
		eventually(t, 15*time.Second, h.Name+"'s application to register", func() (bool, string) {
			st, err := p.admin(h).Status(context.Background())
			if err != nil {
				return false, err.Error()
			}
			return slices.Contains(st.Services, fmt.Sprintf(":%d", o.port)), strings.Join(st.Services, ",")
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

func (p *pool) hostDir(h *testbed.Host) string { return filepath.Join(p.dir, h.Name) }

func (p *pool) admin(h *testbed.Host) *admin.Client {
	return admin.NewClient(filepath.Join(p.hostDir(h), "admin.sock"))
}

func (p *pool) startDaemon(h *testbed.Host, members []*testbed.Host) {
	t := p.t
	dir := p.hostDir(h)
	os.MkdirAll(dir, 0o700)
	cert, key, err := p.ca.Issue(h.Name, []netip.Addr{ctlAddr(h)}, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "cert.pem"), cert, 0o600)
	os.WriteFile(filepath.Join(dir, "key.pem"), key, 0o600)
	var b strings.Builder
	role := "server"
	if h == p.bed.Gateway {
		role = "gateway"
	}
	fmt.Fprintf(&b, "name: %s\nrole: %s\nsteering: %s\n", h.Name, role, p.opts.steering)
	if p.opts.steering == "gateway" {
		fmt.Fprintf(&b, "gateway: %s\n", p.bed.Gateway.Name)
	}
	if role == "server" {
		fmt.Fprintf(&b, "service_addrs: [%s, %q]\n", h.LAN4, h.LAN6.String())
	}
	fmt.Fprintf(&b, "peer_listen: %s\n", netip.AddrPortFrom(ctlAddr(h), peerPort))
	fmt.Fprintf(&b, "tls: {ca: %s, cert: %s, key: %s}\n", filepath.Join(p.dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	fmt.Fprintf(&b, "admin_socket: %s\napp_socket: %s\n", filepath.Join(dir, "admin.sock"), filepath.Join(dir, "app.sock"))
	b.WriteString("peers:\n")
	for _, m := range members {
		if m == h {
			continue
		}
		fmt.Fprintf(&b, "  - name: %s\n    addr: %s\n", m.Name, netip.AddrPortFrom(ctlAddr(m), peerPort))
		if m != p.bed.Gateway {
			fmt.Fprintf(&b, "    service_addrs: [%s, %q]\n", m.LAN4, m.LAN6.String())
		}
	}
	cfg := filepath.Join(dir, "mtcpd.yaml")
	os.WriteFile(cfg, []byte(b.String()), 0o600)
	p.spawn(h, "mtcpd-"+h.Name, filepath.Join(binaries(t), "mtcpd"), "-config", cfg)
	eventually(t, 15*time.Second, h.Name+"'s mtcpd to answer", func() (bool, string) {
		_, err := p.admin(h).Status(context.Background())
		return err == nil, fmt.Sprint(err)
	})
}

func (p *pool) startApp(h *testbed.Host) {
	p.spawn(h, "app-"+h.Name, filepath.Join(binaries(p.t), p.opts.app),
		"--listen", fmt.Sprintf(":%d", p.opts.port), "--daemon", filepath.Join(p.hostDir(h), "app.sock"), "--name", h.Name)
}

// spawn starts a process in h's network namespace only (nsenter --net),
// logging its output to the test, and kills it at cleanup.
func (p *pool) spawn(h *testbed.Host, name, path string, args ...string) *exec.Cmd {
	t := p.t
	cmd := h.Command(context.Background(), path, args...)
	cmd.Env = append(os.Environ(), p.opts.env[name]...)
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			t.Logf("%s: %s", name, sc.Text())
		}
	}()
	p.procs[name] = cmd
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		waited := make(chan error, 1)
		go func() { waited <- cmd.Wait() }()
		select {
		case <-waited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-waited
		}
		<-done
	})
	return cmd
}

// dialService connects from the client host to server s's application.
func (p *pool) dialService(s *testbed.Host, v6 bool) *net.TCPConn {
	t := p.t
	var c net.Conn
	ap := netip.AddrPortFrom(addr(s, v6), p.opts.port)
	in(t, p.bed.Client, func() (err error) {
		c, err = net.DialTimeout("tcp", ap.String(), 10*time.Second)
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// migrate moves the flow of client connection c from host from to host to.
func (p *pool) migrate(from, to *testbed.Host, c *net.TCPConn) *admin.Report {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := p.admin(from).Migrate(ctx, &admin.MigrateRequest{Flows: []string{unmapAP(c.LocalAddr().(*net.TCPAddr).AddrPort()).String()}, To: to.Name})
	if err != nil {
		p.t.Fatalf("migrate %s -> %s: %v (report %+v)", from.Name, to.Name, err, rep)
	}
	if len(rep.Moved) != 1 {
		p.t.Fatalf("migrate %s -> %s: %+v", from.Name, to.Name, rep)
	}
	return rep
}

func unmapAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// kv is a client session of mtcp-kv.
type kv struct {
	t  testing.TB
	c  *net.TCPConn
	rd *bufio.Reader
}

func (s *kv) do(cmd string) string {
	s.t.Helper()
	s.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(s.c, cmd+"\n"); err != nil {
		s.t.Fatalf("%s: %v", cmd, err)
	}
	line, err := s.rd.ReadString('\n')
	if err != nil {
		s.t.Fatalf("%s: %v", cmd, err)
	}
	return strings.TrimSpace(line)
}

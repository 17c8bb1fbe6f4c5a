package pool

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/nat/netns"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// Redis is a stock redis-server on one of the pool's servers, for process
// mode (CRIU). It runs in the server's network namespace only (nsenter
// --net: CRIU refuses processes with a mount namespace of their own) and,
// unless started with OwnPIDNamespace false, in a PID namespace of its own
// so that its restored copy cannot collide with the stopped original
// (the testbed's servers share one PID namespace).
type Redis struct {
	p    *Pool
	Port uint16
	// Home is the server it was started on: clients dial its address,
	// wherever the process lives.
	Home *testbed.Host
	// Host is where the process lives now, PID its pid there;
	// MigrateProcess updates both.
	Host *testbed.Host
	PID  int
}

// RedisOptions shape StartRedis.
type RedisOptions struct {
	// Port defaults to 6379.
	Port uint16
	// HostPIDNamespace runs redis in the host's PID namespace: its
	// restore on another server of this testbed then fails (its PID is
	// taken by the stopped original), which the abort tests want.
	HostPIDNamespace bool
	// Args are extra redis-server arguments.
	Args []string
}

// SkipReasonRedis says why process-mode tests cannot run here ("" if they
// can): redis-server or CRIU ≥ 4.2 missing.
func SkipReasonRedis() string {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return "process mode: redis-server is not installed (tests/setup.sh installs redis-server and redis-tools)"
	}
	return ""
}

// StartRedis starts redis-server on h without persistence and waits until
// it answers from the client host. The test's cleanup kills it wherever
// it lives then.
func (p *Pool) StartRedis(h *testbed.Host, o RedisOptions) *Redis {
	t := p.t
	t.Helper()
	if o.Port == 0 {
		o.Port = 6379
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("%s", SkipReasonRedis())
	}
	dir := filepath.Join(p.dir, "redis-"+h.Name)
	os.MkdirAll(dir, 0o755)
	args := []string{bin, "--port", fmt.Sprint(o.Port), "--bind", "* -::*", "--save", "", "--appendonly", "no",
		"--protected-mode", "no", "--dir", dir, "--logfile", filepath.Join(dir, "redis.log")}
	args = append(args, o.Args...)
	if !o.HostPIDNamespace {
		// unshare makes redis pid 1 of a new PID namespace (and kills it
		// if unshare dies); setsid makes it its own session leader,
		// which CRIU wants of a namespace's init.
		args = append([]string{"unshare", "--pid", "--fork", "--kill-child", "setsid"}, args...)
	} else {
		args = append([]string{"setsid"}, args...)
	}
	cmd := h.Command(context.Background(), args[0], args[1:]...)
	// No descriptors but /dev/null: the process must not hold a pipe to
	// the test, which a restored copy could not reopen.
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, nil
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server on %s: %v", h.Name, err)
	}
	go cmd.Wait()
	r := &Redis{p: p, Port: o.Port, Home: h, Host: h}
	Eventually(t, 15*time.Second, "redis-server on "+h.Name+" to answer", func() (bool, string) {
		c, err := r.Dial()
		if err != nil {
			return false, err.Error()
		}
		defer c.Close()
		fmt.Fprint(c, "PING\r\n")
		b := make([]byte, 7)
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, _ := c.Read(b)
		return string(b[:n]) == "+PONG\r\n", string(b[:n])
	})
	r.PID = ListenerPID(h, o.Port)
	if r.PID == 0 {
		t.Fatalf("redis-server on %s: no process listens on %d", h.Name, o.Port)
	}
	t.Cleanup(func() {
		// Wherever it lives now: the restored copy is not a child of
		// the test.
		if r.PID > 0 {
			syscall.Kill(r.PID, syscall.SIGKILL)
		}
		cmd.Process.Kill()
	})
	return r
}

// ListenerPID finds the process listening on TCP port in h's namespace
// (IPv4 or IPv6), from /proc/net/tcp{,6} and the /proc/*/fd links; 0 if
// none. It panics if it cannot read the namespace's sockets: a listener
// it could not see must not pass for none.
func ListenerPID(h *testbed.Host, port uint16) int {
	var inode string
	err := netns.Do(h.NetNSPath(), func() error {
		for _, file := range []string{"tcp", "tcp6"} {
			b, err := os.ReadFile("/proc/thread-self/net/" + file)
			if err != nil {
				return err
			}
			for _, l := range strings.Split(string(b), "\n")[1:] {
				f := strings.Fields(l)
				if len(f) > 9 && f[3] == "0A" && strings.HasSuffix(f[1], fmt.Sprintf(":%04X", port)) && inode == "" {
					inode = f[9]
				}
			}
		}
		return nil
	})
	if err != nil {
		panic(fmt.Sprintf("listeners in %s: %v", h.Name, err))
	}
	if inode == "" {
		return 0
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); l == "socket:["+inode+"]" {
				return pid
			}
		}
	}
	return 0
}

// Addr is the address clients dial: Home's service address.
func (r *Redis) Addr() netip.AddrPort { return netip.AddrPortFrom(r.Home.LAN4, r.Port) }

// Dial connects from the client host to redis at Addr.
func (r *Redis) Dial() (*net.TCPConn, error) {
	var c net.Conn
	err := netns.Do(r.p.Bed.Client.NetNSPath(), func() (err error) {
		c, err = net.DialTimeout("tcp", r.Addr().String(), 5*time.Second)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// MigrateProcess moves redis from where it lives to host to through the
// daemons (process mode, the listener's owner on its port), failing the
// test unless it moved.
func (r *Redis) MigrateProcess(to *testbed.Host) *admin.ProcessReport {
	t := r.p.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := r.p.Admin(r.Host).MigrateProcess(ctx, &admin.ProcessRequest{Port: r.Port, To: to.Name}, nil)
	if err != nil {
		t.Fatalf("migrate redis %s -> %s: %v (report %+v)", r.Host.Name, to.Name, err, rep)
	}
	r.Host, r.PID = to, rep.NewPID
	return rep
}

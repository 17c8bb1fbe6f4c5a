package testbed_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// The test binary doubles as the TCP listener and client run inside the
// bed's namespaces: `<test binary> testbed-helper listen|dial ...`.
const helperArg = "testbed-helper"

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == helperArg {
		os.Exit(helper(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// helper implements
//
//	listen ADDR NAME: accept connections on ADDR, answer each with
//	                  "NAME <client address>\n"; print "ready" once listening;
//	                  exit when stdin closes.
//	dial ADDR:        connect to ADDR, print what the server says.
func helper(args []string) int {
	switch {
	case len(args) == 3 && args[0] == "listen":
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s %s\n", args[2], c.RemoteAddr())
				c.Close()
			}
		}()
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		return 0
	case len(args) == 2 && args[0] == "dial":
		c, err := net.DialTimeout("tcp", args[1], 5*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		os.Stdout.Write(b)
		return 0
	}
	fmt.Fprintln(os.Stderr, "usage: testbed-helper listen ADDR NAME | dial ADDR")
	return 2
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func skipUnlessRoot(t *testing.T) {
	t.Helper()
	testbed.RequireNetns(t)
	if reason := testbed.SkipReason(); reason != "" {
		t.Skip(reason)
	}
}

// listen starts a helper listener on port 7000 (all addresses, IPv4 and
// IPv6) in h's namespace and stops it when the test ends.
func listen(t *testing.T, h *testbed.Host) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := h.Command(context.Background(), exe, helperArg, "listen", "[::]:7000", h.Name)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			// Killed is fine if the test took the bed down first.
			if err != nil && h.Exists() {
				t.Errorf("listener in %s: %v", h.Name, err)
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Errorf("listener in %s did not exit when its stdin closed", h.Name)
			<-done
		}
	})
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line
	}()
	select {
	case line := <-ready:
		if strings.TrimSpace(line) != "ready" {
			t.Fatalf("listener in %s: got %q, want ready", h.Name, line)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("listener in %s: not ready after 30s", h.Name)
	}
}

// dial connects from h's namespace to addr:7000 and checks that the server
// named want answered and saw the connection come from from (no NAT).
func dial(t *testing.T, ctx context.Context, h *testbed.Host, addr netip.Addr, want string, from netip.Addr) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(addr, 7000).String()
	out, err := h.Run(ctx, exe, helperArg, "dial", target)
	if err != nil {
		t.Errorf("%s -> %s: %v", h.Name, target, err)
		return
	}
	got := strings.Fields(string(out))
	if len(got) != 2 || got[0] != want {
		t.Errorf("%s -> %s: answered %q, want %s", h.Name, target, out, want)
		return
	}
	if ap, err := netip.ParseAddrPort(got[1]); err != nil || ap.Addr().Unmap() != from {
		t.Errorf("%s -> %s: server saw the client as %s, want %s", h.Name, target, got[1], from)
	}
}

// routeGet returns `ip -j route get DST` in h's namespace: gateway and device.
func routeGet(t *testing.T, ctx context.Context, h *testbed.Host, dst netip.Addr) (gw, dev string, err error) {
	t.Helper()
	out, err := h.Run(ctx, "ip", "-j", "route", "get", dst.String())
	if err != nil {
		return "", "", err
	}
	var r []struct {
		Gateway string `json:"gateway"`
		Dev     string `json:"dev"`
	}
	if err := json.Unmarshal(out, &r); err != nil || len(r) != 1 {
		t.Fatalf("ip route get %s in %s: %q: %v", dst, h.Name, out, err)
	}
	return r[0].Gateway, r[0].Dev, nil
}

func checkRoute(t *testing.T, ctx context.Context, h *testbed.Host, dst netip.Addr, wantGW, wantDev string) {
	t.Helper()
	gw, dev, err := routeGet(t, ctx, h, dst)
	if err != nil {
		t.Errorf("%s: route to %s: %v", h.Name, dst, err)
		return
	}
	if gw != wantGW || dev != wantDev {
		t.Errorf("%s: route to %s goes via %q dev %s, want via %q dev %s", h.Name, dst, gw, dev, wantGW, wantDev)
	}
}

func sysctlValue(t *testing.T, ctx context.Context, h *testbed.Host, key string) string {
	t.Helper()
	out, err := h.Run(ctx, "sysctl", "-n", key)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// checkConnectivity checks TCP over IPv4 and IPv6 from the client to every
// server through the gateway, and between servers over the control net.
func checkConnectivity(t *testing.T, ctx context.Context, b *testbed.Bed) {
	t.Helper()
	for _, s := range b.Servers() {
		dial(t, ctx, b.Client, s.LAN4, s.Name, b.Client.LAN4)
		dial(t, ctx, b.Client, s.LAN6, s.Name, b.Client.LAN6)
	}
	for _, p := range [][2]*testbed.Host{{b.S1, b.S2}, {b.S2, b.S1}, {b.S1, b.S3}, {b.S3, b.S2}} {
		from, to := p[0], p[1]
		dial(t, ctx, from, to.Ctl4, to.Name, from.Ctl4)
		dial(t, ctx, from, to.Ctl6, to.Name, from.Ctl6)
	}
}

func TestBed(t *testing.T) {
	testbed.RequireNetns(t) // these tests check the namespace testbed itself
	b := testbed.ForTest(t)
	ctx := testContext(t)

	wantAddrs := map[string][4]string{
		"client":  {"10.77.1.2", "fd77:1::2", "", ""},
		"gateway": {"10.77.2.1", "fd77:2::1", "", ""},
		"s1":      {"10.77.2.11", "fd77:2::11", "10.77.3.11", "fd77:3::11"},
		"s2":      {"10.77.2.12", "fd77:2::12", "10.77.3.12", "fd77:3::12"},
		"s3":      {"10.77.2.13", "fd77:2::13", "10.77.3.13", "fd77:3::13"},
	}
	for _, h := range []*testbed.Host{b.Client, b.Gateway, b.S1, b.S2, b.S3} {
		w := wantAddrs[h.Name]
		got := [4]string{str(h.LAN4), str(h.LAN6), str(h.Ctl4), str(h.Ctl6)}
		if got != w {
			t.Errorf("host %s addresses = %v, want %v", h.Name, got, w)
		}
		if want := b.Prefix + "-" + h.Name; h.NetNS != want || h.NetNSPath() != "/run/netns/"+want {
			t.Errorf("host %s: netns %q path %q, want %q", h.Name, h.NetNS, h.NetNSPath(), want)
		}
	}
	if pid, ok := testbed.OwnerPID(b.Prefix); !ok || pid != os.Getpid() {
		t.Errorf("OwnerPID(%q) = %d, %v; want this process, %d", b.Prefix, pid, ok, os.Getpid())
	}

	for _, s := range b.Servers() {
		listen(t, s)
	}
	checkConnectivity(t, ctx, b)

	// Routes: the client and the servers go through the gateway; servers
	// reach each other directly on the control net.
	checkRoute(t, ctx, b.Client, b.S1.LAN4, "10.77.1.1", "eth0")
	checkRoute(t, ctx, b.Client, b.S2.LAN6, "fd77:1::1", "eth0")
	checkRoute(t, ctx, b.S1, b.Client.LAN4, "10.77.2.1", "eth0")
	checkRoute(t, ctx, b.S3, b.Client.LAN6, "fd77:2::1", "eth0")
	checkRoute(t, ctx, b.S1, b.S2.Ctl4, "", "ctl0")
	checkRoute(t, ctx, b.S2, b.S3.Ctl6, "", "ctl0")
	checkRoute(t, ctx, b.S1, b.S2.LAN4, "", "eth0")
	checkRoute(t, ctx, b.Gateway, b.S3.LAN4, "", "lan0")
	checkRoute(t, ctx, b.Gateway, b.Client.LAN6, "", "cli0")
	// Nothing leaves the bed: the gateway has no route to the world.
	for _, dst := range []string{"192.0.2.1", "8.8.8.8", "2001:db8::1"} {
		if gw, dev, err := routeGet(t, ctx, b.Gateway, netip.MustParseAddr(dst)); err == nil {
			t.Errorf("gateway has a route to %s (via %q dev %s); the bed must not reach the real network", dst, gw, dev)
		}
	}

	// Settings the steering modes rely on.
	for _, h := range []*testbed.Host{b.Gateway, b.S1, b.S2, b.S3} {
		for key, want := range map[string]string{
			"net.ipv4.ip_forward":                         "1",
			"net.ipv6.conf.all.forwarding":                "1",
			"net.ipv4.conf.all.accept_redirects":          "0",
			"net.ipv4.conf.default.accept_redirects":      "0",
			"net.ipv6.conf.all.accept_redirects":          "0",
			"net.ipv4.conf." + lanIf(b, h) + ".rp_filter": "0",
		} {
			if got := sysctlValue(t, ctx, h, key); got != want {
				t.Errorf("%s: %s = %s, want %s", h.Name, key, got, want)
			}
		}
	}
	for _, s := range b.Servers() {
		for _, key := range []string{"net.ipv4.conf.all.send_redirects", "net.ipv4.conf.default.send_redirects", "net.ipv4.conf.eth0.send_redirects", "net.ipv4.conf.ctl0.send_redirects"} {
			if got := sysctlValue(t, ctx, s, key); got != "0" {
				t.Errorf("%s: %s = %s, want 0", s.Name, key, got)
			}
		}
	}

	// Nft reaches the host's own ruleset only.
	if err := b.S1.Nft(ctx, "table inet mtcptest {\n chain c { type filter hook input priority 0; }\n}\n"); err != nil {
		t.Fatal(err)
	}
	if out, err := b.S1.Run(ctx, "nft", "list", "tables"); err != nil || !strings.Contains(string(out), "mtcptest") {
		t.Errorf("s1: nft list tables = %q, %v; want table inet mtcptest", out, err)
	}
	if out, err := b.S2.Run(ctx, "nft", "list", "tables"); err != nil || strings.Contains(string(out), "mtcptest") {
		t.Errorf("s2: nft list tables = %q, %v; want no mtcptest", out, err)
	}
	if err := b.S1.Nft(ctx, "this is not nft"); err == nil || !strings.Contains(err.Error(), "s1") {
		t.Errorf("Nft(bad script) = %v, want an error naming s1 and nft's complaint", err)
	}
	if _, err := b.S1.Run(ctx, "false"); err == nil || !strings.Contains(err.Error(), "false") {
		t.Errorf("Run(false) = %v, want an error naming the command", err)
	}
}

func lanIf(b *testbed.Bed, h *testbed.Host) string {
	if h == b.Gateway {
		return testbed.IfGatewayLAN
	}
	return testbed.IfLAN
}

func str(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func TestUpIdempotentAndRepairs(t *testing.T) {
	testbed.RequireNetns(t) // these tests check the namespace testbed itself
	b := testbed.ForTest(t)
	ctx := testContext(t)

	again, err := testbed.Up(ctx, testbed.Options{Prefix: b.Prefix})
	if err != nil {
		t.Fatalf("second Up of %s: %v", b.Prefix, err)
	}
	if again.Prefix != b.Prefix || again.S2.NetNS != b.S2.NetNS {
		t.Errorf("second Up returned bed %s, want %s", again.Prefix, b.Prefix)
	}

	// Break things, then Up again.
	for _, c := range []struct {
		h    *testbed.Host
		args []string
	}{
		{b.S2, []string{"ip", "link", "del", "eth0"}},          // also removes its switch port
		{b.S3, []string{"ip", "addr", "flush", "dev", "ctl0"}}, // control address gone
		{b.Client, []string{"ip", "route", "del", "default"}},
		{b.Gateway, []string{"sysctl", "-q", "-w", "net.ipv4.ip_forward=0"}},
		{b.Switch, []string{"ip", "link", "set", "s1-lan", "nomaster"}},
	} {
		if _, err := c.h.Run(ctx, c.args[0], c.args[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := testbed.Up(ctx, testbed.Options{Prefix: b.Prefix}); err != nil {
		t.Fatalf("Up to repair %s: %v", b.Prefix, err)
	}
	for _, s := range b.Servers() {
		listen(t, s)
	}
	checkConnectivity(t, ctx, b)
}

func TestTwoBedsCoexist(t *testing.T) {
	testbed.RequireNetns(t) // these tests check the namespace testbed itself
	a := testbed.ForTest(t)
	b := testbed.ForTest(t)
	ctx := testContext(t)
	if a.Prefix == b.Prefix {
		t.Fatalf("two beds share prefix %s", a.Prefix)
	}
	listen(t, a.S1)
	listen(t, b.S1)
	dial(t, ctx, a.Client, a.S1.LAN4, "s1", a.Client.LAN4)
	dial(t, ctx, b.Client, b.S1.LAN6, "s1", b.Client.LAN6)

	prefixes, err := testbed.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(prefixes, a.Prefix) || !slices.Contains(prefixes, b.Prefix) {
		t.Errorf("List = %v, want both %s and %s", prefixes, a.Prefix, b.Prefix)
	}

	// Taking one down leaves the other working. (b's listener is killed
	// by Down; its cleanup then sees it exit.)
	if err := b.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if left, err := testbed.Leftovers(ctx, b.Prefix); err != nil || len(left) > 0 {
		t.Errorf("after Down: leftovers %v, %v", left, err)
	}
	dial(t, ctx, a.Client, a.S1.LAN4, "s1", a.Client.LAN4)
}

// TestDown checks that Down removes every namespace and kills every process
// in them, whether started with Command or Run.
func TestDown(t *testing.T) {
	skipUnlessRoot(t)
	ctx := testContext(t)
	b, err := testbed.Up(ctx, testbed.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Down(context.Background()) }) // if the test fails early

	sleeper := b.S1.Command(ctx, "sleep", "1000")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	slept := make(chan error, 1)
	go func() { slept <- sleeper.Wait() }()
	runner := make(chan error, 1)
	go func() { _, err := b.Client.Run(ctx, "sleep", "1000"); runner <- err }()
	if err := waitFor(ctx, func() bool {
		left, _ := testbed.Leftovers(ctx, b.Prefix)
		return countPIDs(left) == 2
	}); err != nil {
		left, _ := testbed.Leftovers(ctx, b.Prefix)
		t.Fatalf("the two sleeps never showed up in the bed: %v", left)
	}

	if err := b.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if left, err := testbed.Leftovers(ctx, b.Prefix); err != nil || len(left) > 0 {
		t.Errorf("after Down: leftovers %v, %v", left, err)
	}
	if err := <-slept; err == nil {
		t.Error("the sleep started with Command exited cleanly; want it killed")
	}
	if err := <-runner; err == nil {
		t.Error("the sleep started with Run exited cleanly; want it killed")
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), b.Prefix) {
		t.Errorf("ip netns list still shows %s:\n%s", b.Prefix, out)
	}
	if prefixes, _ := testbed.List(ctx); slices.Contains(prefixes, b.Prefix) {
		t.Errorf("List still shows %s", b.Prefix)
	}
	if err := b.Down(ctx); err != nil {
		t.Errorf("second Down: %v", err)
	}
}

func countPIDs(left []string) int {
	n := 0
	for _, l := range left {
		if strings.HasPrefix(l, "pid ") {
			n++
		}
	}
	return n
}

// waitFor polls cond until it holds or ctx ends.
func waitFor(ctx context.Context, cond func() bool) error {
	for d := time.Millisecond; !cond(); d = min(2*d, 100*time.Millisecond) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
	}
	return nil
}

// TestSweep checks that Sweep deletes a bed whose creating process is dead
// (a pid above the kernel's PID_MAX_LIMIT, 2^22, cannot exist) and spares
// the beds of live processes.
func TestSweep(t *testing.T) {
	testbed.RequireNetns(t) // these tests check the namespace testbed itself
	live := testbed.ForTest(t)
	ctx := testContext(t)
	const deadPID = 999999999
	dead := fmt.Sprintf("mtt%dx%04x", deadPID, rand.N(0x10000))
	if pid, ok := testbed.OwnerPID(dead); !ok || pid != deadPID || !testbed.Orphaned(dead) {
		t.Fatalf("OwnerPID(%s) = %d, %v; Orphaned = %v", dead, pid, ok, testbed.Orphaned(dead))
	}
	if testbed.Orphaned(live.Prefix) {
		t.Fatalf("Orphaned(%s) = true for this live process's bed", live.Prefix)
	}
	if _, ok := testbed.OwnerPID("mtcp-tb"); ok {
		t.Error("OwnerPID(mtcp-tb): a CLI bed has no owner pid")
	}
	t.Cleanup(func() { testbed.Describe(dead).Down(context.Background()) })

	// Another process's ForTest may sweep the dead bed at any moment:
	// build it in one step that tolerates that (Up would fail half-way),
	// and build it again if that happens before the sleep is inside.
	b := testbed.Describe(dead)
	var slept chan error
	for attempt := 1; slept == nil; attempt++ {
		if attempt > 5 {
			t.Fatalf("%s was swept by other processes before its sleep got in, 5 times", dead)
		}
		slept = sleepInside(t, ctx, b)
	}

	// A namespace of the dead process's that is not a bed host, as
	// repair's tests make.
	stray := dead + "-repair"
	if out, err := exec.Command("ip", "netns", "add", stray).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", stray, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", stray).Run() })

	if err := testbed.Sweep(ctx); err != nil {
		t.Fatal(err)
	}
	if left, err := testbed.Leftovers(ctx, dead); err != nil || len(left) > 0 {
		t.Errorf("after Sweep: leftovers of %s: %v, %v", dead, left, err)
	}
	if _, err := os.Stat("/run/netns/" + stray); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("after Sweep: netns %s: %v; want it deleted", stray, err)
	}
	select {
	case err := <-slept:
		if err == nil {
			t.Error("the sleep in the swept bed exited cleanly; want it killed")
		}
	case <-ctx.Done():
		t.Error("the sleep in the swept bed is still running")
	}
	for _, h := range live.Hosts() {
		if !h.Exists() {
			t.Errorf("Sweep deleted %s of a live process's bed", h.NetNS)
		}
	}
}

// sleepInside makes the namespaces of b's s1 and switch and starts a
// sleep in s1's, returning the channel that gets its end once it is
// inside, or nil if another process swept the bed before that (the sleep
// is then killed: nsenter holds the namespace open before it enters it,
// so it may run on in the unnamed namespace, out of any sweep's sight).
func sleepInside(t *testing.T, ctx context.Context, b *testbed.Bed) chan error {
	t.Helper()
	for _, h := range []*testbed.Host{b.S1, b.Switch} {
		if out, err := exec.CommandContext(ctx, "ip", "netns", "add", h.NetNS).CombinedOutput(); err != nil && !h.Exists() {
			t.Fatalf("ip netns add %s: %v: %s", h.NetNS, err, out)
		}
	}
	sleeper := b.S1.Command(ctx, "sleep", "1000")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	slept, exited := make(chan error, 1), make(chan struct{})
	go func() { err := sleeper.Wait(); slept <- err; close(exited) }()
	inside := fmt.Sprintf("pid %d ", sleeper.Process.Pid)
	in := false
	if err := waitFor(ctx, func() bool {
		left, _ := testbed.Leftovers(ctx, b.Prefix)
		in = slices.ContainsFunc(left, func(s string) bool { return strings.HasPrefix(s, inside) })
		select {
		case <-exited:
			return true
		default:
		}
		return in || !b.S1.Exists()
	}); err != nil {
		t.Fatalf("the sleep never entered %s: %v", b.S1.NetNS, err)
	}
	if in {
		return slept
	}
	sleeper.Process.Kill()
	<-exited
	if b.S1.Exists() {
		t.Fatalf("the sleep in %s ended before it was seen inside: %v", b.S1.NetNS, <-slept)
	}
	return nil
}

// TestRootNamespaceUntouched checks that a bed's life leaves the root
// namespace's links and routes as they were.
func TestRootNamespaceUntouched(t *testing.T) {
	skipUnlessRoot(t)
	ctx := testContext(t)
	snapshot := func() string {
		var s strings.Builder
		for _, args := range [][]string{
			{"-o", "link", "show"},
			{"-4", "route", "show", "table", "all"},
			{"-6", "route", "show"},
			{"-br", "addr", "show"},
		} {
			out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
			if err != nil {
				t.Fatalf("ip %v: %v: %s", args, err, out)
			}
			fmt.Fprintf(&s, "== ip %s\n%s", strings.Join(args, " "), out)
		}
		return s.String()
	}
	before := snapshot()
	b, err := testbed.Up(ctx, testbed.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Down(context.Background()) })
	if during := snapshot(); during != before {
		t.Errorf("root namespace changed while the bed is up:\nbefore:\n%s\nduring:\n%s", before, during)
	}
	if err := b.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(); after != before {
		t.Errorf("root namespace changed after Down:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func TestValidatePrefix(t *testing.T) {
	for _, p := range []string{"mtcp-tb", "mtt123x00af", "a", "A.b_c-1"} {
		if err := testbed.ValidatePrefix(p); err != nil {
			t.Errorf("ValidatePrefix(%q) = %v, want ok", p, err)
		}
	}
	for _, p := range []string{"", "-x", "a/b", "a b", strings.Repeat("x", 65), "../x"} {
		if err := testbed.ValidatePrefix(p); err == nil {
			t.Errorf("ValidatePrefix(%q) = nil, want an error", p)
		}
	}
	if _, err := testbed.Up(context.Background(), testbed.Options{Prefix: "a/b"}); err == nil {
		t.Error("Up with prefix a/b succeeded")
	}
}

func TestDescribe(t *testing.T) {
	b := testbed.Describe("mtcp-tb")
	if got := len(b.Hosts()); got != 6 {
		t.Errorf("%d hosts, want 6", got)
	}
	if b.Host("s2") != b.S2 || b.Host("nope") != nil {
		t.Error("Host(name) does not find the hosts")
	}
	if b.Switch.NetNS != "mtcp-tb-sw" || b.S3.NetNSPath() != "/run/netns/mtcp-tb-s3" {
		t.Errorf("names: %s %s", b.Switch.NetNS, b.S3.NetNSPath())
	}
	if !testbed.LANNet4.Contains(b.S1.LAN4) || !testbed.CtlNet6.Contains(b.S3.Ctl6) || !testbed.ClientNet4.Contains(b.Client.LAN4) {
		t.Error("host addresses lie outside the bed's networks")
	}
}

// Bring a bed up for a program (tests use ForTest instead), reach a server
// from the client, and take the bed down.
func Example() {
	ctx := context.Background()
	b, err := testbed.Up(ctx, testbed.Options{Prefix: "mtcp-example"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer b.Down(ctx)
	out, err := b.Client.Run(ctx, "ip", "route", "get", b.S1.LAN4.String())
	fmt.Printf("%s %v\n", out, err)
}

// TestUpInterruptedCleansUp cancels Up at various points of its work and
// checks that it removes what it had made.
func TestUpInterruptedCleansUp(t *testing.T) {
	skipUnlessRoot(t)
	failed := 0
	for _, d := range []time.Duration{5 * time.Millisecond, 20 * time.Millisecond, 60 * time.Millisecond, 120 * time.Millisecond} {
		prefix := fmt.Sprintf("mtt%dx%04x", os.Getpid(), rand.N(0x10000))
		t.Cleanup(func() { testbed.Describe(prefix).Down(context.Background()) })
		ctx, cancel := context.WithTimeout(context.Background(), d)
		b, err := testbed.Up(ctx, testbed.Options{Prefix: prefix})
		cancel()
		if err == nil {
			t.Logf("Up finished within %v; nothing to check", d)
			if err := b.Down(context.Background()); err != nil {
				t.Fatal(err)
			}
			continue
		}
		failed++
		if b != nil {
			t.Errorf("failed Up returned a bed")
		}
		if left, lerr := testbed.Leftovers(context.Background(), prefix); lerr != nil || len(left) > 0 {
			t.Errorf("Up canceled after %v (%v) left: %v, %v", d, err, left, lerr)
		}
	}
	if failed == 0 {
		t.Log("every Up finished before its deadline: the cleanup path was not exercised")
	}
}

// vethEnds returns the veth interfaces of every namespace of the bed, as
// "host/ifname".
func vethEnds(t *testing.T, ctx context.Context, b *testbed.Bed) map[*testbed.Host][]string {
	t.Helper()
	ends := map[*testbed.Host][]string{}
	for _, h := range b.Hosts() {
		out, err := h.Run(ctx, "ip", "-d", "-j", "link", "show")
		if err != nil {
			t.Fatal(err)
		}
		var links []struct {
			IfName   string `json:"ifname"`
			LinkInfo struct {
				InfoKind string `json:"info_kind"`
			} `json:"linkinfo"`
		}
		if err := json.Unmarshal(out, &links); err != nil {
			t.Fatalf("%s: ip -d -j link show: %v", h.Name, err)
		}
		for _, l := range links {
			if l.LinkInfo.InfoKind == "veth" {
				ends[h] = append(ends[h], l.IfName)
			}
		}
	}
	return ends
}

// offloadState returns the features of `ethtool -k IFC` in h that decide
// whether checksums are computed and verified, by name.
func offloadState(t *testing.T, ctx context.Context, h *testbed.Host, ifc string) map[string]string {
	t.Helper()
	out, err := h.Run(ctx, "ethtool", "-k", ifc)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		name, val, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		switch name {
		case "tx-checksumming", "tx-checksum-ip-generic", "tcp-segmentation-offload", "generic-receive-offload":
			got[name] = strings.TrimSpace(val)
		}
	}
	return got
}

// checkOffloadOff fails the test unless checksum offload, TSO and GRO are
// off on all 16 veth ends of the bed (8 pairs: client-gateway,
// gateway-switch and two per server).
func checkOffloadOff(t *testing.T, ctx context.Context, b *testbed.Bed) {
	t.Helper()
	n := 0
	for h, ifcs := range vethEnds(t, ctx, b) {
		for _, ifc := range ifcs {
			n++
			got := offloadState(t, ctx, h, ifc)
			for _, f := range []string{"tx-checksumming", "tx-checksum-ip-generic", "tcp-segmentation-offload", "generic-receive-offload"} {
				if got[f] != "off" {
					t.Errorf("%s %s: ethtool -k says %s: %q, want off", h.Name, ifc, f, got[f])
				}
			}
		}
	}
	if n != 16 {
		t.Errorf("found %d veth ends in the bed, want 16", n)
	}
}

// tcpCsumErrors reads the Tcp InCsumErrors counter of h's namespace (IPv4
// and IPv6 segments alike) from /proc/net/snmp.
func tcpCsumErrors(t *testing.T, ctx context.Context, h *testbed.Host) int {
	t.Helper()
	out, err := h.Run(ctx, "cat", "/proc/net/snmp")
	if err != nil {
		t.Fatal(err)
	}
	var head []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		if i := slices.Index(head, "InCsumErrors"); i >= 0 && i < len(f) {
			var n int
			if _, err := fmt.Sscan(f[i], &n); err == nil {
				return n
			}
		}
	}
	t.Fatalf("%s: no Tcp InCsumErrors in /proc/net/snmp:\n%s", h.Name, out)
	return 0
}

// corruptChecksums makes h's postrouting overwrite the TCP checksum field of
// every segment to port 7000 with zero, without any fix-up: the stand-in
// for an address rewrite with a wrong checksum fix-up.
func corruptChecksums(t *testing.T, ctx context.Context, h *testbed.Host) {
	t.Helper()
	// @th,128,16 is the TCP header's checksum field (bytes 16-17).
	if err := h.Nft(ctx, "table inet mtcpcsum {\n chain post {\n  type filter hook postrouting priority 0\n  tcp dport 7000 @th,128,16 set 0\n }\n}\n"); err != nil {
		t.Fatal(err)
	}
}

// dialCorrupted dials dst:7000 from h's namespace with a corrupted
// checksum on every segment h sends, and reports whether the connection
// was answered. It returns as soon as either the dial answers or the
// receiver to counts a checksum error; a dial that is neither answered
// nor counted within ctx fails the test.
func dialCorrupted(t *testing.T, ctx context.Context, h, to *testbed.Host, dst netip.Addr) (answered bool) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	before := tcpCsumErrors(t, ctx, to)
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := h.Command(dctx, exe, helperArg, "dial", netip.AddrPortFrom(dst, 7000).String())
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for d := time.Millisecond; ; d = min(2*d, 50*time.Millisecond) {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s -> %s: the dial failed without a checksum error counted at %s: %v", h.Name, dst, to.Name, err)
			}
			if got := strings.Fields(out.String()); len(got) != 2 || got[0] != to.Name {
				t.Fatalf("%s -> %s: answered %q, want %s", h.Name, dst, out.String(), to.Name)
			}
			if n := tcpCsumErrors(t, ctx, to); n != before {
				t.Fatalf("%s -> %s: answered, yet %s counted %d checksum errors", h.Name, dst, to.Name, n-before)
			}
			return true
		case <-ctx.Done():
			t.Fatalf("%s -> %s: neither answered nor counted as a checksum error at %s", h.Name, dst, to.Name)
		case <-time.After(d):
		}
		if tcpCsumErrors(t, ctx, to) > before {
			cancel()
			<-done
			return false
		}
	}
}

// TestChecksumOffloadOff checks that Up turns checksum offload off on every
// veth end, and that this is what makes the receiver verify checksums: a
// segment whose TCP checksum an nftables rule broke is dropped (and
// counted) by its receiver with the bed as Up leaves it, and accepted
// unverified once TX checksum offload is back on along its path (the veth
// default), which is the hole the setting closes. Up puts it right again.
func TestChecksumOffloadOff(t *testing.T) {
	testbed.RequireNetns(t) // these tests check the namespace testbed itself
	b := testbed.ForTest(t)
	ctx := testContext(t)
	checkOffloadOff(t, ctx, b)

	listen(t, b.S2)
	// s1 -> s2 crosses the switch: s1 eth0, sw s1-lan, bridge, sw
	// s2-lan, s2 eth0.
	dial(t, ctx, b.S1, b.S2.LAN4, "s2", b.S1.LAN4)
	corruptChecksums(t, ctx, b.S1)
	for _, dst := range []netip.Addr{b.S2.LAN4, b.S2.LAN6} {
		if dialCorrupted(t, ctx, b.S1, b.S2, dst) {
			t.Errorf("s1 -> %s: segments with a broken checksum were accepted", dst)
		}
	}

	// The control: with TX offload on at the two transmitting ends of the
	// path, the broken checksum is never computed nor verified.
	for _, end := range []struct {
		h   *testbed.Host
		ifc string
	}{{b.S1, testbed.IfLAN}, {b.Switch, "s2-lan"}} {
		if _, err := end.h.Run(ctx, "ethtool", "-K", end.ifc, "tx", "on"); err != nil {
			t.Fatal(err)
		}
	}
	for _, dst := range []netip.Addr{b.S2.LAN4, b.S2.LAN6} {
		if !dialCorrupted(t, ctx, b.S1, b.S2, dst) {
			t.Errorf("s1 -> %s with TX checksum offload on: the broken checksum was caught; the control shows nothing", dst)
		}
	}

	if _, err := testbed.Up(ctx, testbed.Options{Prefix: b.Prefix}); err != nil {
		t.Fatalf("Up to repair %s: %v", b.Prefix, err)
	}
	checkOffloadOff(t, ctx, b)
	if dialCorrupted(t, ctx, b.S1, b.S2, b.S2.LAN4) {
		t.Error("after Up repaired the offload settings: segments with a broken checksum were accepted")
	}
}

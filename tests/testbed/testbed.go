package testbed

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"time"
)

// Host names, the HOST part of a bed's namespace names PREFIX-HOST.
const (
	HostClient  = "client"  // the unmodified TCP client
	HostGateway = "gateway" // the router between the client and the server LAN
	HostS1      = "s1"      // server 1 of the pool
	HostS2      = "s2"      // server 2 of the pool
	HostS3      = "s3"      // server 3 of the pool
	HostSwitch  = "sw"      // the L2 switch holding the bridges "lan" and "ctl"
)

// Interface names inside the hosts. They are the same in every bed: each bed
// has its own namespaces, so names never collide.
const (
	// IfLAN is a server's server-LAN interface and the client's only one.
	IfLAN = "eth0"
	// IfCtl is a server's control-network interface.
	IfCtl = "ctl0"
	// IfGatewayClient is the gateway's interface on the client net.
	IfGatewayClient = "cli0"
	// IfGatewayLAN is the gateway's interface on the server LAN.
	IfGatewayLAN = "lan0"
	// BridgeLAN is the server-LAN bridge in the switch namespace.
	BridgeLAN = "lan"
	// BridgeCtl is the control-network bridge in the switch namespace.
	BridgeCtl = "ctl"
)

// The bed's networks. Addresses are fixed, the same in every bed.
var (
	ClientNet4 = netip.MustParsePrefix("10.77.1.0/24") // client net, IPv4
	ClientNet6 = netip.MustParsePrefix("fd77:1::/64")  // client net, IPv6
	LANNet4    = netip.MustParsePrefix("10.77.2.0/24") // server LAN, IPv4
	LANNet6    = netip.MustParsePrefix("fd77:2::/64")  // server LAN, IPv6
	CtlNet4    = netip.MustParsePrefix("10.77.3.0/24") // control network, IPv4
	CtlNet6    = netip.MustParsePrefix("fd77:3::/64")  // control network, IPv6

	// GatewayClient4 and GatewayClient6 are the gateway's addresses on the
	// client net: the client's default routers. (The gateway's Host.LAN4
	// and LAN6 are its server-LAN addresses, the servers' default routers.)
	GatewayClient4 = netip.MustParseAddr("10.77.1.1")
	GatewayClient6 = netip.MustParseAddr("fd77:1::1")
)

// netnsDir is where `ip netns add` bind-mounts named namespaces.
const netnsDir = "/run/netns"

// Options configures [Up].
type Options struct {
	// Prefix names the bed: its namespaces are PREFIX-client,
	// PREFIX-gateway, PREFIX-s1, PREFIX-s2, PREFIX-s3 and PREFIX-sw. It may
	// hold letters, digits, '.', '_' and '-' (at most 64 characters).
	// The zero value "" generates a fresh test prefix mtt<pid>x<4 hex
	// digits> owned by this process, which [Sweep] deletes once the
	// process is gone.
	Prefix string
}

// Bed is one testbed: six network namespaces wired as described in the
// package documentation. A Bed value is only a description (see
// [Describe]); [Up] makes it real and [Bed.Down] removes it.
type Bed struct {
	// Prefix is the namespace-name prefix of the bed.
	Prefix string
	// Client is the TCP client host, on the client net only.
	Client *Host
	// Gateway is the router between the client net and the server LAN.
	Gateway *Host
	// S1, S2 and S3 are the servers, on the server LAN and the control net.
	S1, S2, S3 *Host
	// Switch is the L2 switch namespace holding the bridges BridgeLAN and
	// BridgeCtl, whose ports are named <host>-lan / <host>-ctl (gw-lan for
	// the gateway). It has no addresses; tests may use it for tc netem on
	// a port or to cut a link.
	Switch *Host
}

// Host is one namespace of a bed.
type Host struct {
	// Name is the host's role: "client", "gateway", "s1", "s2", "s3" or "sw".
	Name string
	// NetNS is the name of the host's network namespace, PREFIX-Name.
	NetNS string
	// LAN4 and LAN6 are the host's service-network addresses: on the
	// server LAN for servers and the gateway, on the client net for the
	// client (its only addresses). Zero for the switch.
	LAN4, LAN6 netip.Addr
	// Ctl4 and Ctl6 are the host's control-network addresses. Zero for the
	// client, the gateway and the switch.
	Ctl4, Ctl6 netip.Addr

	// vm is set for the hosts of the vagrant harness (see vm.go).
	vm *vmHost
}

var prefixRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidatePrefix reports whether prefix can name a bed.
func ValidatePrefix(prefix string) error {
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("testbed: invalid bed prefix %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", prefix)
	}
	return nil
}

// Describe returns the bed that prefix names, without creating or checking
// anything: use it to reach (or [Bed.Down]) a bed made by another process.
func Describe(prefix string) *Bed {
	h := func(name string) *Host { return &Host{Name: name, NetNS: prefix + "-" + name} }
	b := &Bed{
		Prefix:  prefix,
		Client:  h(HostClient),
		Gateway: h(HostGateway),
		S1:      h(HostS1),
		S2:      h(HostS2),
		S3:      h(HostS3),
		Switch:  h(HostSwitch),
	}
	b.Client.LAN4 = netip.MustParseAddr("10.77.1.2")
	b.Client.LAN6 = netip.MustParseAddr("fd77:1::2")
	b.Gateway.LAN4 = netip.MustParseAddr("10.77.2.1")
	b.Gateway.LAN6 = netip.MustParseAddr("fd77:2::1")
	for i, s := range b.Servers() {
		n := 11 + i // s1 = .11, s2 = .12, s3 = .13
		s.LAN4 = netip.MustParseAddr(fmt.Sprintf("10.77.2.%d", n))
		s.LAN6 = netip.MustParseAddr(fmt.Sprintf("fd77:2::%d", n))
		s.Ctl4 = netip.MustParseAddr(fmt.Sprintf("10.77.3.%d", n))
		s.Ctl6 = netip.MustParseAddr(fmt.Sprintf("fd77:3::%d", n))
	}
	return b
}

// Servers returns S1, S2 and S3.
func (b *Bed) Servers() []*Host { return []*Host{b.S1, b.S2, b.S3} }

// Hosts returns every namespace of the bed: Client, Gateway, S1, S2, S3 and
// Switch.
func (b *Bed) Hosts() []*Host {
	return []*Host{b.Client, b.Gateway, b.S1, b.S2, b.S3, b.Switch}
}

// Host returns the bed's host with the given Name, or nil.
func (b *Bed) Host(name string) *Host {
	for _, h := range b.Hosts() {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// NetNSPath returns the file of the host's namespace, /run/netns/<NetNS>,
// for setns(2), `nsenter --net=` or nat/netns.Do.
//
// Under the vagrant harness the client VM's is the test process's own
// (/proc/PID/ns/net: the test binary runs in the client VM), and a remote host's (see
// [Host.Remote]) is a path that does not exist, naming the reason, so
// that entering it fails with an error that says why.
func (h *Host) NetNSPath() string {
	if h.vm != nil {
		if h.vm.local {
			// The test process's own namespace. Under this harness no
			// thread of the process ever enters another one (the
			// other hosts' paths name no file), so the thread group
			// leader's namespace is the process's.
			return fmt.Sprintf("/proc/%d/ns/net", os.Getpid())
		}
		return "/nonexistent/" + h.Name + "-is-a-separate-VM-under-" + HarnessEnv + "=" + HarnessVagrant
	}
	return filepath.Join(netnsDir, h.NetNS)
}

// Exists reports whether the host's namespace is present on this machine
// (under the vagrant harness: whether the host is a VM, not the switch,
// which that harness does not have).
func (h *Host) Exists() bool {
	if h.vm != nil {
		return !h.vm.absent
	}
	_, err := os.Stat(h.NetNSPath())
	return err == nil
}

// Run runs a command in the host's namespace with `ip netns exec` and
// returns its standard output. On failure the error names the host and the
// command and includes the command's combined output.
//
// `ip netns exec` also gives the command a private mount namespace (with
// /sys remounted for the namespace). CRIU refuses to dump a process set up
// that way: start processes that may be checkpointed with [Host.Command].
//
// Under the vagrant harness the command runs on the host's VM, over ssh
// for a remote one, as root.
func (h *Host) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	if h.vm != nil {
		return h.vm.sh(ctx, nil, shJoin(name, args))
	}
	out, err := run(ctx, nil, "ip", append([]string{"netns", "exec", h.NetNS, name}, args...)...)
	if err != nil {
		return out, fmt.Errorf("testbed: %s (netns %s): %w", h.Name, h.NetNS, err)
	}
	return out, nil
}

// Command returns a command that runs name in the host's network namespace
// only, through `nsenter --net=<NetNSPath>` (which execs name: the process's
// pid is the command's). Unlike [Host.Run] it shares the caller's mount
// namespace, so the process can be checkpointed by CRIU. The caller starts
// and waits for it; ctx kills it as exec.CommandContext does. A process
// still running when the bed goes down is killed by [Bed.Down].
//
// On a remote host of the vagrant harness the command is a local ssh
// client running the process on the VM: the command's pid is the ssh
// client's, so signal the process with [Signal] and find its pid with
// [PID]; ctx ends the remote process too, and [Bed.Down] kills what is
// left. Set the process's environment with [Host.CommandEnv].
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if h.vm != nil {
		return h.vm.command(ctx, nil, name, args)
	}
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + h.NetNSPath(), "--", name}, args...)...)
}

// Nft loads an nftables script into the host's namespace (`nft -f -`).
// The script is applied as one transaction: all of it or nothing.
func (h *Host) Nft(ctx context.Context, script string) error {
	if h.vm != nil {
		_, err := h.vm.sh(ctx, []byte(script), "nft -f -")
		return err
	}
	if _, err := run(ctx, []byte(script), "ip", "netns", "exec", h.NetNS, "nft", "-f", "-"); err != nil {
		return fmt.Errorf("testbed: %s (netns %s): %w", h.Name, h.NetNS, err)
	}
	return nil
}

// Down kills every process still inside the bed's namespaces, waits until
// they are gone and deletes the namespaces, which removes all their links,
// addresses, routes and nftables tables. Namespaces already absent are
// skipped, so Down can be called again or on a half-built bed.
//
// Under the vagrant harness Down resets the VMs instead (see [Vagrant]) and
// fails if a process the bed started or an nftables table survived.
func (b *Bed) Down(ctx context.Context) error {
	if b.Client.vm != nil {
		return b.downVMs(ctx)
	}
	var errs []error
	for _, h := range b.Hosts() {
		if err := removeNetNS(ctx, h.NetNS); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("testbed: down %s: %w", b.Prefix, err)
	}
	return nil
}

// withDefaultTimeout bounds ctx by d unless it already has a deadline.
func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

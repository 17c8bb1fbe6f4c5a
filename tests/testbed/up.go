package testbed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"
)

// settleTimeout bounds the wait for links to come up and addresses to
// become usable once everything is configured.
const settleTimeout = 20 * time.Second

// Up creates the bed named by o.Prefix and waits until every link is up and
// every address is usable (no IPv6 address tentative). If the bed exists
// already, Up checks it and repairs what is missing or wrong (namespaces,
// links, bridge ports, addresses, routes, sysctls, offload settings);
// addresses or rules that tests added are left alone. Concurrent Up calls
// on one prefix are not supported.
//
// Up turns checksum offload off on every veth end with ethtool(8) (see
// offloadFeatures) and fails, before creating anything, if ethtool is not
// installed.
//
// Without a deadline on ctx, Up gives up after two minutes. On error, Up
// deletes the namespaces it created (all of them for a new bed) and returns
// a nil Bed.
func Up(ctx context.Context, o Options) (*Bed, error) {
	ctx, cancel := withDefaultTimeout(ctx, 2*time.Minute)
	defer cancel()
	prefix := o.Prefix
	if prefix == "" {
		var err error
		if prefix, err = newTestPrefix(); err != nil {
			return nil, err
		}
	}
	if err := ValidatePrefix(prefix); err != nil {
		return nil, err
	}
	// Checked before anything is made: a bed whose checksums nobody
	// verifies would let broken rewrites pass the tests.
	if _, err := exec.LookPath("ethtool"); err != nil {
		return nil, fmt.Errorf("testbed: ethtool is required to turn off checksum offload on the bed's veths, so that every TCP checksum is really computed and verified (install the Debian package ethtool, or run tests/setup.sh): %w", err)
	}
	b := Describe(prefix)
	var created []string
	if err := up(ctx, b, &created); err != nil {
		// Clean up even if ctx is what failed.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		var errs []error
		for _, ns := range created {
			errs = append(errs, removeNetNS(cctx, ns))
		}
		if cerr := errors.Join(errs...); cerr != nil {
			err = errors.Join(err, fmt.Errorf("testbed: cleaning up after the failed up: %w", cerr))
		}
		return nil, err
	}
	return b, nil
}

// up builds or repairs b, appending the namespaces it creates to created.
func up(ctx context.Context, b *Bed, created *[]string) error {
	wrap := func(err error) error { return fmt.Errorf("testbed: up %s: %w", b.Prefix, err) }
	for _, h := range b.Hosts() {
		if h.Exists() {
			continue
		}
		// Counted before it runs: killed half-way, ip may leave the
		// namespace (or its file) behind.
		*created = append(*created, h.NetNS)
		if _, err := run(ctx, nil, "ip", "netns", "add", h.NetNS); err != nil {
			return wrap(err)
		}
	}
	// Sysctls before links: new interfaces copy the "default" values, so
	// link-local addresses skip DAD and the switch's ports have no IPv6.
	for _, h := range b.Hosts() {
		if err := sysctl(ctx, h, globalSysctls(b, h)); err != nil {
			return wrap(err)
		}
	}
	if err := ensureVeths(ctx, b); err != nil {
		return wrap(err)
	}
	if err := offloadOff(ctx, b); err != nil {
		return wrap(err)
	}
	if err := batch(ctx, b.Switch, switchBatch(ctx, b)); err != nil {
		return wrap(err)
	}
	for _, h := range b.Hosts() {
		if h == b.Switch {
			continue
		}
		have, err := links(ctx, h)
		if err != nil {
			return wrap(err)
		}
		if err := batch(ctx, h, hostBatch(b, h, have)); err != nil {
			return wrap(err)
		}
		// Interfaces made by an earlier Up, or repaired ones, need their
		// own values too (for send_redirects "all" OR "interface" counts).
		if err := sysctl(ctx, h, interfaceSysctls(b, h)); err != nil {
			return wrap(err)
		}
	}
	if err := waitSettled(ctx, b); err != nil {
		return wrap(err)
	}
	return nil
}

var (
	prefixMu     sync.Mutex
	prefixesMade = map[string]bool{} // test prefixes handed out by this process
)

// newTestPrefix returns a fresh test prefix mtt<pid>x<hex> that no bed on
// this machine uses and that this process has not handed out before.
func newTestPrefix() (string, error) {
	prefixMu.Lock()
	defer prefixMu.Unlock()
	for range 1000 {
		p := fmt.Sprintf("mtt%dx%04x", os.Getpid(), rand.N(0x10000))
		if prefixesMade[p] || slices.ContainsFunc(Describe(p).Hosts(), (*Host).Exists) {
			continue
		}
		prefixesMade[p] = true
		return p, nil
	}
	return "", errors.New("testbed: no free test prefix left for this process")
}

// ifaceSpec is one interface of a host and the addresses it must carry.
type ifaceSpec struct {
	name  string
	addrs []netip.Prefix
}

func pfx(a netip.Addr, net netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(a, net.Bits())
}

// interfaces returns the addressed interfaces of a host (none for the switch).
func interfaces(b *Bed, h *Host) []ifaceSpec {
	switch {
	case h == b.Client:
		return []ifaceSpec{{IfLAN, []netip.Prefix{pfx(h.LAN4, ClientNet4), pfx(h.LAN6, ClientNet6)}}}
	case h == b.Gateway:
		return []ifaceSpec{
			{IfGatewayClient, []netip.Prefix{pfx(GatewayClient4, ClientNet4), pfx(GatewayClient6, ClientNet6)}},
			{IfGatewayLAN, []netip.Prefix{pfx(h.LAN4, LANNet4), pfx(h.LAN6, LANNet6)}},
		}
	case h == b.Switch:
		return nil
	default: // a server
		return []ifaceSpec{
			{IfLAN, []netip.Prefix{pfx(h.LAN4, LANNet4), pfx(h.LAN6, LANNet6)}},
			{IfCtl, []netip.Prefix{pfx(h.Ctl4, CtlNet4), pfx(h.Ctl6, CtlNet6)}},
		}
	}
}

// veth is a veth pair, each end created directly in its namespace.
type veth struct {
	a      *Host
	aIf    string
	b      *Host
	bIf    string
	bridge string // the bridge in the switch the b end is a port of, if any
}

func veths(b *Bed) []veth {
	v := []veth{
		{b.Client, IfLAN, b.Gateway, IfGatewayClient, ""},
		{b.Gateway, IfGatewayLAN, b.Switch, "gw-lan", BridgeLAN},
	}
	for _, s := range b.Servers() {
		v = append(v,
			veth{s, IfLAN, b.Switch, s.Name + "-lan", BridgeLAN},
			veth{s, IfCtl, b.Switch, s.Name + "-ctl", BridgeCtl})
	}
	return v
}

// ipLink is one interface of `ip -d -j addr show`.
type ipLink struct {
	IfName    string `json:"ifname"`
	OperState string `json:"operstate"`
	Master    string `json:"master"`
	LinkInfo  struct {
		InfoKind string `json:"info_kind"`
	} `json:"linkinfo"`
	AddrInfo []ipAddr `json:"addr_info"`
}

// ipAddr is one address of an ipLink.
type ipAddr struct {
	Family    string `json:"family"`
	Local     string `json:"local"`
	PrefixLen int    `json:"prefixlen"`
	Scope     string `json:"scope"`
	Tentative bool   `json:"tentative"`
	DADFailed bool   `json:"dadfailed"`
}

func isLinkLocal6(a ipAddr) bool { return a.Family == "inet6" && a.Scope == "link" }

// links returns the interfaces of a host's namespace by name.
func links(ctx context.Context, h *Host) (map[string]ipLink, error) {
	out, err := run(ctx, nil, "ip", "-n", h.NetNS, "-d", "-j", "addr", "show")
	if err != nil {
		return nil, err
	}
	var ls []ipLink
	if err := json.Unmarshal(out, &ls); err != nil {
		return nil, fmt.Errorf("ip -n %s -j addr show: %w", h.NetNS, err)
	}
	m := make(map[string]ipLink, len(ls))
	for _, l := range ls {
		m[l.IfName] = l
	}
	return m, nil
}

// ensureVeths creates the veth pairs that are missing and replaces those
// that lost an end or are not veths.
func ensureVeths(ctx context.Context, b *Bed) error {
	have := map[*Host]map[string]ipLink{}
	for _, h := range b.Hosts() {
		ls, err := links(ctx, h)
		if err != nil {
			return err
		}
		have[h] = ls
	}
	for _, v := range veths(b) {
		la, okA := have[v.a][v.aIf]
		lb, okB := have[v.b][v.bIf]
		if okA && okB && la.LinkInfo.InfoKind == "veth" && lb.LinkInfo.InfoKind == "veth" {
			continue
		}
		// Deleting one end of a veth deletes its peer, wherever it is.
		if okA {
			if _, err := run(ctx, nil, "ip", "-n", v.a.NetNS, "link", "del", v.aIf); err != nil {
				return err
			}
		}
		if okB {
			if _, err := run(ctx, nil, "ip", "-n", v.b.NetNS, "link", "del", v.bIf); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
				return err
			}
		}
		// Both ends are born in their namespaces: nothing ever exists
		// in the root namespace, even for a moment.
		if _, err := run(ctx, nil, "ip", "-n", v.a.NetNS, "link", "add", v.aIf, "type", "veth", "peer", "name", v.bIf, "netns", v.b.NetNS); err != nil {
			return err
		}
	}
	return nil
}

// offloadFeatures are the ethtool features turned off on every veth end,
// so that checksums are computed and verified as on a real wire.
//
// With TX checksum offload on (the veth default), the kernel hands a
// locally made segment to the peer as CHECKSUM_PARTIAL, with only the
// pseudo-header sum in its checksum field, and the receiving namespace
// trusts it without verifying: an nftables address rewrite with a wrong
// checksum fix-up would go unnoticed. With it off, the sending veth
// completes the checksum in software and the receiver verifies it
// (since Linux 4.4 veth no longer marks such packets as verified).
// Turning "tx" off also takes TSO off with it (TSO needs checksum
// offload); "tso off" says so explicitly, so ethtool reports no feature
// as "requested on". GRO is off by default on veths; it is pinned off
// because a forwarding host would merge segments into a CHECKSUM_PARTIAL
// packet, whose rewrite then needs only the pseudo-header part of the
// fix-up. GSO stays on: it is software segmentation at transmit, which
// computes each segment's full checksum itself once the device cannot.
var offloadFeatures = []string{"tx", "off", "tso", "off", "gro", "off"}

// offloadOff applies offloadFeatures to both ends of every veth.
// `ethtool -K` is idempotent, so Up repairs ends turned back on.
func offloadOff(ctx context.Context, b *Bed) error {
	for _, v := range veths(b) {
		for _, end := range []struct {
			h   *Host
			ifc string
		}{{v.a, v.aIf}, {v.b, v.bIf}} {
			if _, err := end.h.Run(ctx, "ethtool", append([]string{"-K", end.ifc}, offloadFeatures...)...); err != nil {
				return fmt.Errorf("turning checksum offload off: %w", err)
			}
		}
	}
	return nil
}

// switchBatch makes the two bridges and attaches their ports.
func switchBatch(ctx context.Context, b *Bed) []string {
	have, _ := links(ctx, b.Switch) // a failure shows up as a batch error
	cmds := []string{"link set lo up"}
	for _, br := range []string{BridgeLAN, BridgeCtl} {
		if l, ok := have[br]; !ok || l.LinkInfo.InfoKind != "bridge" {
			if ok {
				cmds = append(cmds, "link del "+br)
			}
			cmds = append(cmds, "link add "+br+" type bridge")
		}
		// No STP: ports forward at once. No multicast snooping: with no
		// MLD querier on the LAN it could stop IPv6 neighbour
		// discovery's multicast from being flooded.
		cmds = append(cmds, "link set "+br+" type bridge stp_state 0 mcast_snooping 0")
	}
	for _, v := range veths(b) {
		if v.bridge != "" {
			cmds = append(cmds, "link set "+v.bIf+" master "+v.bridge, "link set "+v.bIf+" up")
		}
	}
	return append(cmds, "link set "+BridgeLAN+" up", "link set "+BridgeCtl+" up")
}

// hostBatch brings a host's links up and sets its addresses and routes.
// Every command is idempotent (replace), so it also repairs. have is the
// host's current interfaces.
func hostBatch(b *Bed, h *Host, have map[string]ipLink) []string {
	cmds := []string{"link set lo up"}
	for _, ifc := range interfaces(b, h) {
		if !slices.ContainsFunc(have[ifc.name].AddrInfo, isLinkLocal6) {
			// The kernel makes the IPv6 link-local address when the
			// link comes up: bounce a link that lost it (new links
			// are down anyway).
			cmds = append(cmds, "link set "+ifc.name+" down")
		}
		// Up before addresses: routes through a gateway need the
		// connected route, which exists only on an up link.
		cmds = append(cmds, "link set "+ifc.name+" up")
		for _, a := range ifc.addrs {
			c := "addr replace " + a.String() + " dev " + ifc.name
			if a.Addr().Is6() {
				c += " nodad" // usable at once; addresses are unique by construction
			}
			cmds = append(cmds, c)
		}
	}
	var gw4, gw6 netip.Addr
	switch {
	case h == b.Client:
		gw4, gw6 = GatewayClient4, GatewayClient6
	case h == b.Gateway:
		// The gateway has no default route: nothing leaves the bed.
	default:
		gw4, gw6 = b.Gateway.LAN4, b.Gateway.LAN6
	}
	if gw4.IsValid() {
		cmds = append(cmds,
			"route replace default via "+gw4.String()+" dev "+IfLAN,
			"route replace ::/0 via "+gw6.String()+" dev "+IfLAN)
	}
	return cmds
}

// batch runs ip commands in a host's namespace in one ip process.
func batch(ctx context.Context, h *Host, cmds []string) error {
	if _, err := run(ctx, []byte(strings.Join(cmds, "\n")+"\n"), "ip", "-n", h.NetNS, "-batch", "-"); err != nil {
		return fmt.Errorf("%s (netns %s): %w\nbatch was:\n%s", h.Name, h.NetNS, err, strings.Join(cmds, "\n"))
	}
	return nil
}

// globalSysctls are the namespace-wide settings of a host.
func globalSysctls(b *Bed, h *Host) []string {
	if h == b.Switch {
		// A switch: no IPv6 addresses, router solicitations or MLD
		// reports of its own on the segments.
		return []string{"net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"}
	}
	s := []string{
		// No DAD: link-local addresses are usable as soon as the link
		// is up (global ones are added with nodad).
		"net.ipv6.conf.all.accept_dad=0",
		"net.ipv6.conf.default.accept_dad=0",
	}
	if h == b.Client {
		return s
	}
	s = append(s,
		"net.ipv4.ip_forward=1",
		"net.ipv6.conf.all.forwarding=1",
		"net.ipv4.conf.all.accept_redirects=0",
		"net.ipv4.conf.default.accept_redirects=0",
		"net.ipv6.conf.all.accept_redirects=0",
		"net.ipv6.conf.default.accept_redirects=0",
		// Steering makes paths asymmetric (s2 answers for s1's flows):
		// pin reverse-path filtering off instead of inheriting the
		// machine's setting.
		"net.ipv4.conf.all.rp_filter=0",
		"net.ipv4.conf.default.rp_filter=0",
	)
	if h == b.Gateway {
		return s
	}
	// Servers forward steered flows back out of the interface they came
	// in on; an ICMP redirect would send the client's router around them.
	return append(s,
		"net.ipv4.conf.all.send_redirects=0",
		"net.ipv4.conf.default.send_redirects=0")
}

// interfaceSysctls repeats the per-interface settings for each interface,
// for interfaces created before the defaults were set.
func interfaceSysctls(b *Bed, h *Host) []string {
	if h == b.Client || h == b.Switch {
		return nil
	}
	var s []string
	for _, ifc := range interfaces(b, h) {
		s = append(s,
			"net.ipv4.conf."+ifc.name+".accept_redirects=0",
			"net.ipv4.conf."+ifc.name+".rp_filter=0")
		if h != b.Gateway {
			s = append(s, "net.ipv4.conf."+ifc.name+".send_redirects=0")
		}
	}
	return s
}

// sysctl sets kernel parameters in a host's namespace: /proc/sys/net is
// per network namespace, read through the namespace of the process.
func sysctl(ctx context.Context, h *Host, settings []string) error {
	if len(settings) == 0 {
		return nil
	}
	_, err := h.Run(ctx, "sysctl", append([]string{"-q", "-w"}, settings...)...)
	return err
}

// waitSettled polls until every link of the bed is up and every address is
// present and usable.
func waitSettled(ctx context.Context, b *Bed) error {
	for _, h := range b.Hosts() {
		err := poll(ctx, settleTimeout, "the links and addresses of "+h.Name+" (netns "+h.NetNS+")", func(ctx context.Context) (bool, string, error) {
			ls, err := links(ctx, h)
			if err != nil {
				return false, "", err
			}
			if h == b.Switch {
				return switchSettled(b, ls)
			}
			return hostSettled(b, h, ls)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func switchSettled(b *Bed, ls map[string]ipLink) (bool, string, error) {
	for _, br := range []string{BridgeLAN, BridgeCtl} {
		if l := ls[br]; l.OperState != "UP" {
			return false, fmt.Sprintf("bridge %s is %q", br, l.OperState), nil
		}
	}
	for _, v := range veths(b) {
		if v.bridge == "" {
			continue
		}
		l, ok := ls[v.bIf]
		if !ok || l.Master != v.bridge {
			return false, "", fmt.Errorf("port %s is not in bridge %s", v.bIf, v.bridge)
		}
		if l.OperState != "UP" {
			return false, fmt.Sprintf("port %s is %q", v.bIf, l.OperState), nil
		}
	}
	return true, "", nil
}

func hostSettled(b *Bed, h *Host, ls map[string]ipLink) (bool, string, error) {
	for _, ifc := range interfaces(b, h) {
		l, ok := ls[ifc.name]
		if !ok {
			return false, "", fmt.Errorf("interface %s is missing", ifc.name)
		}
		if l.OperState != "UP" {
			return false, fmt.Sprintf("%s is %q", ifc.name, l.OperState), nil
		}
		linkLocal := false
		for _, a := range l.AddrInfo {
			if a.DADFailed {
				return false, "", fmt.Errorf("%s: duplicate address detection failed for %s", ifc.name, a.Local)
			}
			if a.Tentative {
				return false, fmt.Sprintf("%s: %s is tentative", ifc.name, a.Local), nil
			}
			if isLinkLocal6(a) {
				linkLocal = true
			}
		}
		if !linkLocal {
			return false, ifc.name + " has no IPv6 link-local address yet", nil
		}
		for _, want := range ifc.addrs {
			if !slices.ContainsFunc(l.AddrInfo, func(a ipAddr) bool {
				return a.Local == want.Addr().String() && a.PrefixLen == want.Bits()
			}) {
				return false, "", fmt.Errorf("%s lacks address %s", ifc.name, want)
			}
		}
	}
	return true, "", nil
}

package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mtcp-dev/mtcp/internal/yamlerr"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/policy"
	"github.com/mtcp-dev/mtcp/repair"
	"go.yaml.in/yaml/v3"
)

// Config is mtcpd's configuration file (YAML). Unknown keys are errors.
type Config struct {
	// Name is this server's identity in the pool; it must match the name
	// in its certificate.
	Name string `yaml:"name"`
	// Role is "server" (default) or "gateway" (a router in front of the
	// pool that steers flows for the servers).
	Role string `yaml:"role"`
	// ServiceAddrs are this host's own addresses on the service network,
	// one per family: restored connections get them as local address.
	ServiceAddrs []netip.Addr `yaml:"service_addrs"`
	// PeerListen is where the peer control channel listens (TCP, mutual
	// TLS); the control network may differ from the service network.
	PeerListen string `yaml:"peer_listen"`
	// Peers are the other members of the pool.
	Peers []PeerConfig `yaml:"peers"`
	// TLS names the pool CA and this server's certificate and key (PEM).
	// They are reloaded on SIGHUP and when one of them changes.
	TLS TLSConfig `yaml:"tls"`
	// Steering is "forward" (default: the host that owns the service
	// address forwards the flow) or "gateway" (the gateway named by
	// Gateway steers it).
	Steering string `yaml:"steering"`
	// Gateway is the peer name of the gateway, with steering: gateway.
	Gateway string `yaml:"gateway"`
	// AdminSocket is the root-only unix socket of mtcpctl; default
	// /run/mtcp/admin.sock.
	AdminSocket string `yaml:"admin_socket"`
	// AppSocket is where applications register; default
	// /run/mtcp/app.sock.
	AppSocket string `yaml:"app_socket"`
	// Metrics is the Prometheus listen address; "" disables it.
	Metrics string `yaml:"metrics"`
	// NFQueue is the NFQUEUE number held packets wait in; default 7.
	NFQueue uint16 `yaml:"nfqueue"`
	// Table is the nftables table mtcp owns; default "mtcp".
	Table string `yaml:"table"`
	// FlowIdle is how long a migrated connection's rules (forwarding,
	// reply rewrite) stay without a packet of it before the kernel
	// removes them: the safety net for rules whose end the daemons missed
	// (a host that died). The daemon where a connection lives refreshes
	// its rules while it lives (refresh.go), so that a silent one keeps
	// them. Default DefaultFlowIdle; at least a second, e.g. "24h".
	FlowIdle time.Duration `yaml:"flow_idle"`
	// Policy is the policy file (see package policy) the daemon runs;
	// "" runs none. It is reloaded on SIGHUP and when it changes.
	Policy string `yaml:"policy"`
	// Load says how this server's load is measured (load.go).
	Load LoadOptions `yaml:"load"`
	// Marks are the packet mark bits mtcp uses.
	Marks MarksConfig `yaml:"marks"`
	// ProcessPages says how process mode moves memory: "lazy" (the
	// default) restores the process on the target first and sends its
	// pages after, on demand and in the background (post-copy); "eager"
	// sends every page before the restore.
	ProcessPages string `yaml:"process_pages"`
}

// PeerConfig is one other member of the pool.
type PeerConfig struct {
	Name string `yaml:"name"`
	// Addr is the peer's control-channel address (host:port).
	Addr string `yaml:"addr"`
	// ServiceAddrs are the peer's addresses on the service network.
	ServiceAddrs []netip.Addr `yaml:"service_addrs"`
}

// MarksConfig are the packet mark bits (SO_MARK, a firewall's "meta
// mark") mtcp sets, each over a packet's or socket's own mark, which is
// kept. Change them only if another tool on the host uses these bits; all
// the pool's daemons need not agree, as the bits never leave the host
// (they are not on the wire).
type MarksConfig struct {
	// Inject lets a packet past mtcp's holds: the held client packets
	// mtcp releases carry it, and so do the segments it sends to
	// restored sockets. One bit; default 0x10000000 (bit 28).
	Inject uint32 `yaml:"inject"`
	// Quiet is set on sockets that must not be heard yet (a restored or
	// frozen socket in repair mode): mtcp's table drops what they send.
	// One bit, not Inject's; default 0x20000000 (bit 29).
	Quiet uint32 `yaml:"quiet"`
}

// repair returns m as repair's Marks.
func (m MarksConfig) repair() repair.Marks { return repair.Marks{Inject: m.Inject, Quiet: m.Quiet} }

// TLSConfig names PEM files.
type TLSConfig struct {
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// Defaults for empty fields.
const (
	DefaultAdminSocket = "/run/mtcp/admin.sock"
	DefaultAppSocket   = "/run/mtcp/app.sock"
	DefaultNFQueue     = 7
	DefaultTable       = "mtcp"
	// DefaultFlowIdle is a day: how long rules whose end was missed
	// stay (a refresh every six hours).
	DefaultFlowIdle = 24 * time.Hour
)

// maxSocketPath is the longest path a unix socket may be bound to
// (sun_path's 108 bytes, less the terminating NUL).
const maxSocketPath = 107

// LoadConfig reads and validates a configuration file. Relative paths of
// the files it names (tls, policy) are taken from the file's directory,
// not from mtcpd's working directory, so that a file checked in one
// directory loads the same from another (systemd starts mtcpd in /).
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	for _, p := range []*string{&c.TLS.CA, &c.TLS.Cert, &c.TLS.Key, &c.Policy} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	return c, nil
}

// ParseConfig parses a configuration, fills in defaults and validates it.
// Errors carry the line number where the YAML decoder knows it.
func ParseConfig(b []byte) (*Config, error) {
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var c Config
	if err := dec.Decode(&c); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("the configuration is empty: it needs at least name, service_addrs, peer_listen, peers and tls")
		}
		// "field x not found in type daemon.Config": the type means
		// nothing to an operator.
		return nil, yamlerr.Explain(yamlerr.Place(b, err))
	}
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) && !yamlerr.Empty(&more) {
		return nil, fmt.Errorf("line %d: a second YAML document (---): the configuration is one document", more.Line)
	}
	if c.Role == "" {
		c.Role = "server"
	}
	if c.Steering == "" {
		c.Steering = "forward"
	}
	if c.AdminSocket == "" {
		c.AdminSocket = DefaultAdminSocket
	}
	if c.AppSocket == "" {
		c.AppSocket = DefaultAppSocket
	}
	if c.NFQueue == 0 {
		c.NFQueue = DefaultNFQueue
	}
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.FlowIdle == 0 {
		c.FlowIdle = DefaultFlowIdle
	}
	if c.ProcessPages == "" {
		c.ProcessPages = "lazy"
	}
	m := c.Marks.repair().OrDefault()
	c.Marks = MarksConfig{Inject: m.Inject, Quiet: m.Quiet}
	return &c, c.validate()
}

func (c *Config) validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if c.Name == "" {
		bad("name: missing (this server's identity, as in its certificate)")
	} else if err := peer.CheckName(c.Name); err != nil {
		bad("name: %v (it names certificates and files)", err)
	}
	if c.Role != "server" && c.Role != "gateway" {
		bad("role: %q is not server or gateway", c.Role)
	}
	if c.Steering != "forward" && c.Steering != "gateway" {
		bad("steering: %q is not forward or gateway", c.Steering)
	}
	if c.ProcessPages != "lazy" && c.ProcessPages != "eager" {
		bad("process_pages: %q is not lazy or eager", c.ProcessPages)
	}
	if c.Steering == "gateway" && c.Gateway == "" {
		bad("gateway: missing (steering: gateway needs the gateway's peer name)")
	}
	if c.Role == "server" && len(c.ServiceAddrs) == 0 {
		bad("service_addrs: missing (this host's addresses on the service network)")
	}
	if c.PeerListen == "" {
		bad("peer_listen: missing (host:port of the control channel)")
	} else if err := checkHostPort(c.PeerListen); err != nil {
		bad("peer_listen: %v", err)
	}
	if c.Metrics != "" {
		if err := checkHostPort(c.Metrics); err != nil {
			bad("metrics: %v", err)
		}
	}
	if err := (nat.Options{Table: c.Table, Queue: c.NFQueue}).Check(); err != nil {
		bad("table: %v", err)
	}
	if err := c.Marks.repair().Check(); err != nil {
		bad("marks: %v", err)
	}
	if c.FlowIdle < time.Second {
		bad("flow_idle: %v: at least 1s (it is how long a silent connection keeps its rules)", c.FlowIdle)
	}
	owned := map[netip.Addr]string{}
	own := func(who string, as []netip.Addr) {
		fams := map[bool]bool{}
		for _, a := range as {
			switch {
			case !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.Is4In6():
				bad("%s: service address %v is not a host's unicast address", who, a)
			case a.IsLoopback() || a.IsLinkLocalUnicast():
				bad("%s: service address %v cannot be reached from another host (loopback or link-local)", who, a)
			case fams[a.Is6()]:
				bad("%s: two service addresses of one family (%v): one per family is used", who, a)
			case owned[a] != "":
				bad("%s: service address %v is %s's too", who, a, owned[a])
			}
			fams[a.Is6()] = true
			if owned[a] == "" {
				owned[a] = who
			}
		}
	}
	own(c.Name, c.ServiceAddrs)
	if c.TLS.CA == "" || c.TLS.Cert == "" || c.TLS.Key == "" {
		bad("tls: ca, cert and key are all required (the control channel is mutual TLS)")
	}
	if len(c.Peers) == 0 {
		bad("peers: none: a pool needs at least one other member to move connections to")
	}
	if c.Role == "server" && c.Steering == "gateway" && c.Gateway == c.Name {
		bad("gateway: %q is this server: the gateway is another host, whose mtcpd has role: gateway", c.Gateway)
	}
	names := map[string]bool{c.Name: true}
	for i, p := range c.Peers {
		switch {
		case p.Name == "":
			bad("peers[%d]: name missing", i)
		case names[p.Name]:
			bad("peers[%d]: name %q used twice", i, p.Name)
		default:
			if err := peer.CheckName(p.Name); err != nil {
				bad("peers[%d]: name %v", i, err)
			}
		}
		names[p.Name] = true
		if p.Addr == "" {
			bad("peers[%d] (%s): addr missing", i, p.Name)
		} else if err := checkHostPort(p.Addr); err != nil {
			bad("peers[%d] (%s): addr: %v", i, p.Name, err)
		} else if p.Addr == c.PeerListen {
			bad("peers[%d] (%s): addr %s is this server's own peer_listen", i, p.Name, p.Addr)
		}
		if len(p.ServiceAddrs) == 0 && p.Name != c.Gateway {
			// The steering point and the target check flows against them.
			bad("peers[%d] (%s): service_addrs missing (the addresses its clients dial; every server of the pool lists every other's)", i, p.Name)
		}
		own(p.Name, p.ServiceAddrs)
	}
	if c.Steering == "gateway" && !names[c.Gateway] {
		bad("gateway: %q is not one of the peers", c.Gateway)
	}
	if err := c.Load.check(); err != nil {
		errs = append(errs, err)
	}
	if c.Policy != "" && c.Role != "server" {
		bad("policy: only a server runs a policy (role is %s)", c.Role)
	}
	for _, s := range []struct{ key, path string }{{"admin_socket", c.AdminSocket}, {"app_socket", c.AppSocket}} {
		switch {
		case !strings.HasPrefix(s.path, "/"):
			bad("%s: %q must be absolute", s.key, s.path)
		case strings.HasSuffix(s.path, "/"):
			bad("%s: %q is a directory: name the socket file in it", s.key, s.path)
		case len(s.path) > maxSocketPath:
			bad("%s: %q is %d bytes long: a unix socket's path takes at most %d", s.key, s.path, len(s.path), maxSocketPath)
		}
	}
	if c.AdminSocket == c.AppSocket {
		bad("app_socket: %q is admin_socket too: they must differ", c.AppSocket)
	}
	if c.Metrics != "" && c.Metrics == c.PeerListen {
		bad("metrics: %q is peer_listen too: they must differ", c.Metrics)
	}
	return errors.Join(errs...)
}

// checkHostPort checks a host:port the daemon listens on or dials.
func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %w", s, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("%q: port %q is not a number from 1 to 65535", s, port)
	}
	if host == "" {
		return nil // every address
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if strings.ContainsAny(host, " /:") || strings.Trim(host, "0123456789.") == "" {
		return fmt.Errorf("%q: %q is neither an IP address nor a host name", s, host)
	}
	return nil
}

// CheckFiles loads what the configuration names, as the daemon will at
// start: its certificate and key against the pool CA (issued to its
// name, the key readable by root only), and its policy file.
func (c *Config) CheckFiles() error {
	var errs []error
	if _, err := (peer.TLSFiles{CA: c.TLS.CA, Cert: c.TLS.Cert, Key: c.TLS.Key}).Config(c.Name); err != nil {
		errs = append(errs, fmt.Errorf("tls: %w", err))
	}
	if c.Policy != "" {
		pol, err := policy.LoadFile(c.Policy)
		if err == nil {
			if err = c.CheckPolicy(pol); err != nil {
				err = fmt.Errorf("policy %s: %w", c.Policy, err)
			}
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// CheckPolicy checks that the servers a policy names (maintenance,
// weights, targets) are this one or its peers (policy.Policy.CheckPool).
func (c *Config) CheckPolicy(pol *policy.Policy) error {
	pool := []string{c.Name}
	for _, p := range c.Peers {
		pool = append(pool, p.Name)
	}
	return pol.CheckPool(pool)
}

// Peer returns the named peer's configuration.
func (c *Config) Peer(name string) (PeerConfig, bool) {
	for _, p := range c.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return PeerConfig{}, false
}

// ServiceAddr returns this host's service address of the family of a.
func (c *Config) ServiceAddr(v6 bool) (netip.Addr, bool) {
	return pickFamily(c.ServiceAddrs, v6)
}

func pickFamily(as []netip.Addr, v6 bool) (netip.Addr, bool) {
	for _, a := range as {
		if a.Is6() == v6 && !a.Is4In6() {
			return a, true
		}
	}
	return netip.Addr{}, false
}

package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/policy"
)

const goodConfig = `
name: s1
service_addrs: [10.77.2.11, "fd77:2::11"]
peer_listen: 10.77.3.11:7700
peers:
  - name: s2
    addr: 10.77.3.12:7700
    service_addrs: [10.77.2.12]
tls: {ca: /etc/mtcp/ca.pem, cert: /etc/mtcp/s1.pem, key: /etc/mtcp/s1-key.pem}
`

func TestParseConfig(t *testing.T) {
	c, err := ParseConfig([]byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	for _, tail := range []string{"---\n", "---\n# nothing more\n", "...\n"} {
		if _, err := ParseConfig([]byte(goodConfig + tail)); err != nil {
			t.Errorf("a trailing %q: %v", tail, err)
		}
	}
	if c.Steering != "forward" || c.AdminSocket != DefaultAdminSocket || c.NFQueue != DefaultNFQueue || c.Role != "server" || c.ProcessPages != "lazy" || c.FlowIdle != DefaultFlowIdle {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if c.Marks != (MarksConfig{Inject: 1 << 28, Quiet: 1 << 29}) {
		t.Fatalf("default marks %+v", c.Marks)
	}
	if m, err := ParseConfig([]byte(goodConfig + "marks: {inject: 0x40000000, quiet: 0x1000}\n")); err != nil || m.Marks != (MarksConfig{Inject: 1 << 30, Quiet: 1 << 12}) {
		t.Fatalf("marks in hex: %+v, %v", m.Marks, err)
	}
	if a, ok := c.ServiceAddr(true); !ok || a.String() != "fd77:2::11" {
		t.Fatalf("ServiceAddr(v6) = %v", a)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown key", goodConfig + "colour: blue\n", "line 10: field colour not found (unknown key)"},
		{"empty", "", "the configuration is empty"},
		{"two documents", goodConfig + "---\nname: s9\n", "a second YAML document"},
		{"bad address", strings.Replace(goodConfig, "10.77.2.11,", "10.77.2.300,", 1), "10.77.2.300"},
		{"no tls", strings.Replace(goodConfig, "tls: {ca: /etc/mtcp/ca.pem, ", "tls: {", 1), "tls: ca, cert and key"},
		{"bad steering", goodConfig + "steering: sideways\n", `steering: "sideways"`},
		{"bad name", strings.Replace(goodConfig, "name: s1\n", "name: s1/../x\n", 1), `name: "s1/../x": character '/' not allowed`},
		{"bad peer name", strings.Replace(goodConfig, "name: s2\n", "name: s2!\n", 1), `peers[0]: name "s2!": character '!' not allowed`},
		{"bad process pages", goodConfig + "process_pages: later\n", `process_pages: "later" is not lazy or eager`},
		{"gateway unknown", goodConfig + "steering: gateway\ngateway: gw\n", `"gw" is not one of the peers`},
		{"peer_listen not host:port", strings.Replace(goodConfig, "peer_listen: 10.77.3.11:7700", "peer_listen: localhost", 1), "peer_listen: \"localhost\" is not host:port"},
		{"peer_listen bad port", strings.Replace(goodConfig, "peer_listen: 10.77.3.11:7700", "peer_listen: 10.77.3.11:77777", 1), "port \"77777\""},
		{"peer_listen bad host", strings.Replace(goodConfig, "peer_listen: 10.77.3.11:7700", "peer_listen: 999.1.1.1:7700", 1), "neither an IP address nor a host name"},
		{"metrics", goodConfig + "metrics: notanaddr\n", "metrics: \"notanaddr\" is not host:port"},
		{"peer addr", strings.Replace(goodConfig, "addr: 10.77.3.12:7700", "addr: nowhere", 1), "peers[0] (s2): addr"},
		{"table name", goodConfig + "table: \"bad table\"\n", "table: nat: table name"},
		{"mark of two bits", goodConfig + "marks: {inject: 0x3}\n", "marks: marks 0x3 and 0x20000000: each must be one bit"},
		{"one mark twice", goodConfig + "marks: {inject: 0x20000000}\n", "marks: inject and quiet mark are both 0x20000000"},
		{"mark not a number", goodConfig + "marks: {quiet: high}\n", "high"},
		{"flow idle too short", goodConfig + "flow_idle: 10ms\n", "flow_idle: 10ms: at least 1s"},
		{"flow idle not a duration", goodConfig + "flow_idle: forever\n", "forever"},
		{"two IPv4 service addresses", strings.Replace(goodConfig, "[10.77.2.11,", "[10.77.2.11, 10.77.2.21,", 1), "two service addresses of one family"},
		{"a peer without service addresses", strings.Replace(goodConfig, "    service_addrs: [10.77.2.12]\n", "", 1), "peers[0] (s2): service_addrs missing"},
		{"a peer's service address", strings.Replace(goodConfig, "service_addrs: [10.77.2.12]", "service_addrs: [10.77.2.11]", 1), "service address 10.77.2.11 is s1's too"},
		{"a bad peer address, placed", strings.Replace(goodConfig, "service_addrs: [10.77.2.12]", `service_addrs: [10.77.2.12, "fd77:2::12::"]`, 1), `line 8: peers[0].service_addrs[1]: ParseAddr("fd77:2::12::")`},
		{"a prefix for an address, placed", strings.Replace(goodConfig, "[10.77.2.11,", "[10.77.2.11/24,", 1), `line 3: service_addrs[0]: ParseAddr("10.77.2.11/24")`},
		{"loopback service address", strings.Replace(goodConfig, "[10.77.2.11,", "[127.0.0.1,", 1), "service address 127.0.0.1 cannot be reached from another host"},
		{"link-local service address", strings.Replace(goodConfig, `"fd77:2::11"`, `"fe80::1"`, 1), "service address fe80::1 cannot be reached"},
		{"no peers", goodConfig[:strings.Index(goodConfig, "peers:")] + "peers: []\n" + goodConfig[strings.Index(goodConfig, "tls:"):], "peers: none"},
		{"a peer at our own address", strings.Replace(goodConfig, "addr: 10.77.3.12:7700", "addr: 10.77.3.11:7700", 1), "peers[0] (s2): addr 10.77.3.11:7700 is this server's own peer_listen"},
		{"a server its own gateway", goodConfig + "steering: gateway\ngateway: s1\n", `gateway: "s1" is this server`},
		{"one socket for both", goodConfig + "admin_socket: /run/mtcp/x.sock\napp_socket: /run/mtcp/x.sock\n", "app_socket: \"/run/mtcp/x.sock\" is admin_socket too"},
		{"socket path a directory", goodConfig + "admin_socket: /run/mtcp/\n", "admin_socket: \"/run/mtcp/\" is a directory"},
		{"socket path too long", goodConfig + "admin_socket: /run/" + strings.Repeat("x", 110) + "\n", "a unix socket's path takes at most 107"},
		{"metrics on the peer port", goodConfig + "metrics: 10.77.3.11:7700\n", "metrics: \"10.77.3.11:7700\" is peer_listen too"},
	} {
		if tc.want == "" {
			continue
		}
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want it to mention %q", tc.name, err, tc.want)
		}
	}
}

// TestCheckFiles: mtcpd -check loads the TLS files as the daemon will, so
// that a key readable by others or a certificate of another member fails
// there rather than at start.
func TestCheckFiles(t *testing.T) {
	dir := t.TempDir()
	ca, err := peer.NewCA("test-pool", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _ := ca.PEM()
	write := func(name string, data []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, name := range []string{"s1", "s2"} {
		cert, key, err := ca.Issue(name, nil, nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		write(name+".pem", cert, 0o644)
		write(name+"-key.pem", key, 0o600)
	}
	write("ca.pem", caPEM, 0o644)
	c := &Config{Name: "s1", TLS: TLSConfig{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "s1.pem"), Key: filepath.Join(dir, "s1-key.pem")}}
	if err := c.CheckFiles(); err != nil {
		t.Fatalf("good files: %v", err)
	}
	other := *c
	other.TLS.Cert, other.TLS.Key = filepath.Join(dir, "s2.pem"), filepath.Join(dir, "s2-key.pem")
	if err := other.CheckFiles(); err == nil || !strings.Contains(err.Error(), "not to this server") {
		t.Errorf("s2's certificate for s1: %v", err)
	}
	mismatched := *c
	mismatched.TLS.Key = filepath.Join(dir, "s2-key.pem")
	if err := mismatched.CheckFiles(); err == nil || !strings.Contains(err.Error(), "key matching the certificate") {
		t.Errorf("s1's certificate with s2's key: %v", err)
	}
	if err := os.Chmod(c.TLS.Key, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := c.CheckFiles(); err == nil || !strings.Contains(err.Error(), "readable by group or others") {
		t.Errorf("a key readable by others: %v", err)
	}
}

// TestCheckPolicyServers: a policy naming a server the pool does not
// have (a typo under maintenance would drain nothing) is refused.
func TestCheckPolicyServers(t *testing.T) {
	c, err := ParseConfig([]byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, unknown string }{
		{"maintenance: [s1, s2]\n", ""},
		{"maintenance: [s1x]\n", "s1x"},
		{"rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {to: weighted, weights: {s2: 1, s9: 1}}\n", "s9"},
		{"rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {targets: [s3]}\n", "s3"},
	} {
		pol, err := policy.Parse([]byte(tc.file))
		if err != nil {
			t.Fatal(err)
		}
		err = c.CheckPolicy(pol)
		switch {
		case tc.unknown == "" && err != nil:
			t.Errorf("%q: %v", tc.file, err)
		case tc.unknown != "" && (err == nil || !strings.HasSuffix(err.Error(), ": "+tc.unknown)):
			t.Errorf("%q: error %v, want it to name %s", tc.file, err, tc.unknown)
		}
	}
}

// TestLoadConfigRelativePaths: the files a configuration names by
// relative paths are found beside it, wherever mtcpd runs from.
func TestLoadConfigRelativePaths(t *testing.T) {
	dir := t.TempDir()
	conf := strings.Replace(goodConfig, "tls: {ca: /etc/mtcp/ca.pem, cert: /etc/mtcp/s1.pem, key: /etc/mtcp/s1-key.pem}", "tls: {ca: pki/ca.pem, cert: /etc/mtcp/s1.pem, key: ./s1-key.pem}", 1) + "policy: policy.yaml\n"
	path := filepath.Join(dir, "mtcpd.yaml")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	for got, want := range map[string]string{
		c.TLS.CA: filepath.Join(dir, "pki/ca.pem"), c.TLS.Cert: "/etc/mtcp/s1.pem",
		c.TLS.Key: filepath.Join(dir, "s1-key.pem"), c.Policy: filepath.Join(dir, "policy.yaml"),
	} {
		if got != want {
			t.Errorf("path %q, want %q", got, want)
		}
	}
}

// TestREADMEConfig: the configuration README.md shows is valid.
func TestREADMEConfig(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "2. `/etc/mtcp/mtcpd.yaml` on each server")
	if !ok {
		t.Fatal("README.md no longer shows mtcpd.yaml")
	}
	var conf strings.Builder
	started := false
	for line := range strings.Lines(rest) {
		if strings.HasPrefix(line, "       ") {
			started = true
			conf.WriteString(strings.TrimPrefix(line, "       "))
		} else if started {
			break
		}
	}
	c, err := ParseConfig([]byte(conf.String()))
	if err != nil {
		t.Fatalf("README.md's configuration:\n%s\n%v", conf.String(), err)
	}
	if c.Name != "s1" || len(c.Peers) != 2 || c.Policy == "" {
		t.Errorf("README.md's configuration read as %+v", c)
	}
	// Its policy example names only servers of that pool.
	_, rest, ok = strings.Cut(string(b), "\n    interval:")
	if !ok {
		t.Fatal("README.md no longer shows a policy file")
	}
	var pol strings.Builder
	pol.WriteString("interval:")
	for line := range strings.Lines(rest) {
		if !strings.HasPrefix(line, "    ") && strings.TrimSpace(line) != "" {
			break
		}
		pol.WriteString(strings.TrimPrefix(line, "    "))
	}
	pp, err := policy.Parse([]byte(pol.String()))
	if err != nil {
		t.Fatalf("README.md's policy:\n%s\n%v", pol.String(), err)
	}
	if err := c.CheckPolicy(pp); err != nil {
		t.Errorf("README.md's policy with its configuration: %v", err)
	}
}

package daemon

import (
	"strings"
	"testing"
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
	if c.Steering != "forward" || c.AdminSocket != DefaultAdminSocket || c.NFQueue != DefaultNFQueue || c.Role != "server" || c.ProcessPages != "lazy" {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if a, ok := c.ServiceAddr(true); !ok || a.String() != "fd77:2::11" {
		t.Fatalf("ServiceAddr(v6) = %v", a)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown key", goodConfig + "colour: blue\n", "line 10: field colour not found"},
		{"bad address", strings.Replace(goodConfig, "10.77.2.11,", "10.77.2.300,", 1), "10.77.2.300"},
		{"no tls", strings.Replace(goodConfig, "tls: {ca: /etc/mtcp/ca.pem, ", "tls: {", 1), "tls: ca, cert and key"},
		{"bad steering", goodConfig + "steering: sideways\n", `steering: "sideways"`},
		{"bad process pages", goodConfig + "process_pages: later\n", `process_pages: "later" is not lazy or eager`},
		{"gateway unknown", goodConfig + "steering: gateway\ngateway: gw\n", `"gw" is not one of the peers`},
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

package daemon

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/migrate"
)

// TestChooseFlows: what migrate's selections pick among the connections
// served here.
func TestChooseFlows(t *testing.T) {
	ap := netip.MustParseAddrPort
	flow := func(client, service string) localFlow {
		return localFlow{Flow: migrate.Flow{Client: ap(client), Service: ap(service)}}
	}
	local := []localFlow{
		flow("10.77.1.2:40001", "10.77.2.11:7000"),
		flow("10.77.1.2:40002", "10.77.2.12:7000"), // dialled s2's address, served here
		flow("[fd77:1::2]:40003", "[fd77:2::11]:7000"),
		flow("10.77.1.2:40004", "10.77.2.11:7001"),
		flow("10.77.1.2:40005", "10.77.2.11:7000"), // one client port,
		flow("10.77.1.2:40005", "10.77.2.11:7001"), // two services
	}
	unknown := func(a netip.AddrPort) error { return fmt.Errorf("unknown %v", a) }
	clients := func(fs []migrate.Flow) string {
		var out []string
		for _, f := range fs {
			out = append(out, fmt.Sprint(f.Client.Port()))
		}
		slices.Sort(out)
		return strings.Join(out, ",")
	}
	for _, tc := range []struct {
		req  admin.MigrateRequest
		want string // client ports, or "error: TEXT"
	}{
		{admin.MigrateRequest{Service: ":7000"}, "40001,40002,40003,40005"},
		{admin.MigrateRequest{Service: "7000"}, "40001,40002,40003,40005"},
		{admin.MigrateRequest{Service: "10.77.2.12:7000"}, "40002"},
		{admin.MigrateRequest{Service: "[fd77:2::11]:7000"}, "40003"},
		{admin.MigrateRequest{Service: ":7002"}, "error: no connection matches"},
		{admin.MigrateRequest{Service: "x:7000"}, "error: want :PORT or ADDR:PORT"},
		{admin.MigrateRequest{Service: ":http"}, "error: want :PORT or ADDR:PORT"},
		{admin.MigrateRequest{Flows: []string{"10.77.1.2:40001", "10.77.1.2:40001"}}, "40001"},
		{admin.MigrateRequest{Flows: []string{"10.77.1.2:40005"}}, "error: cannot tell apart"},
		{admin.MigrateRequest{Flows: []string{"10.77.1.2:40009"}}, "error: unknown"},
		{admin.MigrateRequest{All: true}, "40001,40002,40003,40004,40005,40005"},
	} {
		got, err := chooseFlows(local, &tc.req, unknown)
		if want, ok := strings.CutPrefix(tc.want, "error: "); ok {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%+v: %v, %v; want an error saying %q", tc.req, clients(got), err, want)
			}
			continue
		}
		if err != nil || clients(got) != tc.want {
			t.Errorf("%+v: %s, %v; want %s", tc.req, clients(got), err, tc.want)
		}
	}
}

// TestCheckTarget: migrate and drain refuse this server, a stranger and
// the gateway as targets, each saying why.
func TestCheckTarget(t *testing.T) {
	d := &Daemon{cfg: &Config{Name: "s1", Gateway: "gw", Peers: []PeerConfig{{Name: "s2"}, {Name: "gw"}}}}
	for to, want := range map[string]string{"s2": "", "s1": "already on s1", "s9": "not a peer", "gw": "gateway"} {
		err := d.checkTarget(to)
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v, want %q", to, err, want)
		}
	}
}

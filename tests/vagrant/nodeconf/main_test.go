package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// TestVagrantfileMatchesPlan: the Vagrantfile's PLAN rows (host, network,
// IPv4 address, MAC) are exactly tests/testbed's VM plan, which the
// provisioning's network script is generated from; and every VM is
// provisioned by tests/setup.sh --node with its own name.
func TestVagrantfileMatchesPlan(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "..", "Vagrantfile"))
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile(`(?m)^\s*\["([a-z0-9]+)",\s*"([a-z]+)",\s*"([0-9.]+)",\s*"([0-9a-f:]+)"\],\s*$`)
	var got []string
	for _, m := range row.FindAllStringSubmatch(string(src), -1) {
		got = append(got, strings.Join(m[1:], " "))
	}
	var want []string
	for _, n := range testbed.VMNICs() {
		want = append(want, strings.Join([]string{n.Host, n.Net, n.Addrs[0].Addr().String(), n.MAC}, " "))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("Vagrantfile PLAN rows:\n%s\nwant (tests/testbed.VMNICs):\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if !strings.Contains(string(src), `inline: "cd /vagrant && bash tests/setup.sh --node #{name} --ssh-key /tmp/mtcp-ssh"`) {
		t.Error("the Vagrantfile does not provision each VM with tests/setup.sh --node NAME")
	}
	hosts := regexp.MustCompile(`HOSTS = %w\[([a-z0-9 ]+)\]`).FindStringSubmatch(string(src))
	if hosts == nil || hosts[1] != "s1 s2 s3 gateway client" {
		t.Errorf("HOSTS: %q; want the servers first and the client (which pushes their certificates) last", hosts)
	}
}

func TestOutputs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // a line the output must hold
	}{
		{[]string{"-node", "s2", "mgmt"}, "10.77.9.12"},
		{[]string{"-node", "s3", "ctl"}, "10.77.3.13,fd77:3::13"},
		{[]string{"servers"}, "s3"},
		{[]string{"-node", "gateway", "net"}, "nic 52:54:00:77:02:01 lan0"},
		{[]string{"-node", "s1", "-pki", "/p", "mtcpd"}, "tls: {ca: /p/ca.pem, cert: /p/s1.pem, key: /p/s1-key.pem}"},
	} {
		var b bytes.Buffer
		if err := run(tc.args, &b); err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		if !slices.Contains(strings.Split(b.String(), "\n"), tc.want) {
			t.Errorf("%v: no line %q in:\n%s", tc.args, tc.want, b.String())
		}
	}
	for _, bad := range [][]string{{"-node", "sw", "net"}, {"-node", "gateway", "mtcpd"}, {"-node", "client", "ctl"}, {"-node", "s1", "what"}, {}} {
		if err := run(bad, &bytes.Buffer{}); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/mtcp-dev/mtcp/tests/testbed"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "nodeconf:", err)
		os.Exit(2)
	}
}

func run(args []string, w io.Writer) error {
	fs := flag.NewFlagSet("nodeconf", flag.ContinueOnError)
	node := fs.String("node", "", "the VM: client, gateway, s1, s2 or s3")
	pki := fs.String("pki", "/etc/mtcp/pki", "directory of a server's certificates (mtcpd)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: nodeconf [-node NAME] [-pki DIR] net|mtcpd|mgmt|ctl|nics|servers")
	}
	what := fs.Arg(0)
	if what == "servers" {
		for _, s := range testbed.Describe("vm").Servers() {
			fmt.Fprintln(w, s.Name)
		}
		return nil
	}
	h := testbed.Describe("vm").Host(*node)
	if h == nil || h.Name == testbed.HostSwitch {
		return fmt.Errorf("-node %q: not a VM of the vagrant harness (client, gateway, s1, s2, s3)", *node)
	}
	switch what {
	case "net":
		s, err := testbed.VMNetScript(h.Name)
		if err != nil {
			return err
		}
		_, err = io.WriteString(w, s)
		return err
	case "mtcpd":
		s, err := testbed.VMDaemonConfig(h.Name, *pki)
		if err != nil {
			return err
		}
		_, err = io.WriteString(w, s)
		return err
	case "mgmt":
		_, err := fmt.Fprintln(w, testbed.MgmtAddr(h))
		return err
	case "nics":
		for _, n := range testbed.VMNICs() {
			if n.Host == h.Name {
				fmt.Fprintf(w, "%s %s %s\n", n.Net, n.MAC, n.Name)
			}
		}
		return nil
	case "ctl":
		if !h.Ctl4.IsValid() {
			return fmt.Errorf("%s has no control-network address", h.Name)
		}
		_, err := fmt.Fprintf(w, "%s,%s\n", h.Ctl4, h.Ctl6)
		return err
	}
	return fmt.Errorf("unknown %q: want net, mtcpd, mgmt, ctl, nics or servers", what)
}

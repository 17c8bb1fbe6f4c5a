package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// cliPrefix is the namespace-name prefix of beds made by mtcpctl: a bed
// named NAME lives in the namespaces mtcp-NAME-client, mtcp-NAME-s1, ...
const cliPrefix = "mtcp-"

const defaultBedName = "tb"

var bedNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

func bedPrefix(name string) (string, error) {
	if !bedNameRE.MatchString(name) {
		return "", usageErrorf("invalid testbed name %q: use 1 to 32 lowercase letters, digits or '-', starting with a letter or digit", name)
	}
	return cliPrefix + name, nil
}

// needRoot fails unless beds can be built or removed here.
func needRoot() error {
	if reason := testbed.SkipReason(); reason != "" {
		return fmt.Errorf("%s: run it as root (sudo)", reason)
	}
	return nil
}

func newTestbedCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "testbed",
		Short: "Build a throwaway mtcp pool on this machine out of network namespaces",
		Long: `Build, inspect and remove testbeds: a client, a gateway (router) and three
servers, each in its own network namespace, wired like a small data centre:

  client --(10.77.1.0/24, fd77:1::/64)-- gateway
  gateway, s1, s2, s3 on the server LAN (10.77.2.0/24, fd77:2::/64)
  s1, s2, s3 on a private control network (10.77.3.0/24, fd77:3::/64)

Nothing is created in the machine's own network namespace and nothing in a
testbed routes to the real network. A testbed named NAME lives in the
namespaces mtcp-NAME-client, mtcp-NAME-gateway, mtcp-NAME-s1 ... and
mtcp-NAME-sw (the L2 switch). Testbeds stay until 'mtcpctl testbed down'.

Testbeds made by tests (namespaces mtt<pid>x<hex>-*) show up in 'status' too;
they disappear with their test, or at the next test run if it was killed.

'up' and 'down' need root, ip (iproute2), nft, sysctl, nsenter and ethtool.`,
		Args: subcommandArgs,
		RunE: missingSubcommand,
	}
	cmd.AddCommand(newTestbedUpCmd(), newTestbedDownCmd(), newTestbedStatusCmd())
	return cmd
}

func newTestbedUpCmd() *cobra.Command {
	var name string
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "up [--name NAME]",
		Short: "Create a testbed, or check and repair an existing one",
		Long: `Create the testbed NAME (default "tb") and wait until all its links are up
and its addresses usable, then print its hosts, their namespaces and
addresses and how to enter them. Running 'up' on an existing testbed checks
it and repairs what is missing. If 'up' fails or is interrupted, it removes
the namespaces it had created.`,
		Example: `  sudo mtcpctl testbed up
  sudo mtcpctl testbed up --name demo -o json
  sudo nsenter --net=/run/netns/mtcp-tb-s1 bash   # a shell on server s1`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			prefix, err := bedPrefix(name)
			if err != nil {
				return err
			}
			if err := needRoot(); err != nil {
				return err
			}
			b, err := testbed.Up(cmd.Context(), testbed.Options{Prefix: prefix})
			if err != nil {
				return err
			}
			info := describeBed(b.Prefix)
			if output == outputJSON {
				return writeJSON(cmd.OutOrStdout(), info)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Testbed %q is up.\n\n", name)
			printHosts(w, info)
			s1, client := b.S1, b.Client
			fmt.Fprintf(w, `
Enter a host (its network namespace only, as mtcpd and CRIU need):
  nsenter --net=%s bash
Run one command in a host:
  ip netns exec %s ss -tn
Take the testbed down:
  mtcpctl testbed down --name %s
`, s1.NetNSPath(), client.NetNS, name)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", defaultBedName, "name of the testbed: its namespaces are mtcp-NAME-<host>")
	addOutputFlag(cmd, &output)
	return cmd
}

func newTestbedDownCmd() *cobra.Command {
	var name string
	var all bool
	cmd := &cobra.Command{
		Use:   "down [--name NAME | --all]",
		Short: "Remove a testbed",
		Long: `Remove the testbed NAME (default "tb"): kill every process still running in
its namespaces and delete them, with all their links, addresses, routes and
nftables rules. Removing a testbed that does not exist is not an error.

With --all, remove every testbed made by mtcpctl, and the testbeds of tests
whose process is gone. Testbeds of tests still running are left alone.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if all && cmd.Flags().Changed("name") {
				return usageErrorf("--name and --all cannot be used together")
			}
			var prefixes []string
			if !all {
				p, err := bedPrefix(name)
				if err != nil {
					return err
				}
				prefixes = []string{p}
			}
			if err := needRoot(); err != nil {
				return err
			}
			ctx := cmd.Context()
			if all {
				present, err := testbed.List(ctx)
				if err != nil {
					return err
				}
				for _, p := range present {
					if strings.HasPrefix(p, cliPrefix) || testbed.Orphaned(p) {
						prefixes = append(prefixes, p)
					}
				}
			}
			w := cmd.OutOrStdout()
			removed := 0
			for _, p := range prefixes {
				if !bedPresent(p) {
					continue
				}
				if err := testbed.Describe(p).Down(ctx); err != nil {
					return err
				}
				fmt.Fprintf(w, "Removed testbed %s (namespaces %s-*).\n", bedName(p), p)
				removed++
			}
			if removed == 0 {
				if all {
					fmt.Fprintln(w, "No testbed to remove.")
				} else {
					fmt.Fprintf(w, "No testbed %q: nothing to remove.\n", name)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", defaultBedName, "name of the testbed to remove")
	cmd.Flags().BoolVar(&all, "all", false, "remove every testbed made by mtcpctl and those of dead test runs")
	return cmd
}

func newTestbedStatusCmd() *cobra.Command {
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "status [-o json]",
		Short: "List the testbeds on this machine and their hosts",
		Long: `List the testbeds present on this machine, made by mtcpctl or by tests, with
their hosts, namespaces and addresses. A testbed is "complete" when all six
of its namespaces exist; a partial one is usually being built or removed,
and 'mtcpctl testbed up' or 'down' fixes it. Does not need root.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			prefixes, err := testbed.List(cmd.Context())
			if err != nil {
				return err
			}
			beds := []bedInfo{}
			for _, p := range prefixes {
				beds = append(beds, describeBed(p))
			}
			w := cmd.OutOrStdout()
			if output == outputJSON {
				return writeJSON(w, struct {
					Beds []bedInfo `json:"beds"`
				}{beds})
			}
			if len(beds) == 0 {
				fmt.Fprintln(w, "No testbeds. Create one with: sudo mtcpctl testbed up")
				return nil
			}
			for i, b := range beds {
				if i > 0 {
					fmt.Fprintln(w)
				}
				state := "complete"
				if !b.Complete {
					state = "partial"
				}
				owner := "made by mtcpctl"
				switch {
				case b.Kind == "test" && b.Orphaned:
					owner = fmt.Sprintf("made by test process %d, now gone: the next test run or 'down --all' removes it", b.OwnerPID)
				case b.Kind == "test":
					owner = fmt.Sprintf("made by test process %d", b.OwnerPID)
				case b.Kind == "other":
					owner = "made by another program"
				}
				fmt.Fprintf(w, "Testbed %s (%s; %s)\n", b.Name, state, owner)
				printHosts(w, b)
			}
			return nil
		},
	}
	addOutputFlag(cmd, &output)
	return cmd
}

// bedInfo is a testbed as `status -o json` and `up -o json` print it.
type bedInfo struct {
	Name     string     `json:"name"`
	Prefix   string     `json:"prefix"`
	Kind     string     `json:"kind"` // "cli", "test" or "other"
	Complete bool       `json:"complete"`
	OwnerPID int        `json:"owner_pid,omitempty"`
	Orphaned bool       `json:"orphaned,omitempty"`
	Hosts    []hostInfo `json:"hosts"`
}

// hostInfo is one namespace of a bedInfo.
type hostInfo struct {
	Name      string `json:"name"`
	NetNS     string `json:"netns"`
	NetNSPath string `json:"netns_path"`
	Present   bool   `json:"present"`
	LAN4      string `json:"lan4,omitempty"`
	LAN6      string `json:"lan6,omitempty"`
	Ctl4      string `json:"ctl4,omitempty"`
	Ctl6      string `json:"ctl6,omitempty"`
}

func bedName(prefix string) string {
	if n, ok := strings.CutPrefix(prefix, cliPrefix); ok && bedNameRE.MatchString(n) {
		return n
	}
	return prefix
}

func bedPresent(prefix string) bool {
	for _, h := range testbed.Describe(prefix).Hosts() {
		if h.Exists() {
			return true
		}
	}
	return false
}

func describeBed(prefix string) bedInfo {
	b := testbed.Describe(prefix)
	info := bedInfo{Name: bedName(prefix), Prefix: prefix, Kind: "other", Complete: true}
	if pid, ok := testbed.OwnerPID(prefix); ok {
		info.Kind, info.OwnerPID, info.Orphaned = "test", pid, testbed.Orphaned(prefix)
	} else if info.Name != prefix {
		info.Kind = "cli"
	}
	addr := func(a interface{ IsValid() bool }) string {
		if !a.IsValid() {
			return ""
		}
		return fmt.Sprint(a)
	}
	for _, h := range b.Hosts() {
		hi := hostInfo{
			Name: h.Name, NetNS: h.NetNS, NetNSPath: h.NetNSPath(), Present: h.Exists(),
			LAN4: addr(h.LAN4), LAN6: addr(h.LAN6), Ctl4: addr(h.Ctl4), Ctl6: addr(h.Ctl6),
		}
		info.Complete = info.Complete && hi.Present
		info.Hosts = append(info.Hosts, hi)
	}
	return info
}

// printHosts prints a bed's hosts as a table.
func printHosts(w io.Writer, b bedInfo) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tNAMESPACE\tADDRESSES\tCONTROL NET\tNOTE")
	dash := func(s ...string) string {
		j := strings.TrimSpace(strings.Join(s, " "))
		if j == "" {
			return "-"
		}
		return j
	}
	for _, h := range b.Hosts {
		var note []string
		switch h.Name {
		case testbed.HostClient:
			note = append(note, "TCP client")
		case testbed.HostGateway:
			note = append(note, "router; client side "+testbed.GatewayClient4.String()+" "+testbed.GatewayClient6.String())
		case testbed.HostSwitch:
			note = append(note, "L2 switch: bridges "+testbed.BridgeLAN+", "+testbed.BridgeCtl)
		default:
			note = append(note, "server")
		}
		if !h.Present {
			note = append(note, "MISSING")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", h.Name, h.NetNS, dash(h.LAN4, h.LAN6), dash(h.Ctl4, h.Ctl6), strings.Join(note, "; "))
	}
	tw.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

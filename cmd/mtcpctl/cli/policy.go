package cli

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/mtcp-dev/mtcp/policy"
)

func newPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Work with mtcpd's policy file",
		Long: `Work with the policy file, the rules by which each mtcpd moves connections
by itself: when its server is overloaded (cpu, run_queue, memory,
memory_pressure, conns), when a connection's path degrades (rtt,
retransmits, delivery_rate from TCP_INFO), when its server is under
maintenance or inside a time window. Each rule moves a count or a
fraction of the matching connections to a peer chosen by least_loaded,
path_cost or weighted, with cooldowns, hysteresis and a rate limit.

mtcpd names the file with "policy:" in its configuration, reloads it on
SIGHUP and when it changes, and keeps its running policy when a new
version does not parse. See README.md ("Policy") for the format.`,
		Args: subcommandArgs,
		RunE: missingSubcommand,
	}
	cmd.AddCommand(newPolicyCheckCmd())
	return cmd
}

// policyCheck is the result of 'policy check' (-o json).
type policyCheck struct {
	File   string   `json:"file"`
	OK     bool     `json:"ok"`
	Rules  []string `json:"rules,omitempty"`
	Errors []string `json:"errors,omitempty"`
}

func newPolicyCheckCmd() *cobra.Command {
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "check FILE [-o json]",
		Short: "Validate a policy file",
		Long: `Validate a policy file as mtcpd would load it: unknown keys, values of the
wrong type and invalid settings are errors, each reported with its line
number. Nothing is sent to mtcpd.

Exit status: 0 when the file is valid, 1 when it is not (or cannot be
read), 2 on a usage error.`,
		Example: `  mtcpctl policy check /etc/mtcp/policy.yaml`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageErrorf("give the policy file to check (got %d arguments)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			res := policyCheck{File: args[0]}
			pol, err := policy.LoadFile(args[0])
			if err == nil {
				res.OK = true
				for _, r := range pol.Rules {
					res.Rules = append(res.Rules, r.Name)
				}
			} else {
				// Parse joins every problem it found, one per line.
				for line := range strings.Lines(err.Error()) {
					res.Errors = append(res.Errors, strings.TrimSpace(line))
				}
			}
			w := cmd.OutOrStdout()
			if output == outputJSON {
				if werr := writeJSON(w, res); werr != nil {
					return werr
				}
			} else if res.OK {
				fmt.Fprintf(w, "%s: OK, %d rule(s)", res.File, len(res.Rules))
				if len(res.Rules) > 0 {
					fmt.Fprintf(w, ": %s", strings.Join(res.Rules, ", "))
				}
				fmt.Fprintln(w)
			}
			if err != nil {
				return errors.New(strings.ReplaceAll(err.Error(), "\n", "\n  "))
			}
			return nil
		},
	}
	addOutputFlag(cmd, &output)
	return cmd
}

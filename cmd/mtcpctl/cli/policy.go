package cli

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"

	"github.com/mtcp-dev/mtcp/internal/yamlerr"
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
	File string `json:"file"`
	// Config is the mtcpd configuration whose pool the servers the
	// policy names were checked against; empty if none was.
	Config string   `json:"config,omitempty"`
	OK     bool     `json:"ok"`
	Rules  []string `json:"rules,omitempty"`
	Errors []string `json:"errors,omitempty"`
}

// defaultConfig is mtcpd's configuration file where it is installed.
const defaultConfig = "/etc/mtcp/mtcpd.yaml"

func newPolicyCheckCmd() *cobra.Command {
	var output outputFormat
	var config string
	cmd := &cobra.Command{
		Use:   "check FILE [--config MTCPD_YAML] [-o json]",
		Short: "Validate a policy file",
		Long: `Validate a policy file as mtcpd would load it: unknown keys, values of the
wrong type and invalid settings are errors, each reported with its line
number. The servers it names (maintenance, weights, targets) are checked
against the pool of an mtcpd configuration: --config, or ` + defaultConfig + `
if it exists (mtcpd refuses a policy that names a server outside its
pool). Nothing is sent to mtcpd.

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
				res.Config, err = checkPool(cmd, config, args[0], pol)
			}
			if err == nil {
				res.OK = true
				for _, r := range pol.Rules {
					res.Rules = append(res.Rules, r.Name)
				}
			} else {
				// Parse joins every problem it found, one per line;
				// the file is named once, in res.File.
				msg := strings.TrimPrefix(err.Error(), "policy "+args[0]+": ")
				for line := range strings.Lines(msg) {
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
				if res.Config != "" {
					fmt.Fprintf(w, "; the servers it names are in the pool of %s", res.Config)
				} else {
					fmt.Fprintf(w, "; the servers it names were not checked (%s not there or not readable: give --config)", defaultConfig)
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
	cmd.Flags().StringVar(&config, "config", "", "mtcpd configuration whose pool the servers the policy names must be in (default "+defaultConfig+" if it exists)")
	return cmd
}

// checkPool checks the servers pol (from file) names against the pool of the mtcpd
// configuration named by config, or of defaultConfig if config is empty
// and it exists. It returns the configuration used ("" for none).
func checkPool(cmd *cobra.Command, config, file string, pol *policy.Policy) (string, error) {
	if !cmd.Flags().Changed("config") {
		if _, err := os.Stat(defaultConfig); err != nil {
			return "", nil
		}
		config = defaultConfig
	}
	pool, err := poolOf(config)
	if err != nil {
		if !cmd.Flags().Changed("config") && errors.Is(err, fs.ErrPermission) {
			return "", nil // mtcpd's, root's to read: not asked for
		}
		return config, err
	}
	if err := pol.CheckPool(pool); err != nil {
		return config, fmt.Errorf("policy %s, checked against %s: %w", file, config, err)
	}
	return config, nil
}

// poolOf reads the names of the servers of an mtcpd configuration's pool:
// its own and its peers'. The rest of the file is mtcpd's to check
// (mtcpd -check).
func poolOf(config string) ([]string, error) {
	b, err := os.ReadFile(config)
	if err != nil {
		return nil, fmt.Errorf("mtcpd configuration: %w", err)
	}
	var c struct {
		Name  string `yaml:"name"`
		Peers []struct {
			Name string `yaml:"name"`
		} `yaml:"peers"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("mtcpd configuration %s: %w", config, yamlerr.Explain(err))
	}
	if c.Name == "" {
		return nil, fmt.Errorf("mtcpd configuration %s: no name: is it mtcpd's?", config)
	}
	pool := []string{c.Name}
	for _, p := range c.Peers {
		pool = append(pool, p.Name)
	}
	return pool, nil
}

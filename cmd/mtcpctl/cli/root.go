package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// Exit codes of mtcpctl.
const (
	ExitOK      = 0 // the command did what it was asked
	ExitFailure = 1 // the command failed
	ExitUsage   = 2 // the command line was wrong
)

// Run runs mtcpctl with args (the command line without the program name)
// and returns the process exit code: [ExitOK], [ExitFailure] or
// [ExitUsage]. SIGINT and SIGTERM cancel the running command, which then
// cleans up what it started.
func Run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, args, os.Stdout, os.Stderr)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	var ue *usageError
	if errors.As(err, &ue) {
		if ue.help {
			cmd.SetOut(stderr)
			cmd.Help()
			fmt.Fprintln(stderr)
		}
		fmt.Fprintf(stderr, "mtcpctl: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
		return ExitUsage
	}
	if ctx.Err() != nil {
		fmt.Fprintf(stderr, "mtcpctl: interrupted: %v\n", err)
		return ExitFailure
	}
	fmt.Fprintf(stderr, "mtcpctl: %v\n", err)
	var pe *partialError
	if errors.As(err, &pe) {
		return ExitPartial
	}
	return ExitFailure
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "mtcpctl",
		Short: "Control mtcp, Migratory TCP for Linux",
		Long: `mtcpctl controls mtcp, Migratory TCP for Linux.

mtcp moves live TCP connections among a pool of cooperating servers. The
client keeps one unbroken connection to the address it first connected to:
it needs no change and notices at most a short pause, while the server end
of its connection moves away from an overloaded, failing, attacked or
badly connected server to another member of the pool.

Connections move one by one (connection mode: the socket's TCP state is
frozen and restored with TCP_REPAIR, the application's per-connection state
travels with it) or together with their whole server process (process mode,
through CRIU, for unmodified servers). nftables rules hold each flow while it
moves and steer it to its new server afterwards. Every server of the pool
runs the daemon, mtcpd.

Exit status: 0 on success, 1 when the command failed, 2 on a usage error,
3 when a migration or drain moved some connections but not all.`,
		Example: `  # Build a throwaway pool on this machine (network namespaces) to try mtcp:
  sudo mtcpctl testbed up
  sudo mtcpctl testbed status
  sudo mtcpctl testbed down`,
		Args:          subcommandArgs,
		RunE:          missingSubcommand,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &usageError{err: err}
	})
	root.CompletionOptions.HiddenDefaultCmd = true
	root.SetUsageTemplate(usageTemplate)
	root.AddCommand(
		newConnsCmd(),
		newMigrateCmd(),
		newDrainCmd(),
		newStatusCmd(),
		newTestbedCmd(),
		newCertsCmd(),
		newPolicyCmd(),
	)
	return root
}

// usageError is a mistake in the command line: mtcpctl exits with
// ExitUsage. help asks for the command's help to be printed first.
type usageError struct {
	err  error
	help bool
}

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return &usageError{err: fmt.Errorf(format, args...)}
}

// subcommandArgs rejects arguments to a command that only groups
// subcommands: cobra lands there with an unknown subcommand's name.
func subcommandArgs(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2 // cobra's default, set lazily
	}
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return usageErrorf("%s", msg)
}

// missingSubcommand runs for a command that groups subcommands when none
// was given.
func missingSubcommand(cmd *cobra.Command, _ []string) error {
	return &usageError{err: fmt.Errorf("%q needs a subcommand", cmd.CommandPath()), help: true}
}

// noArgs rejects positional arguments.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErrorf("%q takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

// outputFormat is the value of an -o/--output flag.
type outputFormat string

const (
	outputText outputFormat = "text"
	outputJSON outputFormat = "json"
)

func (o *outputFormat) String() string { return string(*o) }
func (o *outputFormat) Type() string   { return "format" }
func (o *outputFormat) Set(s string) error {
	switch f := outputFormat(s); f {
	case outputText, outputJSON:
		*o = f
		return nil
	}
	return fmt.Errorf("unknown output format %q: use text or json", s)
}

// addOutputFlag adds -o/--output text|json to cmd.
func addOutputFlag(cmd *cobra.Command, o *outputFormat) {
	*o = outputText
	cmd.Flags().VarP(o, "output", "o", "output format: text or json")
}

// usageTemplate is cobra's default usage template, except that a command
// grouping subcommands shows "CMD <command> [flags]" rather than both its
// own use line and "CMD [command]": such commands only run to report a
// missing or unknown subcommand.
const usageTemplate = `Usage:{{if and .Runnable (not .HasAvailableSubCommands)}}
  {{.UseLine}}{{end}}{{if .HasAvailableSubCommands}}
  {{.CommandPath}} <command> [flags]{{end}}{{if gt (len .Aliases) 0}}

Aliases:
  {{.NameAndAliases}}{{end}}{{if .HasExample}}

Examples:
{{.Example}}{{end}}{{if .HasAvailableSubCommands}}{{$cmds := .Commands}}{{if eq (len .Groups) 0}}

Available Commands:{{range $cmds}}{{if (or .IsAvailableCommand (eq .Name "help"))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{else}}{{range $group := .Groups}}

{{.Title}}{{range $cmds}}{{if (and (eq .GroupID $group.ID) (or .IsAvailableCommand (eq .Name "help")))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{if not .AllChildCommandsHaveGroup}}

Additional Commands:{{range $cmds}}{{if (and (eq .GroupID "") (or .IsAvailableCommand (eq .Name "help")))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{end}}{{end}}{{if .HasAvailableLocalFlags}}

Flags:
{{.LocalFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableInheritedFlags}}

Global Flags:
{{.InheritedFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasHelpSubCommands}}

Additional help topics:{{range .Commands}}{{if .IsAdditionalHelpTopicCommand}}
  {{rpad .CommandPath .CommandPathPadding}} {{.Short}}{{end}}{{end}}{{end}}{{if .HasAvailableSubCommands}}

Use "{{.CommandPath}} <command> --help" for more information about a command.{{end}}
`

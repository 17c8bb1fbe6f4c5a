package cli

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/spf13/cobra"
)

// ExitPartial: a migration or drain moved some connections but not all.
const ExitPartial = 3

// partialError makes mtcpctl exit with ExitPartial.
type partialError struct{ msg string }

func (e *partialError) Error() string { return e.msg }

// addAdminFlag adds --admin, the daemon's admin socket.
func addAdminFlag(cmd *cobra.Command, path *string) {
	def := os.Getenv("MTCP_ADMIN")
	if def == "" {
		def = admin.DefaultSocket
	}
	cmd.Flags().StringVar(path, "admin", def, "mtcpd's admin socket (root only; env MTCP_ADMIN)")
}

func newConnsCmd() *cobra.Command {
	var output outputFormat
	var sock string
	cmd := &cobra.Command{
		Use:   "conns [-o json]",
		Short: "List the connections mtcpd can migrate",
		Long: `List this server's TCP connections that mtcpd can migrate, like ss: the
client's address, the service address the client dialled (it stays the same
wherever the connection lives), the socket's local address here, who serves
it, its TCP state, round-trip time and retransmissions.

A connection is served either by an application service registered with
mtcpd (APP shows it, e.g. :7000), which moves it on its own, or by a process
that does not use mtcp's app library (APP shows "pid PID (COMMAND)"), which
moves only together with that process: mtcpctl migrate --pid PID. (Right
after mtcpd restarts, an application's connections show that way too until
the application has registered again.) NOTE says why a connection cannot
move, if it cannot.`,
		Example: `  sudo mtcpctl conns
  sudo mtcpctl conns -o json | jq '.[].client'`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conns, err := admin.NewClient(sock).Conns(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if output == outputJSON {
				if conns == nil {
					conns = []admin.Conn{}
				}
				return writeJSON(w, conns)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "STATE\tCLIENT\tSERVICE\tLOCAL\tAPP\tRTT\tRETRANS\tNOTE")
			for _, c := range conns {
				by, note := c.App, c.Migratable
				if c.App == "" && c.PID != 0 {
					by = fmt.Sprintf("pid %d (%s)", c.PID, c.Command)
					if note == "" {
						note = fmt.Sprintf("moves with its process: migrate --pid %d", c.PID)
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%v\t%d\t%s\n", c.State, c.Client, c.Service, c.Local, by,
					c.RTT.Round(time.Microsecond), c.Retrans, note)
			}
			return tw.Flush()
		},
	}
	addOutputFlag(cmd, &output)
	addAdminFlag(cmd, &sock)
	return cmd
}

func newMigrateCmd() *cobra.Command {
	var output outputFormat
	var sock, to, service string
	var flows []string
	var all, process bool
	var pid int
	cmd := &cobra.Command{
		Use:   "migrate (--flow CLIENT_IP:PORT... | --service :PORT | --all | --pid PID) --to PEER",
		Short: "Move live connections to another server of the pool",
		Long: `Move live TCP connections from this server to the peer PEER. Their clients
keep their connections and the address they dialled; at most they notice a
short pause. The move is a transaction: if anything fails before the flows
are switched to PEER, they carry on here as if nothing had happened.

Select the connections with --flow (the client's address, repeatable),
--service (every connection of an application service, e.g. :7000) or
--all (every connection of the application services registered here).
Exit status 3 means some connections moved and some did not: those that
failed before the switch carry on here; the rare ones that failed past it
(the target's commit) may be lost, and their error says so.

Process mode moves a whole process instead (with CRIU ≥ 4.2 on both
servers): its memory, threads, files and every established TCP connection,
for servers that do not use mtcp's app library. --pid PID selects the
process. --service :PORT selects the process that owns the listener on
PORT when no application registered with mtcpd serves PORT (mtcpctl status
lists those; mtcpctl says so on stderr unless --process is given);
--process forces process mode for --service. Each phase is printed as it
finishes (prepare, hold, dump, transfer, restore, switch, pages, commit; retry
when the process accepted a connection during the dump, which undoes the
migration and starts it again; the third attempt goes through, and the
report counts the connections that then did not move). By
default (process_pages: lazy in mtcpd's config) the process is restored on
the target before its memory moves, and its pages follow on demand and in
the background (post-copy): the connections are held only for the dump of
everything but the memory, and the source keeps the frozen process until
the last page has arrived. With process_pages: eager every page moves
first (a freeze phase is then printed too). If the restore fails, the
process carries on here with its connections. The same binaries and files
must exist on both servers.`,
		Example: `  sudo mtcpctl migrate --flow 10.77.1.2:41234 --to s2
  sudo mtcpctl migrate --service :7000 --to s3
  sudo mtcpctl migrate --all --to s2 -o json
  sudo mtcpctl migrate --pid 4242 --to s2              # process mode
  sudo mtcpctl migrate --service :6379 --to s2         # process mode if no app serves :6379`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if pid != 0 || process {
				return migrateProcess(cmd, sock, output, pid, service, process, len(flows) > 0 || all, to)
			}
			n := 0
			for _, set := range []bool{len(flows) > 0, service != "", all} {
				if set {
					n++
				}
			}
			if n != 1 {
				return usageErrorf("give exactly one of --flow, --service and --all")
			}
			if service != "" && to != "" {
				if port, ok := processService(cmd, sock, service); ok {
					fmt.Fprintf(cmd.ErrOrStderr(), "mtcpctl: no application registered with mtcpd serves port %d: moving the whole process that listens on it, with CRIU (process mode; --process says so and keeps this note away)\n", port)
					return migrateProcess(cmd, sock, output, 0, ":"+fmt.Sprint(port), true, false, to)
				}
			}
			if to == "" {
				return usageErrorf("--to PEER is required")
			}
			for _, f := range flows {
				if _, err := netip.ParseAddrPort(f); err != nil {
					return usageErrorf("--flow %q: want the client's IP:PORT (as mtcpctl conns shows it)", f)
				}
			}
			rep, err := admin.NewClient(sock).Migrate(cmd.Context(), &admin.MigrateRequest{Flows: flows, Service: service, All: all, To: to})
			if err != nil {
				return err
			}
			if output == outputJSON {
				if err := writeJSON(cmd.OutOrStdout(), rep); err != nil {
					return err
				}
			} else {
				printReport(cmd.OutOrStdout(), rep)
			}
			return reportError(rep)
		},
	}
	cmd.Flags().StringSliceVar(&flows, "flow", nil, "client address IP:PORT of a connection to move (repeatable)")
	cmd.Flags().StringVar(&service, "service", "", "move every connection of this application service (e.g. :7000)")
	cmd.Flags().BoolVar(&all, "all", false, "move every connection of the application services registered here")
	cmd.Flags().IntVar(&pid, "pid", 0, "process mode: move the process PID (CRIU) with all its connections")
	cmd.Flags().BoolVar(&process, "process", false, "process mode for --service: move the process that owns the listener")
	cmd.Flags().StringVar(&to, "to", "", "name of the peer to move them to")
	addOutputFlag(cmd, &output)
	addAdminFlag(cmd, &sock)
	return cmd
}

func reportError(rep *admin.Report) error {
	switch {
	case len(rep.Failed) == 0 && rep.Error != "":
		return errors.New(rep.Error)
	case len(rep.Failed) == 0:
		return nil
	case len(rep.Moved) == 0:
		return fmt.Errorf("no connection moved to %s", rep.To)
	default:
		return &partialError{fmt.Sprintf("%d of %d connections moved to %s", len(rep.Moved), len(rep.Moved)+len(rep.Failed), rep.To)}
	}
}

func printReport(w io.Writer, rep *admin.Report) {
	fmt.Fprintf(w, "moved %d connection(s) to %s", len(rep.Moved), rep.To)
	if len(rep.Failed) > 0 {
		fmt.Fprintf(w, ", %d failed", len(rep.Failed))
	}
	fmt.Fprintln(w)
	if rep.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", rep.Error)
	}
	phases := []string{"prepare", "quiesce", "hold", "capture", "transfer", "switch", "commit"}
	var parts []string
	for _, p := range phases {
		if d, ok := rep.Timings[p]; ok {
			parts = append(parts, fmt.Sprintf("%s %v", p, d.Round(time.Microsecond)))
		}
	}
	if len(parts) > 0 {
		fmt.Fprintln(w, "  "+strings.Join(parts, ", "))
	}
	keys := make([]string, 0, len(rep.Failed))
	for k := range rep.Failed {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "  %s: %s\n", k, rep.Failed[k])
	}
}

func newDrainCmd() *cobra.Command {
	var sock, to string
	var spread, quiet bool
	var batch int
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "drain (--to PEER | --spread) [-o json]",
		Short: "Move every connection away from this server",
		Long: `Move every migratable connection away from this server, for maintenance:
to one peer (--to) or spread over the healthy peers (--spread). A progress
bar shows how many have moved (on a terminal). Connections that could not
move are listed at the end with why (they carry on here, but for the rare
ones that failed past the switch, whose error says they may be lost); the
exit status is then 3, or 1 if none moved. With -o json the final progress, with every batch's report, is
printed as JSON. A drain moves the connections of the application services
registered with mtcpd; a process that does not use mtcp's app library
(mtcpctl conns shows its PID) moves with migrate --pid.`,
		Example: `  sudo mtcpctl drain --to s2
  sudo mtcpctl drain --spread
  sudo mtcpctl drain --to s3 --batch 500 -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (to == "") == !spread {
				return usageErrorf("give exactly one of --to PEER and --spread")
			}
			if batch < 0 {
				return usageErrorf("--batch must be positive (or 0 for the daemon's default)")
			}
			errw := cmd.ErrOrStderr()
			// A bar redrawn with carriage returns is for a terminal only.
			if f, ok := errw.(*os.File); !ok || !isTerminal(f) {
				quiet = true
			}
			var last admin.Progress
			bar := func(p admin.Progress) {
				last = p
				if quiet || p.Total == 0 {
					return
				}
				const width = 40
				filled := width * p.Done / p.Total
				fmt.Fprintf(errw, "\r[%s%s] %d/%d moved, %d failed", strings.Repeat("#", filled), strings.Repeat(".", width-filled), p.Done, p.Total, p.Failed)
				if p.Final {
					fmt.Fprintln(errw)
				}
			}
			p, err := admin.NewClient(sock).Drain(cmd.Context(), &admin.DrainRequest{To: to, Spread: spread, Batch: batch}, bar)
			if p == nil {
				// No final progress: the stream broke off.
				if last.Total > 0 && !quiet {
					fmt.Fprintln(errw)
				}
				if last.Total > 0 {
					return fmt.Errorf("the drain stopped with %d of %d connections moved and %d failed: %w", last.Done, last.Total, last.Failed, err)
				}
				return err
			}
			// The drain ran to its end; err, if any, is why batches
			// failed (a target that refused one, say): the reports say
			// which connections, and the exit status how many.
			if output == outputJSON {
				if err := writeJSON(cmd.OutOrStdout(), p); err != nil {
					return err
				}
			} else {
				if p.Total == 0 {
					fmt.Fprintln(errw, "nothing to drain: no connection of an application registered with mtcpd is served here")
				}
				for i := range p.Reports {
					printReport(cmd.OutOrStdout(), &p.Reports[i])
				}
			}
			why := ""
			if err != nil {
				why = ": " + err.Error()
			}
			switch {
			case p.Failed > 0 && p.Done == 0:
				return fmt.Errorf("none of %d connections could move%s", p.Total, why)
			case p.Failed > 0:
				return &partialError{fmt.Sprintf("%d of %d connections could not move%s", p.Failed, p.Total, why)}
			}
			return err
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "move everything to this peer")
	cmd.Flags().BoolVar(&spread, "spread", false, "spread the connections over the healthy peers")
	cmd.Flags().BoolVar(&quiet, "quiet", false, "no progress bar")
	cmd.Flags().IntVar(&batch, "batch", 0, "connections per transaction (0 = the daemon's default, 1000)")
	addOutputFlag(cmd, &output)
	addAdminFlag(cmd, &sock)
	return cmd
}

func newStatusCmd() *cobra.Command {
	var output outputFormat
	var sock string
	cmd := &cobra.Command{
		Use:   "status [-o json]",
		Short: "Show the pool as this server's mtcpd sees it",
		Long: `Show this server's mtcpd: its role and steering mode, the connections and
application services it serves, and each peer of the pool with its health
(heartbeats over the authenticated control channel), load and connections.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := admin.NewClient(sock).Status(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if output == outputJSON {
				return writeJSON(w, s)
			}
			fmt.Fprintf(w, "%s (%s, %s steering): %d connection(s), services %s\n", s.Name, s.Role, s.Steering, s.Conns, strings.Join(s.Services, " "))
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PEER\tADDR\tHEALTH\tLOAD\tCONNS\tRTT\tNOTE")
			for _, p := range s.Peers {
				health := "up"
				if !p.Healthy {
					health = "DOWN"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%.2f\t%d\t%v\t%s\n", p.Name, p.Addr, health, p.Load, p.Conns, p.RTT.Round(time.Microsecond), p.Error)
			}
			return tw.Flush()
		},
	}
	addOutputFlag(cmd, &output)
	addAdminFlag(cmd, &sock)
	return cmd
}

// isTerminal reports whether f is a terminal (a character device).
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

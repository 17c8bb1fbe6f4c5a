package cli

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/spf13/cobra"
)

// processService tells whether `migrate --service` means process mode:
// the daemon answers and no application registered with it serves the
// port.
func processService(cmd *cobra.Command, sock, service string) (uint16, bool) {
	port, err := parseServicePort(service)
	if err != nil {
		return 0, false
	}
	st, err := admin.NewClient(sock).Status(cmd.Context())
	if err != nil {
		return 0, false
	}
	for _, s := range st.Services {
		if p, err := parseServicePort(s); err == nil && p == port {
			return 0, false
		}
	}
	return port, true
}

// parseServicePort reads ":6379" or "10.0.0.1:6379".
func parseServicePort(s string) (uint16, error) {
	i := strings.LastIndexByte(s, ':')
	p, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("service %q: want :PORT", s)
	}
	return uint16(p), nil
}

// migrateProcess runs `migrate` in process mode.
func migrateProcess(cmd *cobra.Command, sock string, output outputFormat, pid int, service string, process, otherSelection bool, to string) error {
	switch {
	case otherSelection:
		return usageErrorf("process mode (--pid, --process) moves a whole process: do not give --flow or --all")
	case pid != 0 && service != "":
		return usageErrorf("give either --pid or --service, not both")
	case pid < 0:
		return usageErrorf("--pid must be a positive process id")
	case pid == 0 && service == "":
		return usageErrorf("--process needs --service :PORT (or give --pid PID)")
	case to == "":
		return usageErrorf("--to PEER is required")
	}
	req := &admin.ProcessRequest{PID: pid, To: to}
	if service != "" {
		port, err := parseServicePort(service)
		if err != nil {
			return usageErrorf("%v", err)
		}
		req.Port = port
	}
	out := cmd.OutOrStdout()
	var progress func(admin.ProcessPhase)
	if output != outputJSON {
		progress = func(p admin.ProcessPhase) {
			fmt.Fprintf(out, "  %-9s %v\n", p.Name, p.Took.Round(10*time.Microsecond))
		}
	}
	rep, err := admin.NewClient(sock).MigrateProcess(cmd.Context(), req, progress)
	if rep == nil {
		return err
	}
	if output == outputJSON {
		if werr := writeJSON(out, rep); werr != nil {
			return werr
		}
	} else {
		printProcessReport(out, rep)
	}
	if rep.Aborted {
		if rep.PID == 0 {
			return fmt.Errorf("nothing moved: %s", rep.Error) // no process was found
		}
		return fmt.Errorf("process %d stayed here: %s", rep.PID, rep.Error)
	}
	if rep.Error != "" {
		return fmt.Errorf("process %d: %s", rep.PID, rep.Error)
	}
	return nil
}

func printProcessReport(w io.Writer, rep *admin.ProcessReport) {
	if rep.Aborted {
		if rep.PID == 0 {
			fmt.Fprintf(w, "no process moved: %s\n", rep.Error)
			return
		}
		fmt.Fprintf(w, "process %d (%s) stayed here, with its %d connection(s): %s\n", rep.PID, rep.Command, rep.Conns, rep.Error)
		return
	}
	if rep.Error != "" {
		// Neither aborted nor known to be moved: the target did not
		// answer, and mtcpd ends the migration in the background.
		fmt.Fprintf(w, "process %d (%s): not known to have moved to %s or to have stayed: %s\n", rep.PID, rep.Command, rep.To, rep.Error)
		return
	}
	if rep.Lazy {
		fmt.Fprintf(w, "moved process %d (%s) to %s as pid %d with %d connection(s), post-copy: %d bytes of images before the restore, the memory after\n",
			rep.PID, rep.Command, rep.To, rep.NewPID, rep.Conns, rep.ImageBytes)
	} else {
		fmt.Fprintf(w, "moved process %d (%s) to %s as pid %d with %d connection(s); %d pages, %d bytes of other images\n",
			rep.PID, rep.Command, rep.To, rep.NewPID, rep.Conns, rep.Pages, rep.ImageBytes)
	}
	if rep.Unmoved > 0 {
		fmt.Fprintf(w, "  %d connection(s) the process accepted during its last dump did not move, and their clients are reset (it took new ones during every attempt)\n", rep.Unmoved)
	}
	var parts []string
	for _, name := range []string{admin.PhaseFreeze, admin.PhaseDump, admin.PhaseTransfer, admin.PhaseRestore, admin.PhaseSwitch, admin.PhasePages} {
		if slices.ContainsFunc(rep.Phases, func(p admin.ProcessPhase) bool { return p.Name == name }) {
			parts = append(parts, fmt.Sprintf("%s %v", name, rep.Phase(name).Round(10*time.Microsecond)))
		}
	}
	fmt.Fprintf(w, "  %s; connections held %v\n", strings.Join(parts, ", "), rep.Pause.Round(10*time.Microsecond))
}

package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	rdebug "runtime/debug"
	"syscall"

	"github.com/mtcp-dev/mtcp/daemon"
	"github.com/mtcp-dev/mtcp/internal/prof"
)

func main() {
	config := flag.String("config", "/etc/mtcp/mtcpd.yaml", "configuration file (YAML)")
	check := flag.Bool("check", false, "check the configuration file and exit")
	debug := flag.Bool("debug", false, "log debug messages")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), `Usage: mtcpd [-config FILE] [-check] [-debug]

mtcpd is the daemon of mtcp, Migratory TCP for Linux. One runs on every
server of a pool; together they move live TCP connections between the
servers while the clients keep their connections. Control it with mtcpctl
(root only, through the admin socket named in the configuration).

-check validates the configuration and loads the files it names (the TLS
certificate and key against the pool CA, the policy file) as mtcpd will
at start, then exits. Relative paths in the configuration are taken from
its own directory.

Signals: SIGHUP reloads the TLS files and the policy file (mtcpd also
notices when they change: the TLS files within a second, the policy file
within two, once it reads the same twice). Every other setting, the
pool's peers included, is read at start only: restart mtcpd to change it.
SIGINT and SIGTERM stop mtcpd, letting migrations under way finish for up
to 30 s.

Environment: GOGC and GOMAXPROCS as for any Go program; MTCP_CPUPROFILE=DIR
writes CPU profiles there (a new one at each SIGUSR2).

Flags:
`)
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		// A flag after it would be ignored too (-check, say).
		fmt.Fprintf(os.Stderr, "mtcpd: unexpected argument %q: flags go before any argument, and the configuration is -config FILE\n", flag.Arg(0))
		os.Exit(2)
	}
	cfg, err := daemon.LoadConfig(*config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mtcpd:", err)
		os.Exit(2)
	}
	if *check {
		if err := cfg.CheckFiles(); err != nil {
			fmt.Fprintln(os.Stderr, "mtcpd:", err)
			os.Exit(2)
		}
		fmt.Println("mtcpd: configuration OK")
		return
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP) // reload the policy file
	ctx = daemon.WithReload(ctx, hup)
	// The daemon's live heap is small but it allocates in bursts (a drain
	// handles thousands of connections at once): collecting less often
	// trades a few tens of MB for CPU. GOGC in the environment overrides.
	if os.Getenv("GOGC") == "" {
		rdebug.SetGCPercent(400)
	}
	stopProf := prof.Start("mtcpd-" + cfg.Name)
	err = daemon.Run(ctx, cfg, log)
	stopProf()
	if err != nil {
		log.Error("mtcpd stopped", "err", err)
		os.Exit(1)
	}
}

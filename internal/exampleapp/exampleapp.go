package exampleapp

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/internal/prof"
)

// Command is one example server.
type Command struct {
	// Name is the command's name, e.g. "mtcp-kv".
	Name string
	// Listen is the default address to listen on.
	Listen string
	// About is the paragraph --help prints between the usage line and the
	// flags.
	About string
	// NameHelp says what the --name flag is used for.
	NameHelp string
	// Flags adds the command's own flags to fs and returns the function
	// that, once they are parsed, makes the handler for the server named
	// name, or says why the flags are wrong.
	Flags func(fs *flag.FlagSet) (handler func(name string) (app.Handler, error))
}

// Run parses args and serves until SIGINT or SIGTERM. It returns the exit
// status: 0 after a signal (or --help), 1 if serving fails, 2 for bad
// usage.
func (c Command) Run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet(c.Name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", c.Listen, "`address` to listen on; also the service name registered with mtcpd")
	daemon := fs.String("daemon", app.DefaultDaemonSocket, "`path` of mtcpd's application socket")
	name := fs.String("name", "", c.NameHelp+" (default: the hostname)")
	verbose := fs.Bool("verbose", false, "log debug records")
	handler := c.Flags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: %s [flags]\n\n%s\nFlags:\n", c.Name, c.About)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", c.Name, fs.Args())
		return 2
	}
	if *name == "" {
		h, err := os.Hostname()
		if err != nil {
			fmt.Fprintf(stderr, "%s: no --name and no hostname: %v\n", c.Name, err)
			return 2
		}
		*name = h
	}
	h, err := handler(*name)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", c.Name, err)
		return 2
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("app", c.Name, "name", *name)
	slog.SetDefault(log) // for the handlers' own records

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Adopting thousands of migrated connections at once allocates in a
	// burst (a goroutine, a buffer and a session each): collecting less
	// often trades some memory for CPU. GOGC in the environment
	// overrides.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	defer prof.Start(c.Name + "-" + *name)()
	if err := app.Serve(ctx, app.Config{Service: *listen, Daemon: *daemon, Handler: h, Logger: log}); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", c.Name, err)
		return 1
	}
	return 0
}

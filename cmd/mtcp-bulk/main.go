package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/mtcp-dev/mtcp/app"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("mtcp-bulk", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", ":7001", "`address` to listen on; also the service name registered with mtcpd")
	daemon := fs.String("daemon", app.DefaultDaemonSocket, "`path` of mtcpd's application socket")
	name := fs.String("name", "", "server identity used in logs (default: the hostname)")
	verbose := fs.Bool("verbose", false, "log debug records")
	rate := fs.Int64("rate", 0, "pace each stream at this many `bytes` per second, in 4 KiB writes (0: as fast as the client reads)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: mtcp-bulk [flags]

A bulk streaming server whose sessions mtcpd can migrate between servers.
A client sends seed and length (8 bytes each, big-endian; length 0 means
endless) and receives that many bytes of the seed's test pattern.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *rate < 0 {
		fmt.Fprintf(stderr, "mtcp-bulk: --rate %d: must be 0 or more\n", *rate)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mtcp-bulk: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if *name == "" {
		h, err := os.Hostname()
		if err != nil {
			fmt.Fprintf(stderr, "mtcp-bulk: no --name and no hostname: %v\n", err)
			return 2
		}
		*name = h
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("app", "mtcp-bulk", "name", *name)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app.Serve(ctx, app.Config{Service: *listen, Daemon: *daemon, Handler: bulk{rate: *rate}, Logger: log}); err != nil {
		fmt.Fprintf(stderr, "mtcp-bulk: %v\n", err)
		return 1
	}
	return 0
}

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
	fs := flag.NewFlagSet("mtcp-kv", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", ":7000", "`address` to listen on; also the service name registered with mtcpd")
	daemon := fs.String("daemon", app.DefaultDaemonSocket, "`path` of mtcpd's application socket")
	name := fs.String("name", "", "server identity that HOST answers (default: the hostname)")
	verbose := fs.Bool("verbose", false, "log debug records")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: mtcp-kv [flags]

A line-oriented key/value session server whose sessions mtcpd can migrate
between servers. Commands: SET k v, GET k, COUNT, HOST, QUIT.

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
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mtcp-kv: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if *name == "" {
		h, err := os.Hostname()
		if err != nil {
			fmt.Fprintf(stderr, "mtcp-kv: no --name and no hostname: %v\n", err)
			return 2
		}
		*name = h
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("app", "mtcp-kv", "name", *name)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := app.Serve(ctx, app.Config{Service: *listen, Daemon: *daemon, Handler: kv{name: *name}, Logger: log})
	if err != nil {
		fmt.Fprintf(stderr, "mtcp-kv: %v\n", err)
		return 1
	}
	return 0
}

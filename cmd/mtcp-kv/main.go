package main

import (
	"flag"
	"io"
	"os"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/internal/exampleapp"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

var command = exampleapp.Command{
	Name:   "mtcp-kv",
	Listen: ":7000",
	About: `A line-oriented key/value session server whose sessions mtcpd can migrate
between servers. Commands: SET k v, GET k, COUNT, HOST, QUIT.
`,
	NameHelp: "server identity that HOST answers",
	Flags: func(*flag.FlagSet) func(string) (app.Handler, error) {
		return func(name string) (app.Handler, error) { return kv{name: name}, nil }
	},
}

func run(args []string, stderr io.Writer) int { return command.Run(args, stderr) }

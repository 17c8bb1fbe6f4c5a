package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/internal/exampleapp"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

var command = exampleapp.Command{
	Name:   "mtcp-bulk",
	Listen: ":7001",
	About: `A bulk streaming server whose sessions mtcpd can migrate between servers.
A client sends seed and length (8 bytes each, big-endian; length 0 means
endless) and receives that many bytes of the seed's test pattern. An HTTP
client asks for GET /SEED/LENGTH (decimal), e.g.
  curl -o /dev/null http://10.77.2.11:7001/42/100000000
`,
	NameHelp: "server identity used in logs",
	Flags: func(fs *flag.FlagSet) func(string) (app.Handler, error) {
		rate := fs.Int64("rate", 0, "pace each stream at this many `bytes` per second, in 4 KiB writes (0: as fast as the client reads)")
		return func(string) (app.Handler, error) {
			if *rate < 0 {
				return nil, fmt.Errorf("--rate %d: must be 0 or more", *rate)
			}
			return bulk{rate: *rate}, nil
		}
	},
}

func run(args []string, stderr io.Writer) int { return command.Run(args, stderr) }

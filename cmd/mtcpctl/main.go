package main

import (
	"os"

	"github.com/mtcp-dev/mtcp/cmd/mtcpctl/cli"
)

func main() {
	os.Exit(cli.Run(os.Args[1:]))
}

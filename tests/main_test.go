package tests

import (
	"os"
	"testing"

	"github.com/mtcp-dev/mtcp/tests/pool"
)

func TestMain(m *testing.M) {
	if path := os.Getenv(hopEchoEnv); path != "" {
		os.Exit(hopEcho(path))
	}
	code := m.Run()
	pool.RemoveBinaries()
	os.Exit(code)
}

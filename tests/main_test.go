package tests

import (
	"os"
	"testing"

	"github.com/mtcp-dev/mtcp/tests/pool"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pool.RemoveBinaries()
	os.Exit(code)
}

package tests

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/tests/pool"
)

var unmapAP = pool.Unmap

// kv is a client session of mtcp-kv.
type kv struct {
	t  testing.TB
	c  *net.TCPConn
	rd *bufio.Reader
}

func (s *kv) do(cmd string) string {
	s.t.Helper()
	s.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(s.c, cmd+"\n"); err != nil {
		s.t.Fatalf("%s: %v", cmd, err)
	}
	line, err := s.rd.ReadString('\n')
	if err != nil {
		s.t.Fatalf("%s: %v", cmd, err)
	}
	return strings.TrimSpace(line)
}

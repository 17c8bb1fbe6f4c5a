package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"

	"github.com/mtcp-dev/mtcp/app"
)

// maxLine bounds a command line; a longer one ends the session.
const maxLine = 64 << 10

// maxRead is the largest read buffer a session grows to.
const maxRead = 32 << 10

// session is the per-connection state; its snapshot is binary
// (snapshot.go). The JSON tags read the snapshots of earlier versions.
type session struct {
	// Data is the session's key/value map.
	Data map[string]string `json:"data"`
	// Count is the number of commands served, the current one included.
	Count int64 `json:"count"`
	// In holds bytes read from the client but not processed yet (a
	// partial command line, or pipelined commands).
	In []byte `json:"in,omitempty"`
	// Out holds reply bytes not written yet.
	Out []byte `json:"out,omitempty"`
	// Quit is set once QUIT was answered: the session ends when Out is
	// written.
	Quit bool `json:"quit,omitempty"`
}

// kv is the mtcp-kv handler.
type kv struct {
	name string // what HOST answers
}

// Serve runs one session: it processes complete lines from In, writes
// Out, and reads more, until the client quits or goes away or the
// connection is migrated (then the session is the snapshot).
func (h kv) Serve(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
	s := &session{Data: map[string]string{}}
	if snap != nil {
		if err := s.unmarshal(snap); err != nil {
			return nil, fmt.Errorf("mtcp-kv: %w", err)
		}
	}
	// Sessions are mostly idle with short lines: a small read buffer
	// keeps ten thousand of them cheap (a drain adopts them all at once);
	// it grows when a read fills it.
	buf := make([]byte, 512)
	for {
		// Answer every complete line before reading more, so that what
		// is left in In is never a complete, unanswered command.
		for !s.Quit {
			i := bytes.IndexByte(s.In, '\n')
			if i < 0 {
				break
			}
			line := strings.TrimSuffix(string(s.In[:i]), "\r")
			s.In = s.In[i+1:]
			s.Out = append(s.Out, h.do(s, line)...)
			s.Out = append(s.Out, '\n')
		}
		if len(s.Out) > 0 {
			n, err := conn.Write(s.Out)
			s.Out = s.Out[n:]
			if err != nil {
				return h.stop(s, err)
			}
		}
		if s.Quit {
			return nil, nil
		}
		if len(s.In) > maxLine {
			io.WriteString(conn, "ERR line too long\n")
			return nil, fmt.Errorf("mtcp-kv: client sent a line longer than %d bytes", maxLine)
		}
		if ctx.Err() != nil {
			return h.stop(s, context.Cause(ctx))
		}
		n, err := conn.Read(buf)
		s.In = append(s.In, buf[:n]...)
		if n == len(buf) && len(buf) < maxRead {
			buf = make([]byte, 2*len(buf))
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(s.In) == 0 {
				return nil, nil // the client closed between commands
			}
			return h.stop(s, err)
		}
	}
}

// stop ends Serve after an I/O error: with the session as the snapshot
// if the connection is being migrated, or with the error.
func (h kv) stop(s *session, err error) ([]byte, error) {
	if errors.Is(err, app.ErrMigrating) {
		return s.marshal(), nil
	}
	return nil, err
}

// do runs one command and returns its reply line.
func (h kv) do(s *session, line string) string {
	s.Count++
	cmd, rest, _ := strings.Cut(line, " ")
	switch strings.ToUpper(cmd) {
	case "SET":
		k, v, ok := strings.Cut(rest, " ")
		if !ok || k == "" {
			return "ERR usage: SET key value"
		}
		s.Data[k] = v
		return "OK"
	case "GET":
		if rest == "" || strings.Contains(rest, " ") {
			return "ERR usage: GET key"
		}
		if v, ok := s.Data[rest]; ok {
			return v
		}
		return "NIL"
	case "COUNT":
		return strconv.FormatInt(s.Count, 10)
	case "HOST":
		return h.name
	case "QUIT":
		s.Quit = true
		return "BYE"
	case "":
		return "ERR empty command"
	default:
		return fmt.Sprintf("ERR unknown command %q (commands: SET k v, GET k, COUNT, HOST, QUIT)", cmd)
	}
}

package app_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/app"
)

// A minimal migratory server: it numbers the lines each client sends.
// The snapshot holds the line count, the input read but not answered
// (a partial line, what bufio buffered) and a reply cut short by the
// migration.
func Example() {
	type state struct {
		Lines   int    `json:"lines"`
		Pending []byte `json:"pending,omitempty"`
		Unsent  []byte `json:"unsent,omitempty"`
	}
	numbered := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		var st state
		if snap != nil {
			if err := json.Unmarshal(snap, &st); err != nil {
				return nil, err
			}
		}
		// The input not yet answered: the snapshot's first, then the
		// client's. When the handler stops, all of it that was read and
		// not answered goes in the snapshot: the partial line, what bufio
		// buffered, and what is left of the snapshot's own.
		pending := bytes.NewReader(st.Pending)
		rd := bufio.NewReader(io.MultiReader(pending, conn))
		unanswered := func(partial string) []byte {
			buffered, _ := rd.Peek(rd.Buffered())
			rest, _ := io.ReadAll(pending)
			return append(append([]byte(partial), buffered...), rest...)
		}
		for {
			if len(st.Unsent) > 0 {
				n, err := conn.Write(st.Unsent)
				st.Unsent = st.Unsent[n:]
				if errors.Is(err, app.ErrMigrating) {
					st.Pending = unanswered("")
					return json.Marshal(&st)
				} else if err != nil {
					return nil, err
				}
			}
			line, err := rd.ReadString('\n')
			if errors.Is(err, app.ErrMigrating) {
				st.Pending = unanswered(line)
				return json.Marshal(&st)
			}
			if err == io.EOF {
				return nil, nil // the client is done
			} else if err != nil {
				return nil, err
			}
			st.Lines++
			st.Unsent = fmt.Appendf(nil, "%d %s", st.Lines, line)
		}
	})

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app.Serve(ctx, app.Config{Service: ":7000", Handler: numbered}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// The daemon's side: a Registry on a unix socket. An application
// registers its service; the daemon can then list, export and import its
// connections.
func ExampleRegistry() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "mtcp-example")
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "app.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		fmt.Println(err)
		return
	}
	reg := app.NewRegistry(nil)
	go reg.Serve(ctx, ln)

	quiet := app.HandlerFunc(func(ctx context.Context, c net.Conn, snap []byte) ([]byte, error) {
		<-ctx.Done()
		return []byte{}, nil // no state, but migratable
	})
	go app.Serve(ctx, app.Config{Service: "127.0.0.1:0", Daemon: sock, Handler: quiet})
	for deadline := time.Now().Add(5 * time.Second); len(reg.Services()) == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond) // poll
	}
	fmt.Println(reg.Services())
	// Output: [127.0.0.1:0]
}

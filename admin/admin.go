package admin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/mtcp-dev/mtcp/internal/ucred"
)

// Conn is one connection the daemon can migrate.
type Conn struct {
	// Client is the client's address, Service the address it dialled
	// (which stays the same wherever the connection lives).
	Client  string `json:"client"`
	Service string `json:"service"`
	// Local is the socket's own local address on this host (differs from
	// Service after a migration).
	Local string `json:"local"`
	// App is the application service serving it (":7000"), empty for a
	// connection of a process that does not use mtcp's app library.
	App string `json:"app"`
	// PID and Command name the process holding a connection no
	// application serves (App is empty): process mode moves it together
	// with that process (mtcpctl migrate --pid PID), not on its own.
	PID     int    `json:"pid,omitempty"`
	Command string `json:"command,omitempty"`
	// State is the TCP state ("ESTABLISHED", ...).
	State string `json:"state"`
	// RTT and Retrans come from the socket's TCP_INFO.
	RTT     time.Duration `json:"rtt_ns"`
	Retrans uint32        `json:"retrans"`
	// Migratable is empty when the connection can move, else why not.
	Migratable string `json:"not_migratable,omitempty"`
}

// MigrateRequest asks to move connections to a peer. Exactly one of Flows,
// Service and All selects them.
type MigrateRequest struct {
	// Flows are client addresses (IP:port) of connections to move.
	Flows []string `json:"flows,omitempty"`
	// Service moves every connection of an application service (":7000").
	Service string `json:"service,omitempty"`
	// All moves every migratable connection.
	All bool `json:"all,omitempty"`
	// To is the peer's name.
	To string `json:"to"`
}

// Report says what a migration did.
type Report struct {
	To      string                   `json:"to"`
	Moved   []string                 `json:"moved"`
	Failed  map[string]string        `json:"failed,omitempty"`
	Timings map[string]time.Duration `json:"timings_ns"`
	Aborted bool                     `json:"aborted"`
	// Error is what went wrong as a whole (a phase that failed, an abort
	// that could not put everything back), if anything; Failed says
	// which connections it cost.
	Error string `json:"error,omitempty"`
	// TargetFailed is how many of Failed failed on the target's side:
	// it could not be reached, or refused or failed them at its
	// prepare, restore or commit.
	TargetFailed int `json:"target_failed,omitempty"`
}

// DrainRequest asks to move every connection away: to one peer (To) or
// spread over the healthy peers (Spread).
type DrainRequest struct {
	To     string `json:"to,omitempty"`
	Spread bool   `json:"spread,omitempty"`
	// Batch is how many connections move per transaction; 0 = 1000.
	Batch int `json:"batch,omitempty"`
}

// Progress is one line of a drain's progress stream; the last one carries
// the reports.
type Progress struct {
	Total   int      `json:"total"`
	Done    int      `json:"done"`
	Failed  int      `json:"failed"`
	Final   bool     `json:"final"`
	Reports []Report `json:"reports,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// Status is the daemon's view of the pool.
type Status struct {
	Name     string       `json:"name"`
	Role     string       `json:"role"`
	Steering string       `json:"steering"`
	Conns    int          `json:"conns"`
	Services []string     `json:"services"`
	Peers    []PeerStatus `json:"peers"`
}

// PeerStatus is one peer as this daemon last saw it.
type PeerStatus struct {
	Name     string        `json:"name"`
	Addr     string        `json:"addr"`
	Healthy  bool          `json:"healthy"`
	Error    string        `json:"error,omitempty"`
	Load     float64       `json:"load"`
	Conns    int           `json:"conns"`
	RTT      time.Duration `json:"rtt_ns"`
	LastSeen time.Time     `json:"last_seen"`
}

// errorBody is how the server reports a failed request.
type errorBody struct {
	Error string `json:"error"`
}

// Listen creates the root-only admin socket at path: its directory is made
// mode 0700 if missing, a stale socket file is replaced, and the socket is
// mode 0600.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	ln, err := ListenFresh(path, "admin socket")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return ln, nil
}

// NewServer returns the HTTP server of the admin API h, for a listener
// from Listen: each connection is served only if the kernel says its
// process runs as root (SO_PEERCRED), whatever the socket file's mode
// (a directory shared with others, a permissive umask while the socket
// is made); others get 403 and ErrDenied. Its requests' contexts derive
// from ctx.
func NewServer(ctx context.Context, h http.Handler) *http.Server {
	return &http.Server{
		// A client that connects and sends nothing, or stays idle,
		// does not keep its descriptor for ever (no limit on the body
		// or the response: a drain streams its progress).
		ReadHeaderTimeout: headerTimeout,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			uc, ok := c.(*net.UnixConn)
			if !ok {
				return context.WithValue(ctx, peerKey{}, errors.New("not a unix socket connection"))
			}
			_, uid, err := ucred.Peer(uc)
			if err == nil && uid != 0 {
				err = fmt.Errorf("uid %d is not root", uid)
			}
			return context.WithValue(ctx, peerKey{}, err)
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err, _ := r.Context().Value(peerKey{}).(error); err != nil {
				WriteError(w, http.StatusForbidden, fmt.Errorf("mtcpd serves root only: %w", err))
				return
			}
			h.ServeHTTP(w, r)
		}),
	}
}

// headerTimeout is how long the admin server waits for a request's
// header. A variable for the tests.
var headerTimeout = 10 * time.Second

// peerKey keys the result of NewServer's check of a connection's peer
// in its requests' contexts: nil if it is root.
type peerKey struct{}

// ListenFresh listens on a unix socket at path, in an existing
// directory, replacing a socket file an earlier run left but not one a
// process still answers on (another mtcpd); what names the socket in
// errors ("admin socket").
func ListenFresh(path, what string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s: %s exists and is not a socket", what, path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %s is in use (is another mtcpd running?)", what, path)
		}
		os.Remove(path)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return ln, nil
}

// WriteJSON writes v as the response body.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// WriteError reports err with an HTTP status code.
func WriteError(w http.ResponseWriter, code int, err error) {
	WriteJSON(w, code, errorBody{Error: err.Error()})
}

// Client talks to mtcpd's admin socket.
type Client struct {
	path string
	hc   *http.Client
}

// DefaultSocket is where mtcpd listens unless configured otherwise.
const DefaultSocket = "/run/mtcp/admin.sock"

// NewClient returns a client of the admin socket at path ("" =
// DefaultSocket).
func NewClient(path string) *Client {
	if path == "" {
		path = DefaultSocket
	}
	return &Client{path: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

// ErrNoDaemon: nothing listens on the admin socket.
var ErrNoDaemon = errors.New("mtcpd is not running")

// ErrDenied: this user may not use the admin socket (it is root-only).
var ErrDenied = errors.New("permission denied: mtcpd's admin socket is root-only (run as root, with sudo)")

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(out)
}

func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://mtcpd"+path, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrPermission):
			return nil, fmt.Errorf("%s: %w", c.path, ErrDenied)
		case errors.Is(err, os.ErrNotExist):
			return nil, fmt.Errorf("no admin socket at %s: %w (or it listens elsewhere: admin_socket in its configuration, --admin here)", c.path, ErrNoDaemon)
		case isRefused(err):
			return nil, fmt.Errorf("nothing answers on %s: %w (the file is left from an earlier run, or is not a socket)", c.path, ErrNoDaemon)
		}
		return nil, fmt.Errorf("admin %s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		var e errorBody
		if json.NewDecoder(resp.Body).Decode(&e) != nil || e.Error == "" {
			e.Error = resp.Status
		}
		if resp.StatusCode == http.StatusForbidden {
			return nil, fmt.Errorf("%s: %w (%s)", c.path, ErrDenied, e.Error)
		}
		return nil, errors.New(e.Error)
	}
	return resp, nil
}

func isRefused(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "dial"
}

// QueryTimeout bounds Status and Conns, which a working mtcpd answers at
// once: past it, mtcpd is taken to be stuck. (Migrations and drains have
// no such bound: they may rightly take minutes.)
var QueryTimeout = 30 * time.Second

// query runs a GET that QueryTimeout bounds.
func (c *Client) query(ctx context.Context, path string, out any) error {
	qctx, cancel := context.WithTimeoutCause(ctx, QueryTimeout, errStuck)
	defer cancel()
	err := c.do(qctx, http.MethodGet, path, nil, out)
	if err != nil && errors.Is(context.Cause(qctx), errStuck) && ctx.Err() == nil {
		return fmt.Errorf("mtcpd at %s did not answer within %v: it is stuck or overloaded (its log may say why)", c.path, QueryTimeout)
	}
	return err
}

var errStuck = errors.New("mtcpd did not answer in time")

// Status returns the daemon's view of the pool.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.query(ctx, "/v1/status", &s)
}

// Conns lists the connections the daemon can see.
func (c *Client) Conns(ctx context.Context) ([]Conn, error) {
	var cs []Conn
	return cs, c.query(ctx, "/v1/conns", &cs)
}

// Migrate moves connections and reports what happened.
func (c *Client) Migrate(ctx context.Context, r *MigrateRequest) (*Report, error) {
	var rep Report
	return &rep, c.do(ctx, http.MethodPost, "/v1/migrate", r, &rep)
}

// Drain moves every connection away, calling progress for each update,
// and returns the final progress.
func (c *Client) Drain(ctx context.Context, r *DrainRequest, progress func(Progress)) (*Progress, error) {
	resp, err := c.send(ctx, http.MethodPost, "/v1/drain", r)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 64<<20)
	for sc.Scan() {
		var p Progress
		if err := json.Unmarshal(sc.Bytes(), &p); err != nil {
			return nil, fmt.Errorf("drain: bad progress line: %w", err)
		}
		if progress != nil {
			progress(p)
		}
		if p.Final {
			if p.Error != "" {
				return &p, errors.New(p.Error)
			}
			return &p, nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("drain: %w", err)
	}
	return nil, errors.New("drain: the daemon ended the stream early")
}

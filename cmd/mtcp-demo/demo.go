package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/tests/pool"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

const (
	// bedPrefix names the demo's testbed: namespaces mtcpdemo-client,
	// mtcpdemo-s1, ... It cannot clash with `mtcpctl testbed` beds
	// (mtcp-NAME) or test beds (mtt<pid>x<hex>).
	bedPrefix = "mtcpdemo"
	// lockName is the abstract unix socket that only one running demo can
	// bind; the kernel releases it when the process ends, however it ends.
	lockName = "@mtcp-demo.lock"
	// servicePort is mtcp-bulk's port.
	servicePort = 7000
	// resumeTimeout bounds the wait for the stream to flow again after a
	// migration.
	resumeTimeout = 10 * time.Second
	// goFallback is where tests/setup.sh expects Go, for `sudo`, whose
	// PATH usually lacks it.
	goFallback = "/usr/local/go/bin"
)

// config is what the command line asks for.
type config struct {
	migrations int
	interval   time.Duration
	v6         bool
	verbose    bool
}

// run parses the command line and runs the demo. It returns only for bad
// usage or a failed preflight check; once the demo has started making
// things, it exits through runner.exit.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("mtcp-demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg config
	fs.IntVar(&cfg.migrations, "migrations", 12, "how many times to move the connection, around s1 -> s2 -> s3 -> s1 ...")
	fs.DurationVar(&cfg.interval, "interval", 500*time.Millisecond, "time from one migration to the next (the stream flows in between)")
	fs.BoolVar(&cfg.v6, "v6", false, "connect over IPv6 instead of IPv4")
	fs.BoolVar(&cfg.verbose, "v", false, "also print the pool's log (mtcpd and mtcp-bulk output, migration timings)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: sudo mtcp-demo [flags]

Builds a testbed of network namespaces (client, gateway, s1, s2, s3),
starts mtcpd and the mtcp-bulk streaming server on s1, s2 and s3, connects
a client to s1's address that streams and verifies every byte, and moves
that connection around the pool (s1 -> s2 -> s3 -> s1 ...), printing for
each migration the pause the client saw, the bytes verified and errors.
The client keeps its one connection to s1's address throughout. Nothing
is left behind when the demo ends, also on Ctrl-C.

Needs root, ethtool, iproute2, nftables (tests/setup.sh installs them),
and Go with the source tree the demo was built from: it builds mtcpd and
mtcp-bulk from it when it starts.

Exit status: 0 if every byte was verified and the client saw no error and
no TCP reset; 1 otherwise; 2 for bad usage; 130 after Ctrl-C.

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
	switch {
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "mtcp-demo: unexpected arguments %q\n", fs.Args())
		return 2
	case cfg.migrations < 0:
		fmt.Fprintf(stderr, "mtcp-demo: --migrations %d: give 0 or more\n", cfg.migrations)
		return 2
	case cfg.interval < 0:
		fmt.Fprintf(stderr, "mtcp-demo: --interval %v: give 0 or more\n", cfg.interval)
		return 2
	}
	if err := preflight(); err != nil {
		fmt.Fprintf(stderr, "mtcp-demo: %v\n", err)
		return 1
	}
	lock, err := net.Listen("unix", lockName)
	if err != nil {
		fmt.Fprintf(stderr, "mtcp-demo: another mtcp-demo seems to be running (%v); only one can run at a time\n", err)
		return 1
	}
	r := newRunner(cfg.verbose, stdout, stderr)
	// Held until the demo ends; the cleanup also keeps the listener
	// reachable, so that no finalizer closes it early.
	r.Cleanup(func() { lock.Close() })
	demo(cfg, r)
	return 1 // not reached: demo exits
}

// preflight checks what the demo needs before it makes anything.
func preflight() error {
	if reason := testbed.SkipReason(); reason != "" {
		return errors.New(strings.TrimPrefix(reason, "testbed: "))
	}
	if _, err := exec.LookPath("ethtool"); err != nil {
		return errors.New("needs ethtool in PATH (apt-get install ethtool, or run tests/setup.sh)")
	}
	if _, err := sourceRoot(); err != nil {
		return err
	}
	if _, err := exec.LookPath("go"); err != nil {
		if _, serr := os.Stat(filepath.Join(goFallback, "go")); serr != nil {
			return fmt.Errorf("needs Go to build mtcpd and mtcp-bulk: no go in PATH or in %s (install Go ≥ 1.26 there)", goFallback)
		}
		os.Setenv("PATH", os.Getenv("PATH")+string(os.PathListSeparator)+goFallback)
	}
	return nil
}

// sourceRoot returns the mtcp source tree this program was built from;
// the pool harness builds the daemons from it.
func sourceRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	root := filepath.Dir(filepath.Dir(filepath.Dir(file)))
	if !ok || !filepath.IsAbs(file) {
		return "", errors.New("was built without its source path (-trimpath?); build it from the mtcp source tree with plain `go build`")
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("needs the mtcp source tree it was built from, %s, to build mtcpd and mtcp-bulk: %w", root, err)
	}
	return root, nil
}

// demo runs the demo and exits through r.
func demo(cfg config, r *runner) {
	ctx, cancel := context.WithCancel(context.Background())
	r.onExit = cancel   // set before anything can exit
	var upMu sync.Mutex // held while testbed.Up runs
	// Output to a closed pipe (`mtcp-demo | head`) must fail the write,
	// not kill the demo before it has removed the testbed. Notify, not
	// Ignore: an ignored signal would stay ignored in the processes the
	// demo starts.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigc
		r.errorf("%v: stopping; removing the testbed and everything in it", s)
		code := 130
		if sig, ok := s.(syscall.Signal); ok {
			code = 128 + int(sig)
		}
		r.exit(code, "")
	}()

	// Every temporary file of the demo and of the pool harness (its
	// binaries, certificates, sockets) goes into one directory, removed
	// last.
	removeStaleTemp(r)
	tmp, err := os.MkdirTemp("", "mtcp-demo-")
	if err != nil {
		r.Fatalf("temporary directory: %v", err)
	}
	r.Cleanup(func() {
		if err := os.RemoveAll(tmp); err != nil {
			r.failed("removing %s: %v", tmp, err)
		}
	})
	if err := os.WriteFile(filepath.Join(tmp, tempMarker), nil, 0o600); err != nil {
		r.Fatalf("temporary directory: %v", err)
	}
	os.Setenv("TMPDIR", tmp)

	root, _ := sourceRoot()
	r.printf("building mtcpd and mtcp-bulk from %s ...", root)
	t0 := time.Now()
	pool.Binaries(r)
	r.printf(" %.1f s\n", time.Since(t0).Seconds())

	// The cleanup works from the bed's name, whether Up finished or not.
	named := testbed.Describe(bedPrefix)
	r.Cleanup(func() {
		upMu.Lock() // let an interrupted Up clean up after itself first
		defer upMu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := named.Down(ctx); err != nil {
			r.failed("%v", err)
		}
		left, err := testbed.Leftovers(ctx, bedPrefix)
		switch {
		case err != nil:
			r.failed("checking what the testbed left: %v", err)
		case len(left) > 0:
			r.failed("left behind: %s", strings.Join(left, "; "))
		default:
			r.printf("testbed %s removed; no namespace or process left\n", bedPrefix)
		}
	})
	if slices.ContainsFunc(named.Hosts(), (*testbed.Host).Exists) {
		r.printf("removing testbed %s, left by a demo that was killed\n", bedPrefix)
		if err := named.Down(ctx); err != nil {
			r.Fatalf("%v", err)
		}
	}
	t0 = time.Now()
	upMu.Lock()
	bed, err := testbed.Up(ctx, testbed.Options{Prefix: bedPrefix})
	upMu.Unlock()
	if err != nil {
		r.Fatalf("%v", err)
	}
	r.printf("testbed %s up in %.1f s: client %s, gateway, s1 %s, s2 %s, s3 %s\n", bedPrefix, time.Since(t0).Seconds(),
		serviceAddr(bed.Client, cfg.v6), serviceAddr(bed.S1, cfg.v6), serviceAddr(bed.S2, cfg.v6), serviceAddr(bed.S3, cfg.v6))
	if err := installCounters(ctx, bed.Client, bed.S1, servicePort); err != nil {
		r.Fatalf("%v", err)
	}

	t0 = time.Now()
	p := pool.Start(r, bed, pool.Options{App: "mtcp-bulk", Port: servicePort, Quiet: !cfg.verbose})
	r.printf("pool up in %.1f s: mtcpd (forward steering) and mtcp-bulk on s1, s2, s3\n", time.Since(t0).Seconds())

	c := p.Dial(bed.S1, cfg.v6)
	s, err := startStream(c, stream.Pattern(time.Now().UnixNano()))
	if err != nil {
		r.Fatalf("%v", err)
	}
	flow := pool.Unmap(c.LocalAddr().(*net.TCPAddr).AddrPort()).String()
	pool.Eventually(r, 10*time.Second, "s1's mtcpd to list the client's connection", func() (bool, string) {
		cs, err := p.Admin(bed.S1).Conns(ctx)
		if err != nil {
			return false, err.Error()
		}
		return slices.ContainsFunc(cs, func(c admin.Conn) bool { return c.Client == flow }), fmt.Sprint(len(cs), " connections")
	})
	r.printf("client %s connected to s1 %s, streaming; every byte is verified\n", flow, pool.Unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort()))

	loop := []*testbed.Host{bed.S1, bed.S2, bed.S3}
	width := len(strconv.Itoa(cfg.migrations)) // aligns the migration lines
	var pauses []time.Duration
	next := time.Now().Add(cfg.interval)
	for i := range cfg.migrations {
		select {
		case <-time.After(time.Until(next)):
		case <-ctx.Done():
			r.exit(1, "") // interrupted: the signal handler is exiting
		}
		from, to := loop[i%3], loop[(i+1)%3]
		next = time.Now().Add(cfg.interval)
		s.startMeter()
		rep := p.Migrate(from, to, c)
		r.Logf("migration %d: %v", i+1, rep.Timings)
		pause, err := s.stopMeterAfter(time.Now(), resumeTimeout)
		n, _ := s.state()
		if ctx.Err() != nil {
			// Interrupted: what the client saw since is the teardown.
			r.exit(1, "")
		}
		if err != nil {
			r.printf("migration %d: %s -> %s  verified %d bytes  ERROR: %v\n", i+1, from.Name, to.Name, n, err)
			r.exit(1, fmt.Sprintf("the client saw an error at migration %d", i+1))
		}
		pauses = append(pauses, pause)
		r.printf("migration %*d: %s -> %s  pause %5.2f ms  verified %11d bytes  no errors\n", width, i+1, from.Name, to.Name, ms(pause), n)
	}
	select {
	case <-time.After(time.Until(next)):
	case <-ctx.Done():
		r.exit(1, "")
	}

	ok := true
	err = s.finish(20 * time.Second)
	if ctx.Err() != nil {
		r.exit(1, "")
	}
	if err != nil {
		r.errorf("the client's stream: %v", err)
		ok = false
	}
	total, _ := s.state()
	cnt, err := readCounters(ctx, bed.Client)
	if err != nil {
		r.Fatalf("%v", err)
	}
	r.printf("\nsummary: %d migrations, %d bytes verified (in order, exactly once)", cfg.migrations, total)
	if len(pauses) > 0 {
		slices.Sort(pauses)
		r.printf(", pause max %.2f ms, median %.2f ms", ms(pauses[len(pauses)-1]), ms(pauses[len(pauses)/2]))
	}
	r.printf("\nclient: RSTs received %d, sent %d; packets from or to an address other than s1's: %d, %d; ",
		cnt["rst_in"], cnt["rst_out"], cnt["from_other"], cnt["to_other"])
	if ok {
		r.printf("no errors\n")
	} else {
		r.printf("ERRORS (see above)\n")
	}
	for _, n := range counterNames {
		if cnt[n] != 0 {
			ok = false
		}
	}
	if ok {
		r.printf("result: OK\n")
		r.exit(0, "")
	}
	r.printf("result: FAILED\n")
	r.exit(1, "")
}

// tempMarker marks the demo's temporary directories.
const tempMarker = ".mtcp-demo"

// removeStaleTemp removes the temporary directories of demos killed with
// SIGKILL: with the lock held, no other demo is using one.
func removeStaleTemp(r *runner) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "mtcp-demo-*"))
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, tempMarker)); err != nil {
			continue
		}
		r.printf("removing %s, left by a demo that was killed\n", d)
		if err := os.RemoveAll(d); err != nil {
			r.errorf("%v", err)
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

package pool

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mtcp-dev/mtcp/nat/netns"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// MetricsAddr is where each server's mtcpd serves its metrics, on the
// server's own loopback, when the pool runs a policy (Options.Policy).
const MetricsAddr = "127.0.0.1:9470"

// policyConfig is what a member's configuration gets for
// Options.Policy: the policy file (written to the member's directory),
// load measured in the scope of its network namespace (the servers of a
// testbed share one kernel, so the machine's load would be the same for
// all) and a metrics endpoint.
func (p *Pool) policyConfig(h *testbed.Host, dir string) string {
	if p.opts.Policy == "" || h == p.Bed.Gateway {
		return ""
	}
	path := filepath.Join(dir, "policy.yaml")
	p.writeFile(h, path, []byte(p.opts.Policy), 0o600)
	return fmt.Sprintf("policy: %s\nload: {scope: netns}\nmetrics: %s\n", path, MetricsAddr)
}

// PolicyFile returns the path of h's policy file (with Options.Policy).
func (p *Pool) PolicyFile(h *testbed.Host) string {
	return filepath.Join(p.hostDir(h), "policy.yaml")
}

// WritePolicy replaces h's policy file; its mtcpd notices the change
// within a second. On this machine the new file is renamed over the old
// one, so the daemon never reads half a file.
func (p *Pool) WritePolicy(h *testbed.Host, policy string) {
	p.t.Helper()
	path := p.PolicyFile(h)
	if h.Remote() {
		p.writeFile(h, path, []byte(policy), 0o600)
		return
	}
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(policy), 0o600); err != nil {
		p.t.Fatalf("%v", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		p.t.Fatalf("%v", err)
	}
}

// Metrics returns the Prometheus text of h's mtcpd (with Options.Policy).
// The endpoint listens on h's loopback: the request is made from inside
// h's network namespace.
func (p *Pool) Metrics(h *testbed.Host) (string, error) {
	if h.Remote() {
		return "", errors.New("pool: Metrics reaches only hosts of this machine")
	}
	var c net.Conn
	err := netns.Do(h.NetNSPath(), func() (err error) {
		c, err = net.DialTimeout("tcp", MetricsAddr, 5*time.Second)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("%s metrics: %w", h.Name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req, _ := http.NewRequestWithContext(context.Background(), "GET", "http://"+MetricsAddr+"/metrics", nil)
	if err := req.Write(c); err != nil {
		return "", fmt.Errorf("%s metrics: %w", h.Name, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		return "", fmt.Errorf("%s metrics: %w", h.Name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %s", resp.Status)
	}
	if err != nil {
		return "", fmt.Errorf("%s metrics: %w", h.Name, err)
	}
	return string(b), nil
}

// Metric sums the samples of the metric name in Prometheus text whose
// labels include every pair of labels ("reason", "triggered", ...).
func Metric(text, name string, labels ...string) float64 {
	sum := 0.0
	for line := range strings.Lines(text) {
		line = strings.TrimSpace(line)
		rest, ok := strings.CutPrefix(line, name)
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		var set string
		switch {
		case strings.HasPrefix(rest, "{"):
			i := strings.LastIndexByte(rest, '}')
			if i < 0 {
				continue
			}
			set, rest = rest[1:i], rest[i+1:]
		case strings.HasPrefix(rest, " "):
		default:
			continue // another metric whose name begins with name
		}
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			if !strings.Contains(","+set+",", fmt.Sprintf(",%s=%q,", labels[i], labels[i+1])) {
				match = false
			}
		}
		if !match {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		if v, err := strconv.ParseFloat(f[0], 64); err == nil {
			sum += v
		}
	}
	return sum
}

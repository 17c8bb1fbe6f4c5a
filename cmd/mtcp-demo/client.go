package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/mtcp-dev/mtcp/internal/stream"
	"github.com/mtcp-dev/mtcp/tests/testbed"
)

// streamClient is the demo's client of mtcp-bulk: it asks for an endless
// stream and verifies every byte as it reads (exactly once, in order),
// keeping the time of each read so that the pause of a migration can be
// measured.
type streamClient struct {
	c    *net.TCPConn
	seed stream.Pattern
	done chan struct{} // closed when the reader stops

	mu       sync.Mutex
	verified int64     // bytes verified
	last     time.Time // time of the latest read (or of startMeter)
	err      error     // the first error; io.EOF once the server ended the stream
	metering bool
	maxGap   time.Duration // largest gap between reads since startMeter
}

// startStream sends mtcp-bulk's request for an endless stream (seed, then
// length 0, 8 bytes each, big-endian) on c and starts the reader.
func startStream(c *net.TCPConn, seed stream.Pattern) (*streamClient, error) {
	req := binary.BigEndian.AppendUint64(nil, uint64(seed))
	req = binary.BigEndian.AppendUint64(req, 0)
	if _, err := c.Write(req); err != nil {
		return nil, fmt.Errorf("sending the stream request: %w", err)
	}
	s := &streamClient{c: c, seed: seed, done: make(chan struct{}), last: time.Now()}
	go s.read()
	return s, nil
}

func (s *streamClient) read() {
	defer close(s.done)
	v := &stream.Verifier{Pattern: s.seed}
	buf := make([]byte, 256<<10)
	for {
		n, err := s.c.Read(buf)
		now := time.Now()
		if n > 0 {
			if _, verr := v.Write(buf[:n]); verr != nil {
				err = verr
			}
		}
		s.mu.Lock()
		if n > 0 {
			if gap := now.Sub(s.last); s.metering && gap > s.maxGap {
				s.maxGap = gap
			}
			s.last = now
		}
		s.verified = v.N
		if err != nil && s.err == nil {
			s.err = err
		}
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// state returns the bytes verified so far and the reader's error.
func (s *streamClient) state() (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.verified, s.err
}

// startMeter starts measuring the largest gap between reads, counting from
// now.
func (s *streamClient) startMeter() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.metering, s.maxGap, s.last = true, 0, time.Now()
}

// stopMeterAfter waits until the client has read data later than t (the
// stream flows again), then stops the meter and returns the largest gap.
// It fails if the reader stops or nothing arrives within timeout.
func (s *streamClient) stopMeterAfter(t time.Time, timeout time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	for {
		s.mu.Lock()
		resumed, err, gap := s.last.After(t), s.err, s.maxGap
		if resumed || err != nil {
			s.metering = false
		}
		s.mu.Unlock()
		switch {
		case err != nil:
			return gap, err
		case resumed:
			return gap, nil
		case time.Now().After(deadline):
			return gap, fmt.Errorf("the stream did not resume within %v", timeout)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// finish shuts down the client's side of the connection, which ends the
// session at the server, and reads (and verifies) the rest of the stream
// up to the server's FIN. A clean end returns nil.
func (s *streamClient) finish(timeout time.Duration) error {
	if err := s.c.CloseWrite(); err != nil {
		return fmt.Errorf("closing the client's side: %w", err)
	}
	select {
	case <-s.done:
	case <-time.After(timeout):
		return fmt.Errorf("the server did not end the stream within %v of the client's FIN", timeout)
	}
	if _, err := s.state(); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// counterNames are the nftables counters the demo keeps in the client's
// namespace, in table inet mtcpdemo.
var counterNames = []string{"rst_in", "rst_out", "from_other", "to_other"}

// installCounters makes the client's namespace count the TCP resets it
// receives and sends, and the packets of the service port that come from,
// or go to, an address other than s's (the client must only ever see the
// address it dialled).
func installCounters(ctx context.Context, client, s *testbed.Host, port uint16) error {
	return client.Nft(ctx, fmt.Sprintf(`table inet mtcpdemo {
	counter rst_in {}
	counter rst_out {}
	counter from_other {}
	counter to_other {}
	chain in {
		type filter hook input priority 0
		tcp flags & rst == rst counter name rst_in
	}
	chain pre {
		type filter hook prerouting priority -400
		tcp sport %[1]d ip saddr != %[2]s counter name from_other
		tcp sport %[1]d ip6 saddr != %[3]s counter name from_other
	}
	chain out {
		type filter hook output priority -400
		tcp flags & rst == rst counter name rst_out
		tcp dport %[1]d ip daddr != %[2]s counter name to_other
		tcp dport %[1]d ip6 daddr != %[3]s counter name to_other
	}
}
`, port, s.LAN4, s.LAN6))
}

// readCounters returns the packet counts of counterNames.
func readCounters(ctx context.Context, client *testbed.Host) (map[string]int, error) {
	out, err := client.Run(ctx, "nft", "-j", "list", "counters", "table", "inet", "mtcpdemo")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Name    string `json:"name"`
				Packets int    `json:"packets"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("nft -j list counters: %w", err)
	}
	got := map[string]int{}
	for _, o := range doc.Nftables {
		if o.Counter != nil {
			got[o.Counter.Name] = o.Counter.Packets
		}
	}
	for _, n := range counterNames {
		if _, ok := got[n]; !ok {
			return nil, fmt.Errorf("nft -j list counters: no counter %s in %s", n, out)
		}
	}
	return got, nil
}

// serviceAddr is s's service address of the family the demo uses.
func serviceAddr(s *testbed.Host, v6 bool) netip.Addr {
	if v6 {
		return s.LAN6
	}
	return s.LAN4
}

package peer_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"
	"net"
	"net/netip"
	"time"

	"github.com/mtcp-dev/mtcp/peer"
)

// target is a Handler: what a pool member does when others migrate
// connections to it.
type target struct{}

func (target) Prepare(ctx context.Context, from string, r *peer.PrepareRequest) (*peer.PrepareReply, error) {
	return &peer.PrepareReply{OK: true}, nil
}

func (target) Transfer(ctx context.Context, from string, r *peer.TransferRequest) (*peer.TransferReply, error) {
	rep := &peer.TransferReply{Results: make([]peer.ItemResult, len(r.Items))}
	for i, it := range r.Items {
		// Restore it.State in repair mode, install rewrite rules...
		fmt.Printf("%s sent %v: %d bytes of TCP state\n", from, it.Flow.Client, len(it.State))
		rep.Results[i].OK = true
	}
	return rep, nil
}

func (target) Commit(ctx context.Context, from string, r *peer.CommitRequest) (*peer.CommitReply, error) {
	return &peer.CommitReply{}, nil
}

func (target) Abort(ctx context.Context, from string, r *peer.AbortRequest) error { return nil }

func (target) Status(ctx context.Context, from string) (*peer.StatusReply, error) {
	return &peer.StatusReply{Name: "s2", Services: []string{":7000"}, Time: time.Now()}, nil
}

// member makes the Config of a pool member; mtcpd loads it from files
// with peer.TLSFiles.Config instead.
func member(ca *peer.CA, name string) *peer.Config {
	certPEM, keyPEM, err := ca.Issue(name, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil, time.Hour)
	if err != nil {
		log.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	return &peer.Config{Name: name, Certificate: cert, Roots: roots}
}

func Example() {
	ca, err := peer.NewCA("example-pool", 24*time.Hour)
	if err != nil {
		log.Fatal(err)
	}

	// s2 serves its peers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- peer.NewServer(member(ca, "s2"), target{}).Serve(ctx, ln) }()

	// s1 migrates a connection to s2: one connection per peer, a
	// deadline per phase.
	c, err := peer.Dial(ctx, ln.Addr().String(), "s2", member(ca, "s1"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	phase, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	flow := peer.FlowID{Client: netip.MustParseAddrPort("10.77.1.2:40000"), Service: netip.MustParseAddrPort("10.77.2.11:7000")}
	rep, err := c.Transfer(phase, &peer.TransferRequest{TxID: 1, Items: []peer.Item{{Flow: flow, Service: ":7000", State: make([]byte, 1500)}}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("restored:", rep.Results[0].OK)

	stop()
	fmt.Println("server stopped:", <-done)
	// Output:
	// s1 sent 10.77.1.2:40000: 1500 bytes of TCP state
	// restored: true
	// server stopped: <nil>
}

package peer

import (
	"context"
	"testing"
)

func benchPool(b *testing.B, maxFrame int) *Client {
	ca := testCA(b, "bench-pool")
	h := &testHandler{}
	h.transfer = func(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error) {
		return &TransferReply{Results: make([]ItemResult, len(r.Items))}, nil
	}
	scfg := memberConfig(b, ca, "s1")
	scfg.MaxFrame = maxFrame
	s := startServer(b, scfg, h)
	ccfg := memberConfig(b, ca, "c1")
	ccfg.MaxFrame = maxFrame
	c, err := Dial(context.Background(), s.addr, "s1", ccfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkTransferSmall is the round trip of a Transfer of one
// connection with a small state (a few hundred bytes: an idle socket).
func BenchmarkTransferSmall(b *testing.B) {
	c := benchPool(b, 0)
	req := &TransferRequest{TxID: 1, Items: []Item{{Flow: testFlow, Service: ":7000", State: make([]byte, 300), App: make([]byte, 64)}}}
	ctx := context.Background()
	for b.Loop() {
		if _, err := c.Transfer(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTransferSmallParallel is many small Transfers in flight on one
// connection.
func BenchmarkTransferSmallParallel(b *testing.B) {
	c := benchPool(b, 0)
	req := &TransferRequest{TxID: 1, Items: []Item{{Flow: testFlow, Service: ":7000", State: make([]byte, 300), App: make([]byte, 64)}}}
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Transfer(context.Background(), req); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkTransfer10kConns is one Transfer batching 10,000 connections
// of 300 bytes of state each.
func BenchmarkTransfer10kConns(b *testing.B) {
	c := benchPool(b, 0)
	req := &TransferRequest{TxID: 1, Items: make([]Item, 10000)}
	for i := range req.Items {
		req.Items[i] = Item{Flow: testFlow, Service: ":7000", State: make([]byte, 300)}
	}
	b.SetBytes(int64(req.WireSize()))
	for b.Loop() {
		if _, err := c.Transfer(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTransfer64MiB is the throughput of a Transfer carrying 64 MiB
// of state (four sockets with 16 MiB queued each).
func BenchmarkTransfer64MiB(b *testing.B) {
	c := benchPool(b, 128<<20)
	req := &TransferRequest{TxID: 1, Items: make([]Item, 4)}
	for i := range req.Items {
		req.Items[i] = Item{Flow: testFlow, Service: ":7000", State: make([]byte, 16<<20)}
	}
	b.SetBytes(64 << 20)
	for b.Loop() {
		if _, err := c.Transfer(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
}

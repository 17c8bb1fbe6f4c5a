//go:build linux

package nat

import (
	"net/netip"
	"testing"
)

// BenchmarkEncode10k measures the Go side of Apply for 10,000 Forwards:
// planning and encoding the messages, without the kernel.
func BenchmarkEncode10k(b *testing.B) {
	var batch Batch
	for _, f := range manyFlows(10000) {
		batch.Forward(f, netip.MustParseAddr("10.77.2.12"))
	}
	n := &nftConn{table: "mtcp"}
	for b.Loop() {
		p, err := makePlan(batch.ops, newIndex())
		if err != nil {
			b.Fatal(err)
		}
		n.elemReqs(p.bySet(DefaultIdle, DefaultHoldIdle))
	}
}

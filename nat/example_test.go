package nat_test

import (
	"log"
	"net/netip"

	"github.com/mtcp-dev/mtcp/nat"
)

// The source host of a migration: hold the flow before the freeze, then
// switch it to the target in one transaction and re-inject what arrived
// meanwhile.
func Example_source() {
	t, err := nat.Open(nat.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer t.Close()
	q, err := nat.OpenQueue(nat.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer q.Close()

	f := nat.Flow{
		Client:  netip.MustParseAddrPort("10.77.1.2:40001"),
		Service: netip.MustParseAddrPort("10.77.2.11:7001"),
	}
	var b nat.Batch
	b.Hold(f)
	if err := t.Apply(&b); err != nil {
		log.Fatal(err)
	}

	// ... freeze, capture, transfer; the target restores and installs
	// its ReplyFrom ...

	b.Reset()
	b.Unhold(f)
	b.Forward(f, netip.MustParseAddr("10.77.2.12"))
	if err := t.Apply(&b); err != nil {
		log.Fatal(err)
	}
	if _, err := q.Release(f); err != nil {
		log.Fatal(err)
	}
}

// The target host: replies of the restored socket (bound to the target's
// own address) leave with the service address the client knows.
func Example_target() {
	t, err := nat.Open(nat.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer t.Close()
	f := nat.Flow{
		Client:  netip.MustParseAddrPort("10.77.1.2:40001"),
		Service: netip.MustParseAddrPort("10.77.2.11:7001"),
	}
	var b nat.Batch
	b.ReplyFrom(f, netip.MustParseAddrPort("10.77.2.12:7001"))
	if err := t.Apply(&b); err != nil {
		log.Fatal(err)
	}
}

// A daemon starting up drops whatever it does not know of.
func ExampleTable_Reconcile() {
	t, err := nat.Open(nat.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer t.Close()
	known := map[nat.Flow]bool{} // the flows the daemon still owns
	if err := t.Reconcile(func(e nat.Entry) bool { return known[e.Flow] }); err != nil {
		log.Fatal(err)
	}
}

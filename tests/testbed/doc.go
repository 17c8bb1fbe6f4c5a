// Package testbed builds the multi-host network-namespace testbed that
// mtcp's end-to-end tests and `mtcpctl testbed` use.
//
// A bed is six network namespaces named PREFIX-HOST:
//
//	client ──(client net 10.77.1.0/24, fd77:1::/64)── gateway
//	                                                     │ lan0
//	                 sw: bridge "lan" (server LAN 10.77.2.0/24, fd77:2::/64)
//	                      │ eth0            │ eth0            │ eth0
//	                      s1                s2                s3
//	                      │ ctl0            │ ctl0            │ ctl0
//	                 sw: bridge "ctl" (control net 10.77.3.0/24, fd77:3::/64)
//
// The client reaches the servers through the gateway, a router; the servers
// also share a private control network that the gateway is not on. sw is a
// plain L2 switch (two Linux bridges, no addresses). Every interface is
// created directly inside its namespace (`ip -n A link add X type veth peer
// name Y netns B`), so nothing ever appears in the root namespace and
// nothing routes to the machine's real network. Addresses are listed in
// [Host] and the package-level prefixes ([ClientNet4], [LANNet4], ...).
//
// The package only shells out to ip(8), nft(8), sysctl(8) and ethtool(8) (through
// `ip netns exec`); it does not import mtcp's kernel-facing packages, so the
// CLI can use it and so can tests of those packages.
//
// # Naming and cleanup
//
// Test beds are named mtt<pid>x<4 hex digits>, after the process that made
// them; [Sweep] (called by [ForTest]) deletes beds whose process is gone, so
// a test killed with SIGKILL leaves nothing behind for long. Beds made with
// `mtcpctl testbed up --name NAME` are named mtcp-NAME and stay until
// `mtcpctl testbed down`. [Bed.Down] kills every process still inside the
// bed's namespaces and deletes them; [Leftovers] reports anything that
// remains.
//
// # Two harnesses
//
// [ForTest] gives a test a bed of the harness the environment variable
// MTCP_HARNESS selects ([Harness]): "netns" (the default) builds the
// namespaces above; "vagrant" returns the VMs of the repository's
// Vagrantfile ([Vagrant]), with the same hosts, networks and addresses
// (vmplan.go), when the test binary runs inside the client VM
// (tests/vagrant/run-tests.sh). The Host methods a test uses — Run, Nft,
// Command, CommandEnv, WriteFile, ForwardUnix, and [Signal] and [PID] for
// started commands — work on both: on a VM other than the client they run
// over ssh on a management network, and the processes they start are
// marked so that a reset kills them. Code that enters a host's namespace
// in the test process (nat/netns.Do on [Host.NetNSPath]) works for the
// client only under vagrant; such tests call [RequireNetns]. vm_test.go
// runs the VM-side operations (network script, reset, commands, signals)
// against a namespace standing in for a VM, so CI exercises all of the
// vagrant harness but its ssh transport.
//
// # Privileges
//
// Root (CAP_SYS_ADMIN and CAP_NET_ADMIN), and iproute2, nftables and
// procps (sysctl) installed. [ForTest] skips the test with a reason
// otherwise.
//
// # Tests
//
// The package's own tests (root, skipped otherwise) bring beds up, check
// IPv4 and IPv6 TCP reachability client→servers and server↔server over the
// control network with a helper process re-executed from the test binary,
// check routes with `ip route get`, check that Up is idempotent and repairs
// damage, that two beds coexist, that Down and Sweep leave nothing, and that
// the root namespace's links and routes are untouched.
package testbed

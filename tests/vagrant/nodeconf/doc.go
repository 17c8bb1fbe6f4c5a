// Command nodeconf prints one VM's part of the vagrant harness's plan, for
// tests/vagrant/provision.sh. The plan itself is tests/testbed's, the one
// the network-namespace testbed is built from, so the VMs and the
// namespaces cannot drift apart.
//
//	nodeconf -node NAME net      the VM's network script (/etc/mtcp/net.sh)
//	nodeconf -node NAME mtcpd    a server's mtcpd.yaml (-pki DIR: its certificates)
//	nodeconf -node NAME mgmt     the VM's management address
//	nodeconf -node NAME ctl      a server's control-network addresses, comma-separated
//	nodeconf -node NAME nics     the VM's NICs: "NET MAC NAME" lines
//	nodeconf servers             the servers' names, one a line
//
// It needs no privileges and changes nothing.
//
// Its test checks that the Vagrantfile's PLAN is this plan.
package main

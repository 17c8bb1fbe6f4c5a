#!/usr/bin/env bash
# Runs mtcp's end-to-end tests on the Vagrantfile's VMs. Run it inside the
# client VM, as root, after `vagrant up`:
#
#   vagrant ssh client -c 'sudo /vagrant/tests/vagrant/run-tests.sh'
#
# The same test functions as on the namespace testbed, selected with
# MTCP_HARNESS=vagrant: the test binary runs here, the client's sockets are
# this VM's, and the servers and the gateway are reached over ssh on the
# management network (tests/testbed/vm.go). Without arguments it runs the
# end-to-end tests that drive the pool only through its hosts' commands,
# daemons and admin sockets; tests that enter a server's network namespace
# from the test process need the netns harness (testbed.RequireNetns), and
# TestAbortTargetFaults is left out: through the ssh-forwarded admin socket
# a dead daemon reads as "connection reset", not admin.ErrNoDaemon, which
# its "target dies" case waits for. Any
# arguments replace the default selection and are passed to go test, e.g.
#
#   sudo /vagrant/tests/vagrant/run-tests.sh -run TestSessionMoves -v ./tests/
#
# One package at a time (-p 1): there is one set of VMs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PATH:/usr/local/go/bin"
export MTCP_HARNESS=vagrant
if [ "$(id -u)" -ne 0 ]; then
	echo "run-tests: run as root (sudo)" >&2
	exit 1
fi
if [ $# -eq 0 ]; then
	set -- -run 'TestSessionMoves|TestEndedFlowRulesGo|TestStreamLoopGateway|TestStreamLoopForward' ./tests/
fi
exec go test -count=1 -p 1 -timeout 60m "$@"

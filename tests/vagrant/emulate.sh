#!/usr/bin/env bash
# Runs the vagrant harness's code paths without VMs, to check the harness
# itself (its ssh transport included) on a machine that cannot run VMs.
# Five network namespaces stand in for the VMs: NICs with the Vagrantfile's
# MACs on bridged networks (client, lan, ctl, mgmt), each with its own
# /etc/mtcp (a private mount namespace) holding the network script that
# provisioning would install, and an sshd on the management address. The
# test binary runs in the client's namespace with MTCP_HARNESS=vagrant.
# They share this machine's kernel and files, so this is no substitute for
# the VMs; it checks the harness, not the separation.
#
#   sudo SSHD=/path/to/sshd tests/vagrant/emulate.sh [go test arguments]
#
# SSHD: an OpenSSH sshd binary (default /usr/sbin/sshd); SSHD_LIBS: an
# LD_LIBRARY_PATH for it (for an sshd extracted from the Debian package
# with `apt-get download openssh-server && dpkg -x`, not installed).
# Without arguments it runs tests/vagrant/run-tests.sh's default selection.
# Everything is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
export PATH="$PATH:/usr/local/go/bin"
sshd=${SSHD:-/usr/sbin/sshd}
P=mtcpemu
hosts=(client gateway s1 s2 s3)
[ "$(id -u)" -eq 0 ] || { echo "emulate: run as root" >&2; exit 1; }
[ -x "$sshd" ] || { echo "emulate: no sshd at $sshd (set SSHD)" >&2; exit 1; }

work=$(mktemp -d /tmp/mtcp-emu.XXXXXX)
made_etc=
cleanup() {
	local rc=$?
	for h in "${hosts[@]}"; do
		if [ -s "$work/$h/sshd.pid" ]; then kill "$(cat "$work/$h/sshd.pid")" 2>/dev/null || true; fi
	done
	for h in "${hosts[@]}" sw; do
		if [ -e "/run/netns/$P-$h" ]; then
			for pid in $(ip netns pids "$P-$h"); do kill -9 "$pid" 2>/dev/null || true; done
			ip netns del "$P-$h" || true
		fi
	done
	if [ -n "$made_etc" ]; then rmdir /etc/mtcp 2>/dev/null || true; fi
	rm -rf "$work"
	exit $rc
}
trap cleanup EXIT
if [ ! -d /etc/mtcp ]; then
	mkdir /etc/mtcp # the mount point of each stand-in's own /etc/mtcp
	made_etc=1
fi
mkdir -p /run/sshd # sshd's privilege separation directory

ssh-keygen -q -t ed25519 -N "" -f "$work/key"
ssh-keygen -q -t ed25519 -N "" -f "$work/hostkey"
cp "$work/key.pub" "$work/authorized_keys"
# sshd's privilege separation user, in the stand-ins' view of /etc only.
cp /etc/passwd "$work/passwd"
grep -q '^sshd:' "$work/passwd" || echo 'sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin' >>"$work/passwd"

ip netns add "$P-sw"
ip netns exec "$P-sw" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
for br in client lan ctl mgmt; do
	ip -n "$P-sw" link add "br-$br" type bridge
	ip -n "$P-sw" link set "br-$br" type bridge stp_state 0 mcast_snooping 0
	ip -n "$P-sw" link set "br-$br" up
done
i=0
for h in "${hosts[@]}"; do
	ip netns add "$P-$h"
	ip -n "$P-$h" link set lo up
	mkdir -p "$work/$h/etc"
	go run ./tests/vagrant/nodeconf -node "$h" net >"$work/$h/etc/net.sh"
	while read -r net mac _name; do
		i=$((i + 1))
		ip -n "$P-$h" link add "nic$i" address "$mac" type veth peer name "p$i" netns "$P-sw"
		ip -n "$P-sw" link set "p$i" master "br-$net" up
		ip netns exec "$P-sw" ethtool -K "p$i" tx off tso off gro off >/dev/null
	done < <(go run ./tests/vagrant/nodeconf -node "$h" nics)
	mgmt=$(go run ./tests/vagrant/nodeconf -node "$h" mgmt)
	cat >"$work/$h/sshd_config" <<EOF
ListenAddress $mgmt
HostKey $work/hostkey
PermitRootLogin prohibit-password
AuthorizedKeysFile $work/authorized_keys
StrictModes no
UsePAM no
PidFile $work/$h/sshd.pid
AllowStreamLocalForwarding yes
EOF
	# Its own /etc/mtcp, its network script applied as provisioning does.
	ip netns exec "$P-$h" unshare -m --propagation private sh -c \
		"mount --bind $work/$h/etc /etc/mtcp && sh /etc/mtcp/net.sh"
	if [ "$h" != client ]; then
		ip netns exec "$P-$h" unshare -m --propagation private sh -c \
			"mount --bind $work/$h/etc /etc/mtcp && mount --bind $work/passwd /etc/passwd && LD_LIBRARY_PATH=${SSHD_LIBS:-} exec $sshd -f $work/$h/sshd_config"
	fi
done
echo "emulate: five stand-in VMs up; running the tests with MTCP_HARNESS=vagrant in the client's namespace"
if [ $# -eq 0 ]; then
	set -- -run 'TestSessionMoves|TestEndedFlowRulesGo|TestStreamLoopGateway|TestStreamLoopForward' ./tests/
fi
ip netns exec "$P-client" unshare -m --propagation private sh -c \
	'mount --bind "$0/client/etc" /etc/mtcp && exec env MTCP_HARNESS=vagrant MTCP_VAGRANT_KEY="$0/key" go test -count=1 -p 1 -timeout 60m "$@"' \
	"$work" "$@"

#!/usr/bin/env bash
# Provisions one VM of mtcp's vagrant harness. tests/setup.sh --node NAME
# runs it after installing everything and building ./bin; run it through
# setup.sh, as the Vagrantfile does.
#
#   tests/setup.sh --node NAME [--ssh-key DIR] [--no-net] [--no-push]
#
# Every VM: the binaries into /usr/local/bin; /etc/mtcp/net.sh (the
# testbed's plan for this VM, from tests/vagrant/nodeconf) applied now and
# at boot by mtcp-net.service; with --ssh-key DIR (holding id_ed25519 and
# id_ed25519.pub, made by the Vagrantfile) the key that lets the client VM,
# where the tests run, reach every VM as root over the management network.
# Servers s1-s3: /etc/mtcp/mtcpd.yaml and mtcpd.service, started once the
# pool's certificates are in /etc/mtcp/pki. The client: the pool CA in
# /etc/mtcp/pool-ca (it never leaves the client), a certificate for each
# server, pushed to the servers over ssh (each server's mtcpd starts then),
# and a wait until every server's mtcpd sees its two peers healthy.
#
# --no-net skips applying the network script (a chroot: it shares the
# host's network); --no-push skips the client's push to the servers.
# Without systemd (a chroot) the units are installed but not started.
# MTCP_PROVISION_WAIT (seconds, default 900) bounds the client's wait for
# the servers' provisioning (providers may bring VMs up in parallel).
set -euo pipefail
cd "$(dirname "$0")/../.."

node=${1:-}
shift || true
ssh_key_dir=
apply_net=1
push=1
while [ $# -gt 0 ]; do
	case $1 in
	--ssh-key)
		ssh_key_dir=${2:?--ssh-key needs a directory}
		shift 2
		;;
	--no-net)
		apply_net=0
		shift
		;;
	--no-push)
		push=0
		shift
		;;
	*)
		echo "provision: unknown argument $1" >&2
		exit 2
		;;
	esac
done
case $node in
client | gateway | s1 | s2 | s3) ;;
*)
	echo "provision: --node must be client, gateway, s1, s2 or s3 (got '$node')" >&2
	exit 2
	;;
esac

log() { echo "provision($node): $*"; }
export PATH="$PATH:/usr/local/go/bin"
systemd=0
if [ -d /run/systemd/system ]; then
	systemd=1
fi

nodeconf() { go run ./tests/vagrant/nodeconf -node "$node" "$@"; }
servers=$(go run ./tests/vagrant/nodeconf servers)

# Atomic install of generated content: install_text MODE PATH < content.
install_text() {
	local tmp
	tmp=$(mktemp "$2.XXXXXX")
	cat >"$tmp"
	chmod "$1" "$tmp"
	mv -f "$tmp" "$2"
}

install -d -m 0755 /etc/mtcp
install -m 0755 bin/mtcpd bin/mtcpctl bin/mtcp-kv bin/mtcp-bulk /usr/local/bin/
log "installed mtcpd, mtcpctl, mtcp-kv, mtcp-bulk into /usr/local/bin"

# The network: the same plan as the namespace testbed.
nodeconf net | install_text 0755 /etc/mtcp/net.sh
install_text 0644 /etc/systemd/system/mtcp-net.service <<'EOF'
[Unit]
Description=mtcp vagrant harness: the testbed's addresses, routes and sysctls
After=network.target
Before=mtcpd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /etc/mtcp/net.sh

[Install]
WantedBy=multi-user.target
EOF
if [ "$systemd" = 1 ]; then
	systemctl daemon-reload
	systemctl enable -q mtcp-net.service
fi
if [ "$apply_net" = 1 ]; then
	sh /etc/mtcp/net.sh
	log "network configured: $(ip -br addr | grep -E '^(cli0|lan0|ctl0|mgmt0) ' | tr -s ' ' | tr '\n' ';')"
else
	log "--no-net: /etc/mtcp/net.sh installed, not applied"
fi

# ssh between the VMs: the harness runs commands on the others as root.
if [ -n "$ssh_key_dir" ]; then
	install -d -m 0700 /root/.ssh
	touch /root/.ssh/authorized_keys
	chmod 0600 /root/.ssh/authorized_keys
	if ! grep -qxF "$(cat "$ssh_key_dir/id_ed25519.pub")" /root/.ssh/authorized_keys; then
		cat "$ssh_key_dir/id_ed25519.pub" >>/root/.ssh/authorized_keys
	fi
	if [ "$node" = client ]; then
		install -m 0600 "$ssh_key_dir/id_ed25519" /root/.ssh/mtcp_testbed
	fi
	log "ssh key installed"
fi

# mtcpd on the servers. The tests stop it while they run (they start
# their own daemons) and start it again afterwards.
if [[ $node == s[0-9] ]]; then
	install -d -m 0700 /etc/mtcp/pki
	nodeconf -pki /etc/mtcp/pki mtcpd | install_text 0644 /etc/mtcp/mtcpd.yaml
	install_text 0644 /etc/systemd/system/mtcpd.service <<EOF
[Unit]
Description=mtcp daemon ($node of the vagrant harness)
After=network-online.target mtcp-net.service
Wants=network-online.target mtcp-net.service
ConditionPathExists=/etc/mtcp/pki/$node.pem

[Service]
ExecStartPre=/usr/local/bin/mtcpd -check -config /etc/mtcp/mtcpd.yaml
ExecStart=/usr/local/bin/mtcpd -config /etc/mtcp/mtcpd.yaml
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
	if [ "$systemd" = 1 ]; then
		systemctl daemon-reload
		systemctl enable -q mtcpd.service
	fi
	if [ -f "/etc/mtcp/pki/$node.pem" ]; then
		if [ "$systemd" = 1 ]; then
			systemctl restart mtcpd.service
			log "mtcpd (re)started"
		else
			log "no systemd: start mtcpd with: mtcpd -config /etc/mtcp/mtcpd.yaml"
		fi
	else
		log "mtcpd waits for its certificate: the client's provisioning issues it and starts mtcpd"
	fi
fi

# The pool's certificates, made on the client (the operator's machine).
if [ "$node" = client ]; then
	ca=/etc/mtcp/pool-ca
	install -d -m 0700 "$ca"
	if [ ! -f "$ca/ca.pem" ]; then
		mtcpctl certs init --dir "$ca" --name mtcp-vagrant-pool >/dev/null
		log "pool CA made in $ca"
	fi
	for s in $servers; do
		if [ ! -f "$ca/$s.pem" ]; then
			mtcpctl certs issue --dir "$ca" --name "$s" --ip "$(go run ./tests/vagrant/nodeconf -node "$s" ctl)" >/dev/null
		fi
	done
	log "certificates for $(echo $servers) in $ca"
	if [ "$push" = 1 ]; then
		sshc=(ssh -i /root/.ssh/mtcp_testbed -o IdentitiesOnly=yes -o BatchMode=yes
			-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5)
		deadline=$((SECONDS + ${MTCP_PROVISION_WAIT:-900}))
		for s in $servers; do
			addr=$(go run ./tests/vagrant/nodeconf -node "$s" mgmt)
			until "${sshc[@]}" "root@$addr" test -f /etc/mtcp/mtcpd.yaml 2>/dev/null; do
				if [ $SECONDS -ge $deadline ]; then
					echo "provision(client): $s ($addr) is not provisioned yet after ${MTCP_PROVISION_WAIT:-900}s; run 'vagrant provision client' once it is" >&2
					exit 1
				fi
				sleep 5
			done
			tar -C "$ca" -cf - ca.pem "$s.pem" "$s-key.pem" |
				"${sshc[@]}" "root@$addr" "install -d -m 0700 /etc/mtcp/pki && tar -x --no-same-owner -C /etc/mtcp/pki && chmod 0600 /etc/mtcp/pki/* && systemctl restart mtcpd.service"
			log "certificates pushed to $s ($addr), its mtcpd started"
		done
		# The pool is up when every server sees its peers healthy over
		# the authenticated control channel.
		npeers=$(($(echo "$servers" | wc -w) - 1))
		for s in $servers; do
			addr=$(go run ./tests/vagrant/nodeconf -node "$s" mgmt)
			until [ "$("${sshc[@]}" "root@$addr" mtcpctl status -o json 2>/dev/null | grep -o '"healthy": *true' | wc -l)" -ge "$npeers" ]; do
				if [ $SECONDS -ge $deadline ]; then
					echo "provision(client): $s's mtcpd does not see its $npeers peers healthy:" >&2
					"${sshc[@]}" "root@$addr" mtcpctl status >&2 || true
					exit 1
				fi
				sleep 2
			done
		done
		log "pool up: every server's mtcpd sees its $npeers peers healthy"
	fi
fi
log "done"

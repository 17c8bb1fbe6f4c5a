#!/usr/bin/env bash
# Checks that the Vagrantfile's provisioning (tests/setup.sh --node NAME)
# works on a fresh Debian 12 system, without VMs: it builds a Debian 12
# (bookworm) chroot with debootstrap, copies the source tree in as /vagrant
# (as the Vagrantfile's rsync does), and runs, inside the chroot:
#
#   tests/setup.sh --node s1 --no-net           (Go, nftables, CRIU, build,
#                                                network script, mtcpd config
#                                                and unit)
#   tests/setup.sh --node client --no-net --no-push   (the pool's certificates)
#
# then gives s1 its certificate (what the client's push does), checks the
# config with `mtcpd -check`, starts s1's mtcpd from the chroot inside a
# throwaway network namespace holding s1's addresses, and asks it for its
# status with mtcpctl. --no-net: a chroot shares this machine's network,
# which the VM network script must not touch; there is no systemd in a
# chroot, so the units are installed but not started.
#
# Go comes from this machine's /usr/local/go, packed as a tarball and
# handed to setup.sh with MTCP_GO_TARBALL (setup.sh's install path, not a
# bind mount). Packages come from the Debian mirror, Go modules from the
# module proxy. Run as root; takes a few minutes (debootstrap, packages,
# CRIU's build). Unmounts and deletes the chroot at the end, also on
# failure (MTCP_KEEP_CHROOT=1 keeps it for inspection, still unmounted).
#
#   sudo tests/vagrant/check-provision.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

root=${MTCP_CHROOT:-/var/tmp/mtcp-provision-check}
mirror=${MTCP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
gotar=${MTCP_GO_TARBALL_CACHE:-/var/tmp/mtcp-check-go.tar.gz}
ns=mtcpchk$$

log() { echo "check-provision: $*"; }
fail() {
	echo "check-provision: FAIL: $*" >&2
	exit 1
}

if [ "$(id -u)" -ne 0 ]; then
	fail "run as root (debootstrap, chroot, mounts)"
fi
if ! command -v debootstrap >/dev/null; then
	log "installing debootstrap"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
if [ ! -x /usr/local/go/bin/go ]; then
	fail "this machine's /usr/local/go is what the chroot gets as its Go tarball; install Go there first"
fi

mounted=()
daemon=
cleanup() {
	local rc=$?
	if [ -n "$daemon" ]; then
		kill "$daemon" 2>/dev/null || true
		wait "$daemon" 2>/dev/null || true
	fi
	ip netns del "$ns" 2>/dev/null || true
	local i
	for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
		umount -R "${mounted[i]}" 2>/dev/null || umount -Rl "${mounted[i]}" || true
	done
	if grep -q " $root" /proc/mounts; then
		echo "check-provision: mounts under $root remain:" >&2
		grep " $root" /proc/mounts >&2
		rc=1
	elif [ "${MTCP_KEEP_CHROOT:-0}" = 1 ]; then
		log "kept the chroot in $root"
	else
		rm -rf "$root"
	fi
	exit $rc
}
trap cleanup EXIT

start=$SECONDS
if grep -q " $root" /proc/mounts; then
	fail "$root has mounts (an earlier run?): unmount them first"
fi
rm -rf "$root"
log "debootstrap bookworm into $root ($mirror)"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"/tmp/check-provision-debootstrap.log" 2>&1 ||
	{ tail -20 /tmp/check-provision-debootstrap.log >&2; fail "debootstrap failed"; }
log "debootstrap done ($((SECONDS - start)) s)"

mount -t proc proc "$root/proc" && mounted+=("$root/proc")
mount -t sysfs sysfs "$root/sys" && mounted+=("$root/sys")
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev" && mounted+=("$root/dev")
mount -t tmpfs tmpfs "$root/run" && mounted+=("$root/run")
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
if [ "${MTCP_APT_CHECK_VALID_UNTIL:-1}" = 0 ]; then
	# For machines whose clock is past the mirror's Valid-Until (a frozen
	# mirror snapshot): the chroot's apt only, never this machine's.
	echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99mtcp-check-valid-until"
	log "the chroot's apt ignores Release files' Valid-Until (MTCP_APT_CHECK_VALID_UNTIL=0)"
fi

if [ ! -s "$gotar" ] || [ /usr/local/go/VERSION -nt "$gotar" ]; then
	log "packing /usr/local/go into $gotar"
	tar -C /usr/local -czf "$gotar.part" go && mv "$gotar.part" "$gotar"
fi
cp "$gotar" "$root/tmp/go.tar.gz"
# This machine's trust store, for Go's module downloads: its egress may
# need a CA of its own (the chroot gets Debian's ca-certificates too).
cp -L "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$root/tmp/host-ca.crt"

log "copying the source tree to $root/vagrant"
mkdir -p "$root/vagrant"
tar -C "$repo" --exclude=./.git --exclude=./bin --exclude=./.vagrant -cf - . | tar -C "$root/vagrant" -xf -

inchroot() {
	chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/go/bin \
		GOPROXY="$(/usr/local/go/bin/go env GOPROXY)" GOSUMDB="$(/usr/local/go/bin/go env GOSUMDB)" \
		SSL_CERT_FILE=/tmp/host-ca.crt MTCP_GO_TARBALL=/tmp/go.tar.gz "$@"
}

t0=$SECONDS
log "chroot: tests/setup.sh --node s1 --no-net"
inchroot bash -c 'cd /vagrant && bash tests/setup.sh --node s1 --no-net' || fail "setup.sh --node s1"
log "setup.sh --node s1 took $((SECONDS - t0)) s"
t0=$SECONDS
log "chroot: tests/setup.sh --node client --no-net --no-push"
inchroot bash -c 'cd /vagrant && bash tests/setup.sh --node client --no-net --no-push' || fail "setup.sh --node client"
log "setup.sh --node client took $((SECONDS - t0)) s"

# What the provisioning must have left.
for f in /usr/local/go/bin/go /usr/sbin/nft /usr/local/bin/mtcpd /usr/local/bin/mtcpctl \
	/etc/mtcp/net.sh /etc/mtcp/mtcpd.yaml /etc/systemd/system/mtcpd.service \
	/etc/systemd/system/mtcp-net.service /etc/mtcp/pool-ca/ca.pem /etc/mtcp/pool-ca/s1.pem; do
	[ -e "$root$f" ] || fail "$f is missing after provisioning"
done
criu_version=$(inchroot bash -c 'criu --version' | sed -n 's/^Version: *//p')
log "in the chroot: $(inchroot go version); $(inchroot nft --version); criu $criu_version"
case $criu_version in
4.[2-9]* | [5-9].*) ;;
*) fail "criu $criu_version: want 4.2 or newer" ;;
esac

# The client's push, done by hand: s1's certificate into s1's pki.
inchroot sh -c 'cd /etc/mtcp/pool-ca && install -m 0600 ca.pem s1.pem s1-key.pem /etc/mtcp/pki/'
inchroot mtcpd -check -config /etc/mtcp/mtcpd.yaml || fail "mtcpd -check rejects the provisioned config"

# s1's mtcpd, from the chroot, in a namespace with s1's addresses.
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add lan0 type veth peer name lan0p
ip -n "$ns" link add ctl0 type veth peer name ctl0p
ip -n "$ns" link set lan0p up
ip -n "$ns" link set ctl0p up
ip -n "$ns" addr add 10.77.2.11/24 dev lan0
ip -n "$ns" addr add fd77:2::11/64 dev lan0 nodad
ip -n "$ns" addr add 10.77.3.11/24 dev ctl0
ip -n "$ns" addr add fd77:3::11/64 dev ctl0 nodad
ip -n "$ns" link set lan0 up
ip -n "$ns" link set ctl0 up
nsenter --net="/run/netns/$ns" chroot "$root" /usr/local/bin/mtcpd -config /etc/mtcp/mtcpd.yaml >/tmp/check-provision-mtcpd.log 2>&1 &
daemon=$!
status=
for _ in $(seq 100); do
	if status=$(nsenter --net="/run/netns/$ns" chroot "$root" /usr/local/bin/mtcpctl status -o json 2>/dev/null); then
		break
	fi
	kill -0 "$daemon" 2>/dev/null || { cat /tmp/check-provision-mtcpd.log >&2; fail "mtcpd exited"; }
	sleep 0.1
done
echo "$status" | grep -q '"name": *"s1"' || { cat /tmp/check-provision-mtcpd.log >&2; fail "mtcpd did not answer its admin socket: $status"; }
log "s1's mtcpd runs with the provisioned config and certificates: $(echo "$status" | tr -d ' \n' | cut -c1-160)"
log "PASS in $((SECONDS - start)) s"

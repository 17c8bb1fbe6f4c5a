#!/usr/bin/env bash
# Installs what mtcp and its tests need on a Debian 12 machine and builds
# the binaries into ./bin. Idempotent; run as root. Used by CI (.ci/run), by
# people setting up a server, and by the Vagrantfile's provisioning.
#
#   tests/setup.sh                  install and build (what CI runs)
#   tests/setup.sh --node NAME ...  then provision VM NAME of the vagrant
#                                   harness (tests/vagrant/provision.sh)
#
# Go is installed into /usr/local/go when it is missing: the version go.mod
# names, from MTCP_GO_TARBALL (a local go*.linux-*.tar.gz) if set, else
# downloaded from MTCP_GO_URL (default: go.dev's tarball), checked against
# MTCP_GO_SHA256 if set.
set -euo pipefail
cd "$(dirname "$0")/.."

node_args=()
if [ $# -gt 0 ]; then
	if [ "$1" != "--node" ] || [ $# -lt 2 ]; then
		echo "usage: tests/setup.sh [--node NAME [--ssh-key DIR] [--no-net] [--no-push]]" >&2
		exit 2
	fi
	shift
	node_args=("$@")
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "setup: run as root (it installs packages)" >&2
	exit 1
fi

# nftables: flow holds and address rewriting; iproute2: namespaces and
# veths of the testbed; util-linux: nsenter; procps: sysctl; ethtool:
# checksum offload off on the testbed's veths, so that checksums are
# verified (the testbed refuses to come up without it).
# redis-server, redis-tools: the unmodified server and clients that the
# process-mode (CRIU) tests migrate. netcat-openbsd and curl: nc and
# curl, unmodified clients whose connection-mode sessions the tests
# migrate.
# ca-certificates: Go fetches modules over HTTPS (a minimal Debian lacks it).
pkgs=(nftables iproute2 util-linux procps ethtool redis-server redis-tools netcat-openbsd curl ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# Installing redis-server must not start a redis on the host: the
	# tests run their own inside the testbed's namespaces. policy-rc.d
	# (exit 101) tells the package scripts not to start services.
	made_policy=
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 0755 /usr/sbin/policy-rc.d
		made_policy=1
	fi
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	if [ -n "$made_policy" ]; then
		rm -f /usr/sbin/policy-rc.d
	fi
fi

# CRIU ≥ 4.2 for process mode (built from source when missing; see the
# script).
bash tests/setup-criu.sh

export PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
	go_version=$(sed -n 's/^go \([0-9][0-9.]*\)$/\1/p' go.mod)
	go_tarball=${MTCP_GO_TARBALL:-}
	if [ -z "$go_tarball" ]; then
		go_url=${MTCP_GO_URL:-https://go.dev/dl/go$go_version.linux-$(dpkg --print-architecture).tar.gz}
		go_tarball=/var/cache/mtcp-go/${go_url##*/}
		if [ ! -s "$go_tarball" ]; then
			if ! command -v curl >/dev/null; then
				export DEBIAN_FRONTEND=noninteractive
				apt-get update -qq
				apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
			fi
			mkdir -p /var/cache/mtcp-go
			echo "setup: Go is not installed; downloading $go_url"
			if ! curl -fsSL --retry 3 -o "$go_tarball.part" "$go_url"; then
				echo "setup: could not download Go from $go_url: set MTCP_GO_TARBALL to a local Go tarball, or MTCP_GO_URL, or install Go ≥ $go_version into /usr/local/go (https://go.dev/doc/install)" >&2
				exit 1
			fi
			mv "$go_tarball.part" "$go_tarball"
		fi
	fi
	if [ -n "${MTCP_GO_SHA256:-}" ] && ! echo "$MTCP_GO_SHA256  $go_tarball" | sha256sum -c --quiet -; then
		echo "setup: $go_tarball does not match MTCP_GO_SHA256" >&2
		exit 1
	fi
	echo "setup: installing Go from $go_tarball into /usr/local/go"
	rm -rf /usr/local/go
	tar -C /usr/local -xzf "$go_tarball"
	echo "setup: $(go version)"
fi

kernel=$(uname -r)
if [ "$(printf '%s\n5.6\n' "${kernel%%-*}" | sort -V | head -1)" != "5.6" ]; then
	echo "setup: Linux ≥ 5.6 is required (pidfd_getfd); this is $kernel" >&2
	exit 1
fi

mkdir -p bin
go build -o bin/ ./cmd/...
echo "setup: built $(ls bin | tr '\n' ' ')into ./bin"

if [ ${#node_args[@]} -gt 0 ]; then
	bash tests/vagrant/provision.sh "${node_args[@]}"
fi

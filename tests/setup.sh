#!/usr/bin/env bash
# Installs what mtcp and its tests need on a Debian 12 machine and builds
# the binaries into ./bin. Idempotent; run as root. Used by CI (.ci/run), by
# people setting up a server, and (later) by the Vagrant provisioning.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "setup: run as root (it installs packages)" >&2
	exit 1
fi

# nftables: flow holds and address rewriting; iproute2: namespaces and
# veths of the testbed; util-linux: nsenter; procps: sysctl; ethtool:
# checksum offload off on the testbed's veths, so that checksums are
# verified (the testbed refuses to come up without it).
pkgs=(nftables iproute2 util-linux procps ethtool)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
	echo "setup: Go is not installed; install Go ≥ 1.26 into /usr/local/go (https://go.dev/doc/install)" >&2
	exit 1
fi

kernel=$(uname -r)
if [ "$(printf '%s\n5.6\n' "${kernel%%-*}" | sort -V | head -1)" != "5.6" ]; then
	echo "setup: Linux ≥ 5.6 is required (pidfd_getfd); this is $kernel" >&2
	exit 1
fi

mkdir -p bin
go build -o bin/ ./cmd/...
echo "setup: built $(ls bin | tr '\n' ' ')into ./bin"

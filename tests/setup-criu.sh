#!/usr/bin/env bash
# Installs CRIU ≥ 4.2 into /usr/local/sbin on a Debian 12 machine, for
# mtcp's process mode. Idempotent: does nothing when `criu --version`
# already reports 4.2 or newer. Run as root; tests/setup.sh calls it.
#
# Why a build: Debian 12's criu 3.17 cannot run on Linux ≥ 6.13 (vDSO
# layout) and criu 4.1.x cannot dump TCP sockets on Linux ≥ 6.16
# (SO_PASSCRED on inet sockets). Debian unstable carries 4.2.x; its
# source tarball builds against Debian 12's libraries. Only a deb-src
# entry is used, in a private apt state directory, so the host's binary
# package sources are never touched (adding unstable binaries would
# upgrade libc and the compiler on the next apt-get install).
#
# The kernel-feature cache: every CRIU run probes the kernel (~50 ms on a
# small VM) unless it finds the cache it keeps in its run directory, which
# must be a tmpfs. This build keeps it in /run/criu; the script makes
# that directory (a tmpfs of its own where /run is not one, as in some
# containers) and a tmpfiles.d entry that makes it again at boot. A
# process migration runs CRIU three times on its critical path.
set -euo pipefail

need_major=4
need_minor=2
prefix=/usr/local/sbin
work=${MTCP_CRIU_BUILD:-/var/cache/mtcp-criu}
rundir=/run/criu

log() { echo "setup-criu: $*"; }

if [ "$(id -u)" -ne 0 ]; then
	echo "setup-criu: run as root (it installs packages and /usr/local/sbin/criu)" >&2
	exit 1
fi

# version_ok VERSION: true when VERSION (x.y[.z]) is at least 4.2.
version_ok() {
	local v=$1 major minor
	major=${v%%.*}
	minor=${v#*.}
	minor=${minor%%.*}
	[[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
	((major > need_major || (major == need_major && minor >= need_minor)))
}

installed_version() {
	local crbin
	crbin=$(PATH="$prefix:$PATH" command -v criu 2>/dev/null) || return 1
	"$crbin" --version 2>/dev/null | sed -n 's/^Version: *\([0-9.]*\).*/\1/p' | head -1
}

# setup_rundir makes CRIU's run directory, on a tmpfs.
setup_rundir() {
	mkdir -p /etc/tmpfiles.d
	echo "d $rundir 0700 root root -" >/etc/tmpfiles.d/mtcp-criu.conf
	mkdir -p "$rundir"
	chmod 0700 "$rundir"
	if [ "$(stat -f -c %T "$rundir")" != tmpfs ]; then
		mount -t tmpfs -o mode=0700,size=4m mtcp-criu "$rundir"
		log "mounted a tmpfs on $rundir for CRIU's kernel-feature cache (/run is not a tmpfs here)"
	fi
}

# ours_current: true unless the installed criu is this script's build
# from before it kept its cache in $rundir.
ours_current() {
	local crbin
	crbin=$(PATH="$prefix:$PATH" command -v criu)
	[ "$crbin" != "$prefix/criu" ] || grep -q "$rundir/criu.kdat" "$crbin"
}

setup_rundir
if v=$(installed_version) && [ -n "$v" ] && version_ok "$v" && ours_current; then
	log "criu $v is installed ($(PATH="$prefix:$PATH" command -v criu)); nothing to do"
	exit 0
fi
log "criu ≥ $need_major.$need_minor built for $rundir is not installed (found: ${v:-none}); building it from Debian's source tarball"

# Build dependencies, all from Debian 12 itself. --no-install-recommends
# keeps the CI cost down (no documentation toolchain: only the binary is
# built, not the man pages).
deps=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev
	protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev
	libnet1-dev libcap-dev libaio-dev libbsd-dev libnftables-dev
	libgnutls28-dev uuid-dev xz-utils dpkg-dev)
missing=()
for p in "${deps[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
	log "installing build dependencies: ${missing[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$work"
cd "$work"

tarball=$(ls -1 criu_*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$tarball" ] || ! version_ok "$(echo "$tarball" | sed 's/^criu_\([0-9.]*\)\.orig.*/\1/')"; then
	# A private apt configuration: one deb-src line for unstable, its own
	# lists directory. Nothing under /etc/apt changes.
	apt_dir=$work/apt
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/sources.list.d"
	echo "deb-src http://deb.debian.org/debian unstable main" >"$apt_dir/sources.list"
	aptopts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list"
		-o "Dir::Etc::sourceparts=$apt_dir/sources.list.d"
		-o "Dir::State::lists=$apt_dir/lists"
		-o "APT::Get::List-Cleanup=0")
	log "fetching the source index of Debian unstable (deb-src only)"
	apt-get "${aptopts[@]}" update -qq
	log "downloading criu's source tarball"
	# apt-get fetches the .orig.tar.xz and then may fail on the
	# .debian.tar.xz; only the orig tarball is needed, so its presence,
	# not the exit code, decides.
	apt-get "${aptopts[@]}" source --download-only -qq criu >/dev/null 2>"$work/source.log" ||
		log "apt-get source reported an error (expected when the .debian part is not served); checking for the orig tarball"
	tarball=$(ls -1 criu_*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
	if [ -z "$tarball" ]; then
		echo "setup-criu: could not download criu's source tarball from Debian unstable:" >&2
		cat "$work/source.log" >&2
		exit 1
	fi
fi
ver=$(echo "$tarball" | sed 's/^criu_\([0-9.]*\)\.orig.*/\1/')
if ! version_ok "$ver"; then
	echo "setup-criu: Debian unstable offers criu $ver, older than $need_major.$need_minor" >&2
	exit 1
fi

src=$work/criu-$ver
if [ ! -x "$src/criu/criu" ] || ! grep -q "$rundir/criu.kdat" "$src/criu/criu"; then
	rm -rf "$src"
	mkdir -p "$src"
	log "unpacking $tarball"
	tar -xf "$tarball" -C "$src" --strip-components=1
	# CRIU's images/ compile opts.proto, which imports
	# google/protobuf/descriptor.proto; Debian 12's protoc-c does not find
	# it on its include path, so put a copy where the build looks.
	mkdir -p "$src/images/google/protobuf"
	cp /usr/include/google/protobuf/descriptor.proto "$src/images/google/protobuf/"
	log "building criu $ver (make criu, $(nproc) jobs; log in $src/build.log)"
	if ! make -C "$src" -j"$(nproc)" RUNDIR="$rundir" criu >"$src/build.log" 2>&1; then
		tail -40 "$src/build.log" >&2
		echo "setup-criu: building criu $ver failed; full log in $src/build.log" >&2
		exit 1
	fi
fi

install -m 0755 "$src/criu/criu" "$prefix/criu"
log "installed $("$prefix/criu" --version | tr '\n' ' ')into $prefix/criu"
if ! "$prefix/criu" check >"$work/check.log" 2>&1; then
	# Not fatal: `criu check` also fails on features mtcp does not use.
	log "note: 'criu check' reported problems (see $work/check.log)"
fi
# Keep the tarball (a re-run does not download again), drop the build tree.
rm -rf "$src" "$work/apt"

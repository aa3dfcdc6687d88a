#!/usr/bin/env bash
# Installs everything dbh's test suite and demo need on a fresh Debian 12 machine (run as root):
# QEMU 10 from bookworm-backports (riscv64 edk2 needs QEMU >= 8.1; qemu-utils there is already 10),
# EFI firmware, the tools image creation shells out to, GnuPG, cross compilers, distcc, qemu-user
# with binfmt_misc handlers and bubblewrap (chroot builds), and real
# Portage from PyPI in a venv under ~/.cache/dbh-tests. Idempotent: a second run changes nothing.
set -euo pipefail

PORTAGE_VERSION=3.0.83
cache=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages=(
	qemu-system-arm qemu-system-x86 qemu-system-misc qemu-system-ppc qemu-utils
	qemu-efi-aarch64 ovmf
	mtools dosfstools e2fsprogs cpio zstd xz-utils bzip2 squashfs-tools skopeo
	gnupg wget curl socat pax-utils git
	nettle-dev libclang-dev clang pkg-config
	gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu
	distcc nginx wrk chromium bubblewrap
	python3-venv python3-pip python3-pefile openssh-client
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	# bookworm-backports from the same mirror the machine already uses (its name is read, not written here).
	src=/etc/apt/sources.list.d/debian.sources
	if [ -f "$src" ] && [ ! -f /etc/apt/sources.list.d/dbh-backports.sources ]; then
		uri=$(awk '/^URIs:/{print $2; exit}' "$src")
		printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" |
			as_root tee /etc/apt/sources.list.d/dbh-backports.sources >/dev/null
	fi
	as_root apt-get update -q
	export DEBIAN_FRONTEND=noninteractive
	# Not `apt-cache policy X | grep -q`: under pipefail grep's early exit gives apt-cache SIGPIPE.
	if [[ $(apt-cache policy qemu-system-arm) == *bpo* ]]; then
		as_root apt-get install -y -q -t bookworm-backports qemu-system-arm qemu-system-x86 qemu-system-misc qemu-system-ppc qemu-utils
	fi
	as_root apt-get install -y -q "${missing[@]}"
fi

# qemu-user for `dbh build --backend chroot`: the backports version, matching qemu-system 10.
if ! dpkg-query -W -f='${Status}' qemu-user-static 2>/dev/null | grep -q 'install ok installed'; then
	export DEBIAN_FRONTEND=noninteractive
	if [[ $(apt-cache policy qemu-user-static) == *bpo* ]]; then
		as_root apt-get install -y -q -t bookworm-backports qemu-user-static
	else
		as_root apt-get install -y -q qemu-user-static
	fi
fi
# binfmt_misc handlers with the F flag (Debian's files have it). Without systemd (containers, CI)
# nothing registers them, so do what systemd-binfmt would; where binfmt_misc cannot be mounted
# (an unprivileged container) the chroot tests check the error message instead.
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/status" ]; then
	as_root mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || echo "setup-host: cannot mount binfmt_misc here; chroot builds will be refused" >&2
fi
if [ -e "$binfmt/status" ]; then
	for arch in aarch64 riscv64; do
		conf=/usr/lib/binfmt.d/qemu-$arch.conf
		if [ -f "$conf" ] && [ ! -e "$binfmt/qemu-$arch" ]; then
			as_root sh -c "cat '$conf' > '$binfmt/register'" 2>/dev/null || echo "setup-host: cannot register qemu-$arch with binfmt_misc" >&2
		fi
	done
fi

venv=$cache/venv-portage-$PORTAGE_VERSION
if [ ! -x "$venv/bin/emerge" ]; then
	mkdir -p "$cache"
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q "portage==$PORTAGE_VERSION"
fi
# Test only: REDbot (PyPI `redbot`) lints dbh serve's HTTP caching and validators (tests/it/harden.rs).
REDBOT_VERSION=2.7.1
redbot=$cache/venv-redbot
if [ ! -x "$redbot/bin/redbot" ]; then
	mkdir -p "$cache"
	python3 -m venv "$redbot"
	"$redbot/bin/pip" install -q "redbot==$REDBOT_VERSION"
fi
echo "setup-host: system packages and Portage $PORTAGE_VERSION ($venv) are ready"

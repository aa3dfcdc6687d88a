#!/usr/bin/env bash
# Installs everything dbh's test suite and demo need on a fresh Debian 12 machine (run as root):
# QEMU 10 from bookworm-backports (riscv64 edk2 needs QEMU >= 8.1; qemu-utils there is already 10),
# EFI firmware, the tools image creation shells out to, GnuPG, cross compilers, distcc, and real
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
	distcc nginx wrk chromium
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
	if apt-cache policy qemu-system-arm | grep -q bpo; then
		as_root apt-get install -y -q -t bookworm-backports qemu-system-arm qemu-system-x86 qemu-system-misc qemu-system-ppc qemu-utils
	fi
	as_root apt-get install -y -q "${missing[@]}"
fi

venv=$cache/venv-portage-$PORTAGE_VERSION
if [ ! -x "$venv/bin/emerge" ]; then
	mkdir -p "$cache"
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q "portage==$PORTAGE_VERSION"
fi
echo "setup-host: system packages and Portage $PORTAGE_VERSION ($venv) are ready"

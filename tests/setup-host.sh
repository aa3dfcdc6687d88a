#!/usr/bin/env bash
# Installs what dbh needs on a fresh Debian 12 machine (run as root), then checks it:
#   bash tests/setup-host.sh           running and building dbh (README's first command)
#   bash tests/setup-host.sh --tests   that, plus what only the test suite needs (README's second)
# dbh needs: QEMU 10 from bookworm-backports (riscv64 edk2 needs QEMU >= 8.1; bookworm's own is 7.2,
# and qemu-utils from backports is already 10), EFI firmware, the tools image creation shells out
# to, GnuPG, a C toolchain and the libraries the build links (nettle, clang for bindgen), the arm64
# cross compiler, distcc, qemu-user with binfmt_misc handlers and bubblewrap (chroot builds), and
# real Portage from PyPI in a venv under ~/.cache/dbh-tests. The tests add nginx and wrk (serve
# benchmarks), headless Chromium (page rendering), skopeo (OCI oracle) and pefile (ukify oracle).
# Idempotent: a second run changes nothing. Exit status 1 with the reason when the result would
# not run every target (e.g. QEMU older than 8.1).
#
# Shell rule (tests/fresh-host.sh proves it): never `producer | grep -q` under pipefail. grep -q
# exits at the first match, the producer gets SIGPIPE (status 141) and the pipeline "fails" exactly
# when the pattern was found. Compare captured output with [[ ]] instead.
set -euo pipefail

PORTAGE_VERSION=3.0.83
QEMU_MIN=8.1
cache=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}
tests=false
for a in "$@"; do
	case $a in
	--tests) tests=true ;;
	*) echo "usage: setup-host.sh [--tests]" >&2; exit 2 ;;
	esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
die() { echo "setup-host: error: $*" >&2; exit 1; }
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == 'install ok installed' ]]; }

qemu_packages=(qemu-system-arm qemu-system-x86 qemu-system-misc qemu-system-ppc qemu-utils qemu-user-static)
packages=(
	"${qemu_packages[@]}"
	qemu-efi-aarch64 ovmf
	mtools dosfstools e2fsprogs cpio zstd xz-utils bzip2 squashfs-tools
	gnupg openssl wget curl ca-certificates socat pax-utils git rsync openssh-client file
	build-essential python3-dev nettle-dev libclang-dev clang pkg-config
	gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu
	distcc bubblewrap
	python3-venv python3-pip
)
if $tests; then
	packages+=(nginx wrk chromium skopeo python3-pefile mmdebstrap man-db)
fi

# The machine's own mirror (its name is read, never written here): deb822 sources first, then the
# one-line /etc/apt/sources.list the standard installer and debootstrap write.
mirror() {
	local u=
	u=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
		if (match($0, /URIs: *[^ \n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit } }' \
		/etc/apt/sources.list.d/*.sources 2>/dev/null || true)
	[ -n "$u" ] || u=$(awk '$1=="deb" && $0 !~ /security/ && / bookworm / { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
		/etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
	echo "$u"
}

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
missing=()
for p in "${packages[@]}"; do
	installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	if [ "$codename" = bookworm ]; then
		# Backports configured anywhere already (by hand, or by a previous run)?
		if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
			uri=$(mirror)
			[ -n "$uri" ] || die "no Debian bookworm mirror in /etc/apt/sources.list(.d); add one, or bookworm-backports by hand"
			printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" |
				as_root tee /etc/apt/sources.list.d/dbh-backports.sources >/dev/null
		fi
	fi
	as_root apt-get update -q
	# QEMU from backports where they have it: one release for qemu-system, qemu-utils and qemu-user.
	# (Not `apt-cache policy X | grep -q`: see the shell rule at the top.)
	if [[ $(apt-cache policy qemu-system-arm) == *bpo* ]]; then
		as_root apt-get install -y -q -t bookworm-backports "${qemu_packages[@]}"
	fi
	as_root apt-get install -y -q "${missing[@]}"
fi

# QEMU's version, not only its presence: riscv64 guests run edk2 from pflash, which QEMU < 8.1 cannot.
version=$(qemu-system-riscv64 --version 2>/dev/null | sed -n '1s/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
[ -n "$version" ] || die "qemu-system-riscv64 is not installed or does not say its version"
if [ "$(printf '%s\n%s\n' "$QEMU_MIN" "$version" | sort -V | head -n1)" != "$QEMU_MIN" ]; then
	die "QEMU $version is too old: riscv64 guests need QEMU >= $QEMU_MIN.
hint: on Debian 12 enable bookworm-backports (Suites: bookworm-backports in /etc/apt/sources.list.d/) and run
      apt-get install -t bookworm-backports ${qemu_packages[*]}"
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
"$venv/bin/python" -c "import portage" || die "Portage in $venv does not run (remove the directory and run again)"
if $tests; then
	# Test only: REDbot (PyPI `redbot`) lints dbh serve's HTTP caching and validators (tests/it/harden.rs).
	REDBOT_VERSION=2.7.1
	redbot=$cache/venv-redbot
	if [ ! -x "$redbot/bin/redbot" ]; then
		mkdir -p "$cache"
		python3 -m venv "$redbot"
		"$redbot/bin/pip" install -q "redbot==$REDBOT_VERSION"
	fi
fi
echo "setup-host: system packages$($tests && echo ' (with the test tools)'), QEMU $version and Portage $PORTAGE_VERSION ($venv) are ready"

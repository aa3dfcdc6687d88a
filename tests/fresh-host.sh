#!/usr/bin/env bash
# Proves README's set-up step on a machine that has nothing: makes a clean Debian 12 root with
# mmdebstrap (plain /etc/apt/sources.list, as the standard installer writes; the machine's own
# mirror, never a name written here), runs the set-up part of README's first command inside it as
# root (chroot with /proc, /dev, /sys; no stdin), and checks what dbh needs is really there:
# QEMU >= 8.1 for every target's qemu-system, the arm64/amd64 firmware the targets name, the
# Portage venv, and every program dbh runs. The test-only tools (nginx, wrk, chromium, skopeo)
# must NOT be there after it. Then the set-up part of README's second command adds them.
#
#   bash tests/fresh-host.sh          (root; run by .ci/run through README's test command)
#
# The downloaded .debs and pip's cache are kept under ${DBH_TEST_CACHE:-~/.cache/dbh-tests}/fresh-host
# (bound into the root), so a second run downloads nothing. The whole run is bounded by
# DBH_FRESH_HOST_TIMEOUT seconds (default 1800). Exit 0 on success, 1 with the failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
cache=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}/fresh-host
limit=${DBH_FRESH_HOST_TIMEOUT:-1800}
log() { echo "fresh-host: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

# The rule tests/setup-host.sh states, for every shell file of the project: no `X | grep -q`
# (under pipefail grep's early exit SIGPIPEs X and the test reads "no match" exactly on a match).
shells=$(git ls-files 2>/dev/null | grep -E '\.sh$|^\.ci/run$|^bench/serve$' || true)
[ -n "$shells" ] || shells=$(find . -path ./target -prune -o -name '*.sh' -print)
if bad=$(grep -nE '^[^#]*\|[[:space:]]*grep[[:space:]]+(-[a-zA-Z]*q|--quiet)' $shells); then
	fail "a pipe into quiet grep under pipefail (compare captured output with [[ ]] instead):
$bad"
fi
log "ok: no pipe into quiet grep in $(echo "$shells" | wc -w) shell files"
[ "$(id -u)" = 0 ] || fail "needs root (chroot, mounts)"
command -v mmdebstrap >/dev/null || fail "mmdebstrap is missing: bash tests/setup-host.sh --tests installs it"

# The set-up step of README's commands: what comes before the first `&&`.
readme_setup() { # readme_setup 'main job'|'test suite'
	local line
	line=$(sed -n "s/^    \\\$ \\(.*\\) # $1\$/\\1/p" README.md | head -n 1)
	[ -n "$line" ] || fail "README.md has no '    \$ ... # $1' line"
	echo "${line%% && *}"
}
setup_main=$(readme_setup 'main job')
setup_tests=$(readme_setup 'test suite')
[[ $setup_main == "bash tests/setup-host.sh"* ]] || fail "README's first command does not start with tests/setup-host.sh: $setup_main"

# The mirror this machine uses (deb822 first, then one-line sources), as tests/guest/mkstage.sh reads it.
mirror=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
	if (match($0, /URIs: *[^ \n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit } }' \
	/etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
	/etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || fail "no Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"

mkdir -p "$cache/archives/partial" "$cache/pip"
exec 9>"$cache/.lock"
flock 9
root=$(mktemp -d "${TMPDIR:-/var/tmp}/dbh-fresh-host.XXXXXX")
cleanup() {
	local m
	# Innermost first; lazy so that a process left behind cannot keep the host's mounts busy.
	for m in $(awk -v r="$root" '$2 ~ "^"r"/" {print $2}' /proc/self/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
	rm -rf --one-file-system "$root"
}
trap cleanup EXIT
t0=$(date +%s)
deadline=$((t0 + limit))
left() { local l=$((deadline - $(date +%s))); [ "$l" -gt 0 ] || fail "over the time limit of ${limit}s"; echo "$l"; }

log "mmdebstrap bookworm into $root from $mirror"
timeout "$(left)" mmdebstrap --quiet --variant=important --skip=essential/unlink \
	--setup-hook='mkdir -p "$1"/var/cache/apt/archives' \
	--setup-hook="sync-in '$cache/archives' /var/cache/apt/archives" \
	--customize-hook="sync-out /var/cache/apt/archives '$cache/archives'" \
	bookworm "$root" "deb $mirror bookworm main" >&2 || fail "mmdebstrap did not make a root"
[ -s "$root/etc/apt/sources.list" ] && [ -z "$(ls "$root/etc/apt/sources.list.d/")" ] ||
	fail "expected a root with only a one-line /etc/apt/sources.list"
log "root made in $(($(date +%s) - t0)) s"

cp /etc/resolv.conf "$root/etc/resolv.conf"
# A host-wide pip configuration (index, proxy CA) is machine configuration, like the mirror. Its
# `cert =` bundle is copied beside, as the root's ca-certificates rewrites its own bundle.
if [ -f /etc/pip.conf ]; then
	cert=$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*//p' /etc/pip.conf | head -n 1)
	if [ -n "$cert" ] && [ -f "$cert" ]; then
		cp "$cert" "$root/etc/dbh-host-pip-ca.crt"
		sed 's|^\([[:space:]]*cert[[:space:]]*=\).*|\1 /etc/dbh-host-pip-ca.crt|' /etc/pip.conf >"$root/etc/pip.conf"
	else
		cp /etc/pip.conf "$root/etc/pip.conf"
	fi
fi
mkdir -p "$root/src" "$root/root/.cache/pip"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --make-rslave "$root/dev"
mount --rbind /sys "$root/sys"
mount --make-rslave "$root/sys"
mount --bind "$cache/archives" "$root/var/cache/apt/archives"
mount --bind "$cache/pip" "$root/root/.cache/pip"
mount --bind "$top" "$root/src"
mount -o remount,bind,ro "$root/src"

# A root login's environment, nothing of this process's (CI=true is what CI sets).
in_root() { # in_root SECONDS COMMAND
	timeout "$1" chroot "$root" /usr/bin/env -i HOME=/root USER=root LANG=C.UTF-8 TERM=dumb CI=true \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		/bin/bash -c "cd /src && $2" </dev/null
}

log "running README's set-up step: $setup_main"
t1=$(date +%s)
in_root "$(left)" "$setup_main" >&2 || fail "README's set-up step failed in a fresh Debian 12 root: $setup_main"
log "set-up step took $(($(date +%s) - t1)) s"

# The checks: independent of setup-host.sh's own, against what dbh runs.
check=$(
	cat <<-'CHECK'
		set -u
		bad=0
		no() { echo "missing: $*"; bad=1; }
		for q in qemu-system-aarch64 qemu-system-x86_64 qemu-system-riscv64 qemu-system-ppc64 qemu-img qemu-aarch64-static; do
			v=$($q --version 2>/dev/null | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p')
			if [ -z "$v" ]; then no "$q"
			elif [ "$(printf '8.1\n%s\n' "$v" | sort -V | head -n1)" != 8.1 ]; then echo "too old: $q $v (riscv64 needs >= 8.1)"; bad=1
			else echo "ok: $q $v"; fi
		done
		for t in arm64 amd64; do
			found=
			for f in $(sed -n 's/^firmware_code = \[\(.*\)\]/\1/p' vm-images/$t.toml | tr -d '",'); do [ -f "$f" ] && found=$f && break; done
			if [ -n "$found" ]; then echo "ok: $t firmware $found"; else no "$t firmware (any of vm-images/$t.toml's firmware_code)"; fi
		done
		venv=/root/.cache/dbh-tests/venv-portage-3.0.83
		if "$venv/bin/python" -c 'import portage; print("ok: portage", portage.VERSION)' && [ -x "$venv/bin/emerge" ]; then :; else no "Portage venv $venv"; fi
		for p in qemu-img mmd mcopy mkfs.vfat mkfs.ext4 debugfs mksquashfs cpio zstd xz bzip2 gpg ssh ssh-keygen git \
			bwrap scanelf distcc distccd aarch64-linux-gnu-gcc curl wget socat cc c++ make pkg-config clang python3; do
			command -v "$p" >/dev/null || no "$p"
		done
		[ $bad = 0 ] && echo "ok: every program dbh runs"
		exit $bad
	CHECK
)
in_root 120 "$check" >&2 || fail "the fresh root lacks what dbh needs (above)"
# The split: README's first command installs nothing only the tests use.
for p in nginx wrk chromium skopeo; do
	in_root 30 "! command -v $p >/dev/null" || fail "README's first command installed the test-only $p"
done
log "ok: no test-only tool after the first command"

# Idempotent: a second run installs nothing (apt-get is not even needed).
t2=$(date +%s)
out=$(in_root "$(left)" "$setup_main" 2>&1) || fail "a second run of the set-up step failed: $out"
[[ $out != *"apt-get"* && $out != *"Setting up"* ]] || fail "a second run of the set-up step installed something: $out"
log "ok: second run changes nothing ($(($(date +%s) - t2)) s)"

log "running README's test set-up step: $setup_tests"
in_root "$(left)" "$setup_tests" >&2 || fail "README's test set-up step failed: $setup_tests"
for p in nginx wrk chromium skopeo mmdebstrap; do
	in_root 30 "command -v $p >/dev/null" || fail "README's test set-up step did not install $p"
done
log "ok: the test tools are there after '$setup_tests'"
log "PASS in $(($(date +%s) - t0)) s"

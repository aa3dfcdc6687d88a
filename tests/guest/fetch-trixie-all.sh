#!/bin/bash
# Fetches an `Architecture: all` package from Debian trixie without installing it and unpacks it
# under ${DBH_TEST_CACHE:-~/.cache/dbh-tests}/trixie-all/PKG/; prints that directory on its last
# line. Used for qemu-efi-riscv64 (edk2 for riscv64 guests: not in bookworm) and systemd-ukify. Exit 77 with the
# reason on stderr when it cannot be fetched here.
set -euo pipefail
PKG=${1:?usage: fetch-trixie-all.sh PACKAGE}
CACHE=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}
OUT=$CACHE/trixie-all/$PKG
if [ -f "$OUT/.done" ]; then echo "$OUT"; exit 0; fi
MIRROR=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
	if (match($0, /URIs: *[^ \n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit } }' \
	/etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
	/etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "no Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list" >&2; exit 77; }
A=$CACHE/apt-all-trixie
mkdir -p "$A"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d,debs} "$CACHE/trixie-all"
exec 9>"$CACHE/trixie-all/.lock"
flock 9
: > "$A/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" > "$A/etc/sources.list"
APT=(-o "APT::Architecture=amd64" -o "APT::Architectures=amd64" -o "Dir::State::Lists=$A/lists"
	-o "Dir::State::status=$A/status" -o "Dir::Cache=$A/cache" -o "Dir::Etc::sourcelist=$A/etc/sources.list"
	-o "Dir::Etc::sourceparts=$A/etc/sources.list.d" -o "Dir::Etc::preferencesparts=$A/etc/preferences.d"
	-o "Debug::NoLocking=true" -o "APT::Sandbox::User=root")
apt-get "${APT[@]}" -qq update >&2 || { echo "apt-get update for trixie failed" >&2; exit 77; }
(cd "$A/debs" && apt-get "${APT[@]}" -qq download "$PKG" >&2) || { echo "cannot download $PKG" >&2; exit 77; }
rm -rf "$OUT"; mkdir -p "$OUT"
dpkg-deb -x "$(ls "$A"/debs/"$PKG"_*.deb | head -1)" "$OUT"
touch "$OUT/.done"
echo "$OUT"

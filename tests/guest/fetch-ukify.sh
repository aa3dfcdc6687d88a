#!/bin/bash
# Fetches systemd's ukify (Debian trixie's `systemd-ukify`, Architecture: all) without installing
# it, as an oracle for dbh's UKI writer. Prints the path of the ukify script on its last line.
# Exit 77 (with the reason on stderr) when it cannot be fetched here.
set -euo pipefail
CACHE=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}
OUT=$CACHE/ukify
if [ -x "$OUT/usr/bin/ukify" ] || [ -f "$OUT/usr/bin/ukify" ]; then echo "$OUT/usr/bin/ukify"; exit 0; fi
MIRROR=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
	if (match($0, /URIs: *[^ \n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit } }' \
	/etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "no Debian mirror configured" >&2; exit 77; }
A=$CACHE/apt-all-trixie
mkdir -p "$A"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d,debs}
: > "$A/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" > "$A/etc/sources.list"
APT=(-o "APT::Architecture=amd64" -o "APT::Architectures=amd64" -o "Dir::State::Lists=$A/lists"
	-o "Dir::State::status=$A/status" -o "Dir::Cache=$A/cache" -o "Dir::Etc::sourcelist=$A/etc/sources.list"
	-o "Dir::Etc::sourceparts=$A/etc/sources.list.d" -o "Dir::Etc::preferencesparts=$A/etc/preferences.d"
	-o "Debug::NoLocking=true" -o "APT::Sandbox::User=root")
apt-get "${APT[@]}" -qq update >&2 || { echo "apt-get update for trixie failed" >&2; exit 77; }
(cd "$A/debs" && apt-get "${APT[@]}" -qq download systemd-ukify >&2) || { echo "cannot download systemd-ukify" >&2; exit 77; }
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
dpkg-deb -x "$(ls "$A"/debs/systemd-ukify_*.deb | head -1)" "$OUT.tmp"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "$OUT/usr/bin/ukify"

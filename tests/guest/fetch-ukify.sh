#!/bin/bash
# Fetches systemd's ukify (Debian trixie's `systemd-ukify`, Architecture: all) without installing
# it, as an oracle for dbh's UKI writer. Prints the path of the ukify script on its last line.
# Exit 77 (with the reason on stderr) when it cannot be fetched here.
set -euo pipefail
dir=$(bash "$(dirname "$0")/fetch-trixie-all.sh" systemd-ukify | tail -n 1)
echo "$dir/usr/bin/ukify"

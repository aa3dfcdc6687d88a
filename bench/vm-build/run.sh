#!/usr/bin/env bash
# bench/vm-build: dbh's fixed cost of a guest build for arm64, in one run:
#   (a) the bare boot of the guest image to SSH: raw QEMU started by hand, to the SSH banner
#       (bench/boot/run.sh with RUNS=1, which also times `dbh vm start` for comparison);
#   (b) a full `dbh vm build --target arm64 --repo tests/fixtures/repo --profile dbh-test:dbh/arm64
#       dbh-test/hello` into an empty binhost (boot, sync, emerge, pull, sign, publish, stop).
# dbh's fixed overhead = (b) - the time emerge itself ran in the guest (dbh times the emerge
# command and logs `timings:` at -v); reported in seconds and as a ratio to (a). Goal: <= 1.5.
# Runs (a) and (b) RUNS times (default 3), alternating, and reports the means: the machine may be
# shared, and a lone sample says little.
#
# usage: bench/vm-build/run.sh [DBH_HOME]   (a home with images/arm64 made by `dbh vm image create`;
#        default: a fresh one made from the cached test stage, tests/guest/mkstage.sh arm64)
# needs: a built dbh (cargo build --release, or DBH=path), qemu-system-aarch64, python3, bc
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
DBH=${DBH:-$here/target/release/dbh}
[ -x "$DBH" ] || DBH=$here/target/debug/dbh
work=$(mktemp -d)
stage_pid=
cleanup() {
	[ -n "$stage_pid" ] && kill "$stage_pid" 2>/dev/null
	"$DBH" --home "$home" -q vm stop --target arm64 >/dev/null 2>&1 || true
	rm -rf "$work"
}
home=$work/home
trap cleanup EXIT
now() { date +%s.%N; }

if [ $# -ge 1 ]; then
	home=$(realpath "$1")
else
	stage_dir=$(bash "$here/tests/guest/mkstage.sh" arm64 | tail -n 1)
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	(cd "$stage_dir" && exec python3 -m http.server --bind 127.0.0.1 "$port" >/dev/null 2>&1) &
	stage_pid=$!
	for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break; sleep 0.1; done
	"$DBH" --home "$home" -q vm image create --target arm64 --stage "http://127.0.0.1:$port/stage3-arm64-dbhtest.tar.xz" >/dev/null
	kill "$stage_pid"; stage_pid=
fi
"$DBH" --home "$home" -q key export >/dev/null 2>&1 || "$DBH" --home "$home" -q key generate >/dev/null

RUNS=${RUNS:-3}
sum_raw=0 sum_total=0 sum_emerge=0
for i in $(seq 1 "$RUNS"); do
	# (a) bare boot to SSH.
	boot_out=$(RUNS=1 bash "$here/bench/boot/run.sh" "$home")
	echo "$boot_out" | sed -n "s/^run 1: /run $i: boot: /p"
	raw=$(echo "$boot_out" | sed -n 's/^raw QEMU: \([0-9.]*\) s.*/\1/p')

	# (b) the full build into an empty binhost.
	rm -rf "$home/binhost/arm64"
	t0=$(now)
	"$DBH" --home "$home" -v vm build --target arm64 --repo "$here/tests/fixtures/repo" --profile dbh-test:dbh/arm64 dbh-test/hello \
		>"$work/build.out" 2>"$work/build.err" || { cat "$work/build.out" "$work/build.err" >&2; exit 1; }
	t1=$(now)
	total=$(echo "$t1 - $t0" | bc)
	timings=$(grep -o 'arm64: timings:.*' "$work/build.err")
	emerge=$(echo "$timings" | sed -n 's/.* emerge \([0-9.]*\)s.*/\1/p')
	printf 'run %d: build: %.2f s (%s)\n' "$i" "$total" "${timings#arm64: timings: }"
	printf 'run %d: overhead %.2f s = %.2fx the bare boot of this run\n' "$i" "$(echo "$total - $emerge" | bc)" "$(echo "scale=3; ($total - $emerge) / $raw" | bc)"
	sum_raw=$(echo "$sum_raw + $raw" | bc); sum_total=$(echo "$sum_total + $total" | bc); sum_emerge=$(echo "$sum_emerge + $emerge" | bc)
done
raw=$(echo "scale=3; $sum_raw / $RUNS" | bc)
total=$(echo "scale=3; $sum_total / $RUNS" | bc)
emerge=$(echo "scale=3; $sum_emerge / $RUNS" | bc)
overhead=$(echo "$total - $emerge" | bc)
ratio=$(echo "scale=3; $overhead / $raw" | bc)
printf 'mean of %d: bare boot to SSH %.2f s   dbh vm build %.2f s, of which emerge %.2f s\n' "$RUNS" "$raw" "$total" "$emerge"
printf 'fixed overhead (build - emerge): %.2f s = %.2fx the bare boot (goal <= 1.50x)\n' "$overhead" "$ratio"

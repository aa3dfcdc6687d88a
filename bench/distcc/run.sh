#!/usr/bin/env bash
# bench/distcc: what distcc offload buys a TCG guest build. In ONE run, the compile-heavy package
# dbh-test/manyc (UNITS generated C units, default 40) is built
#   (a) in the arm64 guest under pure TCG:           dbh vm build
#   (b) the same with the host's distccd:             dbh vm build --distcc
#   (c) cross on the host:                           dbh cross build (host Portage, host cross gcc)
#   and, for reference, (c0) the same generated sources compiled by bare `make` with the host's
#       aarch64 cross gcc, the same CFLAGS and make -j as (b): the compile alone, no Portage
# plus the guest's fixed overhead: `dbh vm build dbh-test/hello` (boot, sync, emerge start-up,
# pull, sign, publish, stop around a one-file compile). Every build gets a fresh $DBH_HOME (so
# nothing comes from the binhost) sharing one image. Prints wall times, the compile phase of (a)
# and (b) (from emerge's ">>> Compiling source" to ">>> Source compiled", timestamped as dbh -v
# passes the lines on), and the ratios. Targets: (b) >= 4x faster than (a); (b) <= 1.5 x (c) + overhead.
#
# usage: bench/distcc/run.sh [DBH_HOME]   (a home with images/arm64 from `dbh vm image create` of the
#        test stage, which has distcc; default: made once from tests/guest/mkstage.sh and cached)
# env:   UNITS (default 40), DBH (default target/release/dbh), DBH_PORTAGE_EMERGE (the host's emerge
#        for (c); default: the test venv's, made by tests/setup-host.sh)
# needs: qemu-system-aarch64, distcc, gcc-aarch64-linux-gnu, python3, make
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
DBH=${DBH:-$here/target/release/dbh}
[ -x "$DBH" ] || DBH=$here/target/debug/dbh
UNITS=${UNITS:-40}
CACHE=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}
work=$(mktemp -d)
http=
cleanup() { [ -n "$http" ] && kill "$http" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

if [ $# -ge 1 ]; then
	base=$(realpath "$1")
else
	stage_dir=$(bash "$here/tests/guest/mkstage.sh" arm64 | tail -1)
	base=$CACHE/bench-distcc/$(basename "$stage_dir")
	if [ ! -e "$base/.done" ]; then
		port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
		python3 -m http.server "$port" --bind 127.0.0.1 --directory "$stage_dir" >/dev/null 2>&1 &
		http=$!
		sleep 1
		rm -rf "$base"; mkdir -p "$base"
		"$DBH" --home "$base/home" -q vm image create --target arm64 --stage "http://127.0.0.1:$port/stage3-arm64-dbhtest.tar.xz" >&2
		kill "$http"; http=
		touch "$base/.done"
	fi
	base=$base/home
fi

now() { date +%s.%N; }
# fresh_home NAME: a $DBH_HOME sharing the image, with its own key and MANYC_UNITS.
fresh_home() {
	local h=$work/$1
	mkdir -p "$h/images" "$h/targets/arm64/portage"
	cp -as "$(realpath "$base/images/arm64")" "$h/images/arm64"
	rm -rf "$h/images/arm64/run"
	"$DBH" --home "$h" -q key generate >/dev/null
	printf 'ACCEPT_LICENSE="*"\nMANYC_UNITS="%s"\n' "$UNITS" > "$h/targets/arm64/portage/make.conf"
	echo "$h"
}
# build NAME ATOM [--distcc]: wall seconds on stdout; the timestamped -v output in $work/NAME.log.
build() {
	local name=$1 atom=$2; shift 2
	local h; h=$(fresh_home "$name")
	local t0 t1; t0=$(now)
	"$DBH" --home "$h" -v vm build --target arm64 --repo "$here/tests/fixtures/repo" --profile dbh-test:dbh/arm64 "$@" "$atom" 2>&1 >/dev/null |
		python3 -u -c 'import sys, time
for l in sys.stdin: sys.stdout.write("%.3f %s" % (time.time(), l))' > "$work/$name.log" || {
		echo "$name: dbh vm build failed:" >&2; tail -30 "$work/$name.log" >&2; exit 1; }
	t1=$(now)
	grep -q "^CPV: $atom-" "$h/binhost/arm64/Packages" || { echo "$name: $atom was not published" >&2; exit 1; }
	echo "$t1 - $t0" | bc
}
# compile_phase NAME: seconds between emerge's compile start and end lines.
compile_phase() {
	awk '/>>> Compiling source/ {s=$1} />>> Source compiled/ {e=$1} END { if (s && e) printf "%.1f\n", e - s; else print "?" }' "$work/$1.log"
}

jobs=$(nproc)
echo "dbh-test/manyc with $UNITS units; host: $(nproc) CPUs, guest: TCG, $(( jobs < 4 ? jobs : 4 )) vCPUs" >&2
echo "overhead: dbh vm build dbh-test/hello ..." >&2
over=$(build overhead dbh-test/hello)
echo "(a) TCG: dbh vm build dbh-test/manyc ..." >&2
a=$(build tcg dbh-test/manyc)
echo "(b) distcc: dbh vm build --distcc dbh-test/manyc ..." >&2
b=$(build distcc dbh-test/manyc --distcc)
distcc_jobs=$(grep -o 'distccd ran [0-9]* compile job' "$work/distcc.log" | grep -o '[0-9]*' || echo 0)
makej=$(grep -o '^[0-9.]* make -j[0-9]*' "$work/distcc.log" | head -1 | grep -o '\-j[0-9]*' || echo "-j$((2 * jobs))")

export DBH_PORTAGE_EMERGE=${DBH_PORTAGE_EMERGE:-$(ls -d "$CACHE"/venv-portage-*/bin/emerge | tail -1)}
echo "(c) cross on the host: dbh cross build dbh-test/manyc (emerge: $DBH_PORTAGE_EMERGE) ..." >&2
h=$(fresh_home cross)
t0=$(now)
"$DBH" --home "$h" -q cross build --target arm64 --jobs "${makej#-j}" --repo "$here/tests/fixtures/repo" --profile dbh-test:dbh/arm64 dbh-test/manyc >/dev/null
c=$(echo "$(now) - $t0" | bc)
grep -q "^CPV: dbh-test/manyc-" "$h/binhost/arm64/Packages" || { echo "(c): dbh-test/manyc was not published" >&2; exit 1; }

echo "(c0) bare make $makej CC=aarch64-linux-gnu-gcc ..." >&2
src=$work/make
mkdir -p "$src"
cp "$here/tests/fixtures/repo/dbh-test/manyc/files/Makefile" "$src/"
(cd "$src" && awk -v n="$UNITS" -f "$here/tests/fixtures/repo/dbh-test/manyc/files/gen.awk")
t0=$(now)
make -s -C "$src" "$makej" CC=aarch64-linux-gnu-gcc CFLAGS="-O2 -pipe" >/dev/null
c0=$(echo "$(now) - $t0" | bc)
[[ $(file "$src/manyc") == *'ARM aarch64'* ]] || { echo "(c0) did not produce an AArch64 binary" >&2; exit 1; }

ca=$(compile_phase tcg)
cb=$(compile_phase distcc)
python3 - "$over" "$a" "$b" "$c" "$ca" "$cb" "$distcc_jobs" "$UNITS" "$makej" "$c0" <<'PY'
import sys
over, a, b, c = map(float, sys.argv[1:5])
ca, cb, jobs, units, makej = sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
c0 = float(sys.argv[10])
print(f"units: {units}; distccd ran {jobs} compile jobs; make {makej} in (b) and (c)")
print(f"{'':34} {'wall s':>8} {'compile phase s':>16}")
print(f"{'guest fixed overhead (hello)':34} {over:8.1f}")
print(f"{'(a) guest, pure TCG':34} {a:8.1f} {ca:>16}")
print(f"{'(b) guest + host distccd':34} {b:8.1f} {cb:>16}")
print(f"{'(c) dbh cross build on the host':34} {c:8.1f}")
print(f"{'(c0) bare make, host cross gcc':34} {c0:8.1f}")
print(f"(a)/(b) wall: {a / b:.2f}x (target >= 4)")
try:
    print(f"(a)/(b) compile phase: {float(ca) / float(cb):.2f}x")
except ValueError:
    pass
bound = 1.5 * c + over
print(f"(b) = {b:.1f} s vs 1.5 x (c) + overhead = {bound:.1f} s: {'met' if b <= bound else 'NOT met'}")
print(f"(b) - overhead = {b - over:.1f} s vs (c) = {c:.1f} s: {(b - over) / c:.2f}x")
try:
    rest = b - float(cb)
    print(f"(b) outside its compile phase = {rest:.1f} s; 1.5 x (c) + that = {1.5 * c + rest:.1f} s")
except ValueError:
    pass
PY

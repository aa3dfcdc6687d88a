#!/usr/bin/env bash
# bench/boot: what dbh's VM runner costs on top of QEMU, for arm64.
#   1. raw QEMU, started by hand the lab's way (docs/lab.md, "Boot times and the settings that matter"), from spawn to the SSH banner on the
#      forwarded port;
#   2. `dbh vm start --target arm64` from spawn to its return (SSH banner + key exchange + auth done),
#      on the same image, then `dbh vm stop`.
# Prints both in seconds and the ratio (goal: <= 1.1). Runs each RUNS times (default 3), alternating.
#
# usage: bench/boot/run.sh [DBH_HOME]   (a home with images/arm64 from `dbh vm image create`;
#        default: the test fixture guest built by tests/it/vm_fixture/guest.sh, cached)
# needs: a built dbh (cargo build --release, or DBH=path), qemu-system-aarch64, python3
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
DBH=${DBH:-$here/target/release/dbh}
[ -x "$DBH" ] || DBH=$here/target/debug/dbh
RUNS=${RUNS:-3}
work=$(mktemp -d)
qpid=
cleanup() { [ -n "$qpid" ] && kill -9 "$qpid" 2>/dev/null || true; "$DBH" --home "$home" -q vm stop --target arm64 >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

if [ $# -ge 1 ]; then
	home=$(realpath "$1")
else
	cache=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}/bench-boot-arm64
	if [ ! -e "$cache/image/.done" ]; then
		mkdir -p "$cache"
		sh "$here/tests/it/vm_fixture/guest.sh" arm64 "$cache/image" "$cache/work" </dev/null >&2
		touch "$cache/image/.done"
	fi
	home=$work/home
	mkdir -p "$home/images"
	cp -as "$cache/image" "$home/images/arm64"
fi
img=$home/images/arm64

now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_banner() { # port deadline_s
	python3 - "$1" "$2" <<'PY'
import socket, sys, time
port, end = int(sys.argv[1]), time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=1); c.settimeout(2)
        if c.recv(4) == b"SSH-": sys.exit(0)
    except OSError: pass
    time.sleep(0.1)
sys.exit(1)
PY
}

raw_once() {
	local port; port=$(free_port)
	cp /usr/share/AAVMF/AAVMF_VARS.fd "$work/vars.fd"
	rm -f "$work/overlay.qcow2"
	qemu-img create -q -f qcow2 -b "$(realpath "$img/disk.qcow2")" -F qcow2 "$work/overlay.qcow2"
	local t0; t0=$(now)
	qemu-system-aarch64 -M virt -accel tcg,thread=multi -cpu max,pauth-impdef=on -smp "$(( $(nproc) < 4 ? $(nproc) : 4 ))" -m 2048 \
		-drive if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd \
		-drive if=pflash,format=raw,file="$work/vars.fd" \
		-drive if=none,id=root,format=qcow2,file="$work/overlay.qcow2" -device virtio-blk-pci,drive=root \
		-drive if=none,id=esp,format=raw,readonly=on,file="$img/esp.img" -device virtio-blk-pci,drive=esp,bootindex=0 \
		-netdev user,id=n,hostfwd=tcp:127.0.0.1:$port-:22 -device virtio-net-pci,netdev=n \
		-display none -serial file:"$work/console.log" -no-reboot -audio none -boot menu=on,splash-time=0 \
		</dev/null >"$work/qemu.log" 2>&1 &
	qpid=$!
	wait_banner "$port" 300 || { echo "raw QEMU: no SSH banner in 300 s" >&2; exit 1; }
	echo "$(now) - $t0" | bc
	kill -9 "$qpid"; wait "$qpid" 2>/dev/null || true; qpid=
}

dbh_once() {
	local t0 t1; t0=$(now)
	"$DBH" --home "$home" -q vm start --target arm64 >/dev/null
	t1=$(now)
	DBH_VM_POWERDOWN_TIMEOUT=0 "$DBH" --home "$home" -q vm stop --target arm64 >/dev/null 2>&1
	echo "$t1 - $t0" | bc
}

raw_total=0 dbh_total=0
for i in $(seq 1 "$RUNS"); do
	r=$(raw_once); d=$(dbh_once)
	printf 'run %d: raw QEMU to SSH banner %.2f s, dbh vm start to SSH ready %.2f s\n' "$i" "$r" "$d"
	raw_total=$(echo "$raw_total + $r" | bc); dbh_total=$(echo "$dbh_total + $d" | bc)
done
raw=$(echo "scale=3; $raw_total / $RUNS" | bc); dbhm=$(echo "scale=3; $dbh_total / $RUNS" | bc)
ratio=$(echo "scale=3; $dbhm / $raw" | bc)
printf 'raw QEMU: %.2f s   dbh vm start: %.2f s   ratio: %.2fx (goal <= 1.10x)\n' "$raw" "$dbhm" "$ratio"

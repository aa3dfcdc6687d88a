#!/usr/bin/env bash
# dbh's main job on built-in defaults, end to end on this machine, for an arm64 target:
#   1. a stage tarball: here the Debian-based test stage (tests/guest/mkstage.sh, cached); in
#      production a Gentoo stage3 URL plus a dist-kernel (README.md, "Guest images from a real
#      Gentoo stage3"),
#   2. `dbh vm image create` from it over HTTP (download, DIGESTS check, disk, UKI, ESP, SSH keys),
#   3. `dbh vm build`: boot the arm64 guest under QEMU, emerge --buildpkg the test repository's
#      dbh-test/greeter (and the C program it needs, compiled by the guest's gcc), pull the new
#      binpkgs, sign them on the host and publish them into the arm64 binhost,
#   4. `dbh serve` every target's binhost at http://127.0.0.1:8080/<target>/,
#   5. prove it with a real Portage client (verify-signature on) installing the arm64 packages,
#   6. keep serving until Ctrl-C (set DBH_DEMO_EXIT=1 to stop after step 5).
# Needs `bash tests/setup-host.sh` and `cargo build --release` first (README's first command does both).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
dbh=${DBH:-$top/target/release/dbh}
target=${DBH_DEMO_TARGET:-arm64}
listen=${DBH_DEMO_LISTEN:-127.0.0.1:8080}
venv=${DBH_TEST_PORTAGE_VENV:-$HOME/.cache/dbh-tests/venv-portage-3.0.83}
work=$(mktemp -d "${TMPDIR:-/tmp}/dbh-demo.XXXXXX")
stage_pid=
# Portage verifies signatures as `nobody`: the client's keyring must be reachable by it.
chmod 755 "$work"
serve_pid=
cleanup() {
	[ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null
	[ -n "$stage_pid" ] && kill "$stage_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*" >&2; }

# A Portage config root of its own (Prefix layout), as in docs/lab.md ("A self-contained Portage prefix").
prefix() { # prefix DIR PROFILE
	local p=$1 f
	mkdir -p "$p"/etc/portage/{repos.conf,binrepos.conf} "$p"/share/portage/config "$p"/var/{tmp,cache/binpkgs,db/pkg} "$p/home"
	for f in make.globals sets binrepos.conf; do ln -sfn "$venv/share/portage/config/$f" "$p/share/portage/config/$f"; done
	ln -sfn "$top/tests/fixtures/repo/profiles/dbh/$2" "$p/etc/portage/make.profile"
	printf '[DEFAULT]\nmain-repo = dbh-test\n[dbh-test]\nlocation = %s\n' "$top/tests/fixtures/repo" >"$p/etc/portage/repos.conf/dbh.conf"
	cat >"$p/etc/portage/make.conf" <<-'MAKECONF'
		PKGDIR="${EPREFIX}/var/cache/binpkgs"
		PORTAGE_TMPDIR="${EPREFIX}/var/tmp"
		BINPKG_GPG_VERIFY_GPG_HOME="${EPREFIX}/etc/portage/gnupg"
		ACCEPT_LICENSE="*"
		PORTAGE_USERNAME="root"
		PORTAGE_GRPNAME="root"
		PORTAGE_INST_UID="0"
		PORTAGE_INST_GID="0"
		PORTAGE_TRUST_HELPER=""
		FEATURES="-sandbox -usersandbox -userpriv -ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox"
		BINPKG_FORMAT="gpkg"
	MAKECONF
}
pt() { # pt PREFIX PROGRAM ARGS...
	local p=$1
	shift
	mkdir -p "$work/shim"
	ln -sfn "$(command -v tar)" "$work/shim/gtar"
	env -i HOME="$p/home" TERM=dumb LC_ALL=C.UTF-8 NOCOLOR=true PATH="$work/shim:$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		PORTAGE_OVERRIDE_EPREFIX="$p" PORTAGE_CONFIGROOT="$p" "$venv/bin/$1" "${@:2}"
}

home=$("$dbh" config show --json | python3 -c 'import json, sys; print(next(s["value"] for s in json.load(sys.stdin)["settings"] if s["key"] == "home"))')
if [ ! -f "$home/images/$target/disk.qcow2" ]; then
	say "making the $target test stage from Debian packages (cached) and serving it over HTTP"
	stage_dir=$(bash tests/guest/mkstage.sh "$target" | tail -n 1)
	stage_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	(cd "$stage_dir" && exec python3 -m http.server --bind 127.0.0.1 "$stage_port" >/dev/null 2>&1) &
	stage_pid=$!
	for _ in $(seq 50); do curl -fsS -o /dev/null "http://127.0.0.1:$stage_port/" 2>/dev/null && break; sleep 0.1; done
	say "dbh vm image create --target $target (download, DIGESTS, disk, UKI, ESP, pinned SSH keys)"
	# dbh verifies the DIGESTS signature by default (Gentoo's release keys for a real stage3); the
	# test stage is signed by mkstage.sh's test release key, release-key.gpg beside it.
	trust=(--insecure-no-signature)
	[ -f "$stage_dir/release-key.gpg" ] && trust=(--keyring "$stage_dir/release-key.gpg")
	"$dbh" vm image create --target "$target" --stage "http://127.0.0.1:$stage_port/stage3-$target-dbhtest.tar.xz" "${trust[@]}"
	kill "$stage_pid"; stage_pid=
fi
"$dbh" key export >/dev/null 2>&1 || "$dbh" key generate

say "dbh vm build --target $target dbh-test/greeter (QEMU guest, emerge --buildpkg, pull, sign, publish)"
"$dbh" vm build --target "$target" --repo "$top/tests/fixtures/repo" --profile "dbh-test:dbh/$target" dbh-test/greeter

say "serving every target's binhost on http://$listen/"
"$dbh" serve --listen "$listen" &
serve_pid=$!
for _ in $(seq 50); do curl -fsS -o /dev/null "http://$listen/$target/Packages" 2>/dev/null && break; sleep 0.1; done

say "a client configures itself from the served binrepos.conf and key, then installs with verify-signature on"
prefix "$work/client" "$target"
curl -fsS "http://$listen/$target/binrepos.conf" | tee "$work/client/etc/portage/binrepos.conf/dbh.conf"
mkdir -p -m 0755 "$work/client/etc/portage/gnupg"
curl -fsS "http://$listen/$target/key.asc" | gpg --homedir "$work/client/etc/portage/gnupg" --batch --import
fpr=$(gpg --homedir "$work/client/etc/portage/gnupg" --batch --with-colons --list-keys | awk -F: '/^fpr/{print $10; exit}')
echo "$fpr:6:" | gpg --homedir "$work/client/etc/portage/gnupg" --batch --import-ownertrust
gpg --homedir "$work/client/etc/portage/gnupg" --batch --check-trustdb
chmod -R go+rX "$work/client/etc/portage/gnupg"
pt "$work/client" emerge --getbinpkgonly dbh-test/greeter
# The client runs on this host, so it cannot run arm64 programs: show what it installed instead.
machine=$(od -An -tu2 -j18 -N2 "$work/client/usr/bin/hello" | tr -d ' ')
echo "installed $work/client/usr/bin/hello: ELF e_machine $machine (183 = AArch64)"

say "the binhost is at http://$listen/$target/ — on a Gentoo client: curl http://$listen/$target/binrepos.conf > /etc/portage/binrepos.conf/dbh.conf"
if [ "${DBH_DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo "serving until Ctrl-C" >&2
wait "$serve_pid"

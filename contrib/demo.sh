#!/usr/bin/env bash
# dbh's main job on built-in defaults, end to end on this machine:
#   1. build binary packages of the test repository (tests/fixtures/repo) with real Portage,
#   2. sign them and publish them into the target's binhost (`dbh binhost add`),
#   3. serve every target's binhost (`dbh serve`, http://127.0.0.1:8080/<target>/),
#   4. prove it with a real Portage client (verify-signature on) installing from it,
#   5. keep serving until Ctrl-C (set DBH_DEMO_EXIT=1 to stop after step 4).
# Needs `bash tests/setup-host.sh` and `cargo build --release` first (README's first command does both).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
dbh=${DBH:-$top/target/release/dbh}
target=${DBH_DEMO_TARGET:-amd64}
listen=${DBH_DEMO_LISTEN:-127.0.0.1:8080}
venv=${DBH_TEST_PORTAGE_VENV:-$HOME/.cache/dbh-tests/venv-portage-3.0.83}
work=$(mktemp -d "${TMPDIR:-/tmp}/dbh-demo.XXXXXX")
# Portage verifies signatures as `nobody`: the client's keyring must be reachable by it.
chmod 755 "$work"
serve_pid=
cleanup() { [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*" >&2; }

# A Portage config root of its own (Prefix layout), as in shared/lab/portage.md.
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

say "building dbh-test/greeter and its dependency dbh-test/hello with real Portage (emerge --buildpkg)"
prefix "$work/bld" "$target"
pt "$work/bld" emerge --buildpkg --quiet-build=y dbh-test/greeter

say "signing and publishing them into the $target binhost"
"$dbh" key export >/dev/null 2>&1 || "$dbh" key generate
"$dbh" binhost add --target "$target" "$work"/bld/var/cache/binpkgs/dbh-test/*/*.gpkg.tar

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
"$work/client/usr/bin/greeter"

say "the binhost is at http://$listen/$target/ — on a Gentoo client: curl http://$listen/$target/binrepos.conf > /etc/portage/binrepos.conf/dbh.conf"
if [ "${DBH_DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo "serving until Ctrl-C" >&2
wait "$serve_pid"

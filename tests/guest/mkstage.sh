#!/bin/bash
# Builds a Gentoo-stage3-like root filesystem tarball from Debian packages of a target architecture,
# for dbh's guest tests: `dbh vm image create --stage` consumes it like a real stage3.
#
# usage: tests/guest/mkstage.sh TARGET        (TARGET: arm64 | amd64 | riscv64)
# prints the output directory on its last stdout line; it holds
#   stage3-TARGET-dbhtest.tar.xz, .tar.xz.CONTENTS.gz and .tar.xz.DIGESTS (Gentoo format, BLAKE2B + SHA512,
#   clear-signed like Gentoo's release DIGESTS), release-key.gpg (the public key that signed it, as a
#   keyring for `image create --keyring`), and stub/linux<efi arch>.efi.stub: Debian's systemd-stub for
#   the target, kept OUT of the stage (for tests of the UKI path).
# Cached in ${DBH_TEST_CACHE:-~/.cache/dbh-tests}/stages/TARGET-<hash of this script and getuto>/ (the
# package list lives in this script, so editing it rebuilds).
#
# The stage is shaped like a real Gentoo stage3 where it matters to dbh: no ebuild repository (make.profile
# points into an absent ::gentoo), no systemd-stub (stage profiles have systemd[boot] off), Gentoo's
# /etc/portage/binrepos.conf/gentoobinhost.conf (pointing at an address that never answers), gnupg,
# openssl and the real getuto (tests/fixtures/getuto) with a "release" key in
# /usr/share/openpgp-keys/gentoo-release.asc (the test key that clear-signs the DIGESTS).
#
# No dpkg database, no maintainer scripts, no binfmt_misc: .debs are fetched with a private apt
# configuration for the foreign architecture (the host's /etc/apt is only read for the mirror URL),
# the dependency closure comes from apt's own solver (`apt-get -s install` against an empty status
# file), each .deb is unpacked with `dpkg-deb --fsys-tarfile | tar -x`, and the few things the
# postinsts would have done that matter for a guest are done here by hand.
# Exit status 77 means "cannot build this target here" (e.g. the mirror lacks the architecture);
# the reason is printed on stderr.
set -euo pipefail

TARGET=${1:?usage: mkstage.sh TARGET}
SELF=$(realpath "$0")
GETUTO=$(dirname "$SELF")/../fixtures/getuto/getuto
CACHE=${DBH_TEST_CACHE:-$HOME/.cache/dbh-tests}
HASH=$(cat "$SELF" "$GETUTO" | sha256sum | cut -c1-16)
OUT=$CACHE/stages/$TARGET-$HASH
NAME=stage3-$TARGET-dbhtest.tar.xz
log() { echo "mkstage[$TARGET]: $*" >&2; }
skip() { log "SKIP: $*"; exit 77; }

# One builder per target at a time (parallel test processes share the cache).
mkdir -p "$CACHE/stages"
exec 9>"$CACHE/stages/.lock-$TARGET"
flock 9
if [ -s "$OUT/$NAME.DIGESTS" ] && [ -s "$OUT/$NAME" ]; then
	log "cached: $OUT"
	echo "$OUT"
	exit 0
fi

# CHOST: Gentoo's triplet for the target; DTRIPLET: Debian's (its tools' prefix in /usr/bin).
# STUB: systemd-stub's name; PARCH/PPROFILE: Gentoo's ARCH and profile (binhost path, make.profile).
case $TARGET in
arm64) DARCH=arm64 SUITE=bookworm KMETA=linux-image-cloud-arm64 CHOST=aarch64-unknown-linux-gnu DTRIPLET=aarch64-linux-gnu
	STUB=linuxaa64.efi.stub PARCH=arm64 PPROFILE=default/linux/arm64/23.0 ;;
amd64) DARCH=amd64 SUITE=bookworm KMETA=linux-image-cloud-amd64 CHOST=x86_64-pc-linux-gnu DTRIPLET=x86_64-linux-gnu
	STUB=linuxx64.efi.stub PARCH=amd64 PPROFILE=default/linux/amd64/23.0 ;;
# bookworm has no riscv64; trixie does.
riscv64) DARCH=riscv64 SUITE=trixie KMETA=linux-image-riscv64 CHOST=riscv64-unknown-linux-gnu DTRIPLET=riscv64-linux-gnu
	STUB=linuxriscv64.efi.stub PARCH=riscv PPROFILE=default/linux/riscv/23.0/rv64/lp64d ;;
*) echo "unknown target $TARGET" >&2; exit 2 ;;
esac

# Everything a dbh guest needs: a shell and coreutils, busybox (init, ip, udhcpc), a real sshd like
# Gentoo's, python3 for Portage, a C toolchain for building, the compressors Portage calls, kmod,
# util-linux (mount, switch_root, findfs: the initramfs's non-busybox tools), the distcc client
# (`dbh vm build --distcc`), and what a stage3 has for binpkg signatures: gnupg and openssl (getuto).
# No systemd-boot-efi: a stage3 has no systemd-stub (its .deb is fetched for the stub/ directory only).
PACKAGES="base-files base-passwd bash dash coreutils diffutils findutils grep gzip sed tar util-linux mount
 hostname libc-bin mawk busybox-static kmod openssh-server python3 gcc make libc6-dev xz-utils zstd bzip2
 patch procps distcc openssl"
# `dbh vm build` fetches binpkgs from the host's binhost with Portage's FETCHCOMMAND (wget) and
# verifies their signatures with gpg, as on a Gentoo stage3.
PACKAGES="$PACKAGES wget gnupg"

# The mirror comes from the host's apt configuration (never hard-coded).
MIRROR=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
	if (match($0, /URIs: *[^ \n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit } }' \
	/etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
	/etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || skip "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"

APTDIR=$CACHE/apt-$DARCH-$SUITE
mkdir -p "$APTDIR"/{lists/partial,cache/archives/partial,etc/preferences.d,etc/sources.list.d,debs}
: > "$APTDIR/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$APTDIR/etc/sources.list"
APT=(-o "APT::Architecture=$DARCH" -o "APT::Architectures=$DARCH" -o "Dir::State::Lists=$APTDIR/lists"
	-o "Dir::State::status=$APTDIR/status" -o "Dir::Cache=$APTDIR/cache" -o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list"
	-o "Dir::Etc::sourceparts=$APTDIR/etc/sources.list.d" -o "Dir::Etc::preferencesparts=$APTDIR/etc/preferences.d"
	-o "APT::Install-Recommends=false" -o "APT::Install-Suggests=false" -o "Debug::NoLocking=true" -o "APT::Sandbox::User=root")

T0=$(date +%s)
log "apt update ($SUITE/$DARCH from the host's mirror)"
if ! apt-get "${APT[@]}" -qq update >&2; then
	# The mirror trap (docs/lab.md, "The mirror trap"): during a mirror sync the Packages index can differ in
	# size from what InRelease says and apt rejects it. Take the index without that check; the .debs
	# are still verified against it by `apt-get download` (the index itself is then unverified).
	log "apt-get update failed; fetching the $DARCH Packages index without the InRelease size check"
	LISTS=$(echo "${MIRROR#*://}" | sed 's|/*$||; s|/|_|g')
	INREL=$APTDIR/lists/partial/${LISTS}_dists_${SUITE}_InRelease
	[ -s "$APTDIR/lists/${LISTS}_dists_${SUITE}_InRelease" ] || { [ -s "$INREL" ] && cp "$INREL" "$APTDIR/lists/"; } ||
		skip "apt-get update for $SUITE/$DARCH failed and no InRelease was fetched"
	/usr/lib/apt/apt-helper download-file "${MIRROR%/}/dists/$SUITE/main/binary-$DARCH/Packages.xz" "$APTDIR/Packages.xz" >&2 ||
		skip "cannot fetch the $SUITE/$DARCH Packages index (architecture missing on this mirror?)"
	xz -dc "$APTDIR/Packages.xz" > "$APTDIR/lists/${LISTS}_dists_${SUITE}_main_binary-${DARCH}_Packages" ||
		skip "the $SUITE/$DARCH Packages index is corrupt"
fi
KPKG=$(apt-cache "${APT[@]}" depends "$KMETA" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$KPKG" ] || skip "$KMETA not found for $DARCH in $SUITE"
# The kernel's own dependencies (initramfs-tools, linux-base) only matter to its postinst: left out.
CLOSURE=$(apt-get "${APT[@]}" -s install $PACKAGES 2>&1 | awk '/^Inst / {print $2}') ||
	skip "apt cannot resolve the package set for $DARCH"
[ -n "$CLOSURE" ] || skip "apt resolved an empty package set for $DARCH"
log "downloading $(echo $CLOSURE | wc -w) packages + $KPKG"
(cd "$APTDIR/debs" && apt-get "${APT[@]}" -qq download $CLOSURE "$KPKG" systemd-boot-efi >&2) || skip "cannot download the .debs"

mkdir -p "$CACHE/stages"
WORK=$(mktemp -d "$CACHE/stages/.work-$TARGET-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
R=$WORK/root
mkdir -p "$R"/usr/{bin,sbin,lib,lib64}
# merged /usr, as Debian 12 and Gentoo 23.0 stages have it
ln -s usr/bin "$R/bin"; ln -s usr/sbin "$R/sbin"; ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"
for p in $CLOSURE "$KPKG"; do
	deb=$(ls "$APTDIR/debs/${p}"_*.deb | head -1)
	dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$R"
done
KVER=$(ls "$R/lib/modules" | head -1)
[ -n "$KVER" ] || skip "the kernel package carried no modules"
# Debian keeps riscv64's kernel as /boot/vmlinux-*, Gentoo calls it vmlinuz: make both exist.
[ -e "$R/boot/vmlinuz-$KVER" ] || ln -s "vmlinux-$KVER" "$R/boot/vmlinuz-$KVER"
# Keep only module trees a virtual machine can use (the stage stays small; modules.dep is regenerated
# by `image create` from each module's own .modinfo when missing, as it is here: depmod runs in postinst).
M=$R/lib/modules/$KVER/kernel
rm -rf "$M"/sound "$M"/drivers/{gpu,media,infiniband,hid,usb,input,scsi,md,iio,mmc,mtd,net/wireless,net/ethernet,net/can,isdn,staging} \
	"$M"/net/{netfilter,ipv4/netfilter,ipv6/netfilter,bridge,wireless,mac80211,bluetooth} "$M"/fs/{btrfs,xfs,nfs,nfsd,ocfs2,gfs2,cifs,smb,ceph,f2fs}
rm -f "$R"/boot/initrd.img-*
# Things no guest build needs that make the stage slow to pack (docs, translations, device trees,
# sanitizer runtimes, the LTO dumper).
rm -rf "$R"/usr/share/{doc,man,info,locale,lintian,linda} "$R"/usr/lib/linux-image-* \
	"$R"/usr/bin/*-lto-dump-* "$R"/usr/lib/*-linux-gnu*/lib{asan,tsan,hwasan,lsan,ubsan,gprofng}.so*

# What the postinsts would have done and a guest needs.
ln -sf dash "$R/bin/sh"
ln -sf mawk "$R/usr/bin/awk"
ln -sf gcc "$R/usr/bin/cc"
# A Gentoo stage names its toolchain by CHOST (aarch64-unknown-linux-gnu-gcc, what tc-getCC and
# distcc's masquerade call); Debian's carries its own triplet: give every such tool the CHOST name too.
for tool in "$R/usr/bin/$DTRIPLET"-*; do
	[ -e "$tool" ] || continue
	ln -sf "$(basename "$tool")" "$R/usr/bin/$CHOST-${tool##*/$DTRIPLET-}"
done
ln -sf tar "$R/usr/bin/gtar"
ln -sf ../bin/busybox "$R/sbin/init"
install -d -m 0755 "$R"/{proc,sys,dev,run,boot,home,mnt,media,srv,var/log,var/lib,var/cache,etc/ssh/sshd_config.d}
install -d -m 1777 "$R/tmp" "$R/var/tmp"
install -d -m 0700 "$R/root" "$R/root/.ssh"
install -d -m 0755 "$R/run/sshd"
cat > "$R/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
sshd:x:100:65534::/run/sshd:/usr/sbin/nologin
portage:x:250:250:portage:/var/lib/portage/home:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
P
cat > "$R/etc/group" <<'G'
root:x:0:
daemon:x:1:
tty:x:5:
disk:x:6:
wheel:x:10:root
utmp:x:43:
_ssh:x:101:
portage:x:250:portage
nogroup:x:65534:
G
# `*` (not `!`): no password login, but not "locked", which sshd would refuse even for keys.
printf 'root:*:20000:0:99999:7:::\ndaemon:*:20000:0:99999:7:::\nsshd:*:20000:0:99999:7:::\nportage:*:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\n' > "$R/etc/shadow"
sed 's/:.*/:*::/' "$R/etc/group" > "$R/etc/gshadow"
chmod 0640 "$R/etc/shadow" "$R/etc/gshadow"
echo "/bin/sh
/bin/bash
/usr/bin/bash
/bin/dash" > "$R/etc/shells"
echo dbh-guest > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' > "$R/etc/hosts"
printf 'nameserver 10.0.2.3\n' > "$R/etc/resolv.conf"
printf '# <fs> <mountpoint> <type> <opts> <dump> <pass>\n' > "$R/etc/fstab"
# openssh-server's postinst writes sshd_config from this template.
cp "$R/usr/share/openssh/sshd_config" "$R/etc/ssh/sshd_config"
# Debian's PAM stack is assembled by pam-auth-update in a postinst that never ran.
echo "UsePAM no" > "$R/etc/ssh/sshd_config.d/00-dbhtest.conf"

# Portage from PyPI in a venv laid out by hand (the guest's python is never run here): the wheel is
# pure Python, so it is unpacked from the host, its scripts' shebangs point at the venv's python.
PYVER=$(ls "$R/usr/lib" | awk '/^python3\.[0-9]+$/' | sort -V | tail -1)
[ -n "$PYVER" ] || skip "no python3 in the stage"
PORTAGE_SPEC=${DBH_TEST_PORTAGE:-portage==3.0.83}
WHEELS=$CACHE/wheels
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/portage-"${PORTAGE_SPEC#portage==}"-*.whl >/dev/null 2>&1; then
	/usr/bin/python3 -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "$PORTAGE_SPEC" >&2 ||
		skip "cannot download $PORTAGE_SPEC from PyPI"
fi
WHEEL=$(ls "$WHEELS"/portage-"${PORTAGE_SPEC#portage==}"-*.whl | head -1)
V=$R/opt/portage
mkdir -p "$V/bin" "$V/lib/$PYVER/site-packages"
ln -s /usr/bin/python3 "$V/bin/python3"
ln -s python3 "$V/bin/python"
ln -s /usr/bin/$PYVER "$V/bin/$PYVER"
printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = %s\n' "${PYVER#python}" > "$V/pyvenv.cfg"
/usr/bin/python3 - "$WHEEL" "$V" "$PYVER" <<'PY'
import os, stat, sys, zipfile
wheel, venv, pyver = sys.argv[1:]
site = os.path.join(venv, "lib", pyver, "site-packages")
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if name.endswith("/"):
            continue
        parts = name.split("/")
        if parts[0].endswith(".data"):
            kind, rest = parts[1], parts[2:]
            dest = os.path.join(venv, "bin" if kind == "scripts" else "", *rest) if kind in ("scripts", "data") \
                else os.path.join(site, *rest)
        else:
            dest = os.path.join(site, *parts)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        data = z.read(info)
        if parts[0].endswith(".data") and parts[1] == "scripts" and data.startswith(b"#!python"):
            data = b"#!/opt/portage/bin/python3" + data[len(b"#!python"):]
        with open(dest, "wb") as f:
            f.write(data)
        mode = (info.external_attr >> 16) & 0o777
        if parts[0].endswith(".data") and parts[1] == "scripts":
            mode |= 0o755
        os.chmod(dest, mode or 0o644)
# console_scripts entry points become small launchers, as pip would write them.
import configparser
eps = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/entry_points.txt")]
if eps:
    cp = configparser.ConfigParser()
    cp.read_string(zipfile.ZipFile(wheel).read(eps[0]).decode())
    for name, target in (cp["console_scripts"].items() if cp.has_section("console_scripts") else []):
        mod, func = target.split(":")
        path = os.path.join(venv, "bin", name)
        with open(path, "w") as f:
            f.write(f"#!/opt/portage/bin/python3\nimport sys\nfrom {mod} import {func}\nsys.exit({func}())\n")
        os.chmod(path, 0o755)
PY
# `python3 -c 'import portage'` with the system python too.
PTH_DIR=$R/usr/lib/python3/dist-packages
mkdir -p "$PTH_DIR"
echo "/opt/portage/lib/$PYVER/site-packages" > "$PTH_DIR/dbh-portage.pth"
for tool in emerge ebuild emaint portageq gpkg-sign quickpkg egencache; do
	[ -e "$V/bin/$tool" ] || continue
	printf '#!/bin/sh\n# Portage from PyPI (venv /opt/portage) acting as this root'"'"'s package manager\nexport PORTAGE_OVERRIDE_EPREFIX=/\nexec /opt/portage/bin/%s "$@"\n' "$tool" > "$R/usr/bin/$tool"
	chmod 0755 "$R/usr/bin/$tool"
done
mkdir -p "$R/share/portage"
ln -s /opt/portage/share/portage/config "$R/share/portage/config"
install -d -m 0755 "$R"/etc/portage/{repos.conf,package.use,package.accept_keywords} "$R/var/db/repos" "$R/var/db/pkg"
install -d -m 0755 "$R/var/cache/binpkgs" "$R/var/cache/distfiles" "$R/var/lib/portage/home"
cat > "$R/etc/portage/make.conf" <<MC
# dbh test stage ($TARGET, Debian $SUITE packages + Portage from PyPI)
COMMON_FLAGS="-O2 -pipe"
CFLAGS="\${COMMON_FLAGS}"
CXXFLAGS="\${COMMON_FLAGS}"
LC_MESSAGES=C.utf8
MC
# As in a stage3: make.profile points into ::gentoo, which the stage does not carry, and repos.conf
# is Portage's default (gentoo at /var/db/repos/gentoo).
ln -s ../../var/db/repos/gentoo/profiles/$PPROFILE "$R/etc/portage/make.profile"
rmdir "$R/etc/portage/repos.conf"
# Gentoo's binhost as catalyst writes it, at an address that never answers (TEST-NET-1: connections
# hang until they time out): a build guest must not wait on it.
install -d -m 0755 "$R/etc/portage/binrepos.conf"
cat > "$R/etc/portage/binrepos.conf/gentoobinhost.conf" <<BR
# These settings were set by the catalyst build script that automatically
# built this stage.
# Please consider using a local mirror.

[gentoobinhost]
priority = 1
sync-uri = https://192.0.2.1/releases/$PARCH/binpackages/23.0/$PARCH/
BR
chown -R 250:250 "$R/var/lib/portage/home"

# getuto (projg2/getuto, vendored byte for byte) and the release key it imports, as
# sec-keys/openpgp-keys-gentoo-release installs it. The test release key also clear-signs the DIGESTS.
install -m 0755 "$GETUTO" "$R/usr/bin/getuto"
export GNUPGHOME=$WORK/gnupg
install -d -m 0700 "$GNUPGHOME"
gpg --batch -q --passphrase '' --quick-gen-key "dbh test release key <release@dbh.test>" ed25519 sign never 2>/dev/null ||
	skip "gpg cannot generate the test release key"
install -d -m 0755 "$R/usr/share/openpgp-keys"
gpg --batch -q --armor --export > "$R/usr/share/openpgp-keys/gentoo-release.asc"

# xz -0: ~10x faster than -3 for ~15 % more bytes; the stage is built in CI where time is short.
log "packing $(du -sh "$R" | cut -f1) (unpacked) with xz -0"
mkdir -p "$WORK/out"
tar -C "$R" --numeric-owner --sort=name --xattrs -cf - . | xz -T0 -0 > "$WORK/out/$NAME"
tar -tJf "$WORK/out/$NAME" | gzip -n > "$WORK/out/$NAME.CONTENTS.gz"
(
	cd "$WORK/out"
	echo "# BLAKE2B HASH"
	b2sum "$NAME.CONTENTS.gz" "$NAME"
	echo "# SHA512 HASH"
	sha512sum "$NAME.CONTENTS.gz" "$NAME"
) | gpg --batch -q --clearsign --digest-algo SHA512 > "$WORK/out/$NAME.DIGESTS"
gpg --batch -q --export > "$WORK/out/release-key.gpg"
gpgconf --kill all 2>/dev/null || :
# The target's systemd-stub beside the stage, not in it.
mkdir -p "$WORK/out/stub"
dpkg-deb --fsys-tarfile "$(ls "$APTDIR"/debs/systemd-boot-efi_*.deb | head -1)" |
	tar -x -O "./usr/lib/systemd/boot/efi/$STUB" > "$WORK/out/stub/$STUB"
[ -s "$WORK/out/stub/$STUB" ] || skip "systemd-boot-efi:$DARCH has no $STUB"
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
mv "$WORK/out" "$OUT"
log "done in $(( $(date +%s) - T0 )) s: $OUT ($(du -h "$OUT/$NAME" | cut -f1))"
echo "$OUT"

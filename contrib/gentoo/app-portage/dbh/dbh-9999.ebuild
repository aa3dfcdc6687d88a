# Copyright 2026 Gentoo Authors
# Distributed under the terms of the GNU General Public License v2

EAPI=8

# Live ebuild: crates are fetched at unpack time (cargo_live_src_unpack), like git-r3's sources.
inherit cargo git-r3 shell-completion systemd

DESCRIPTION="Build, sign and serve Gentoo binary packages for machines of another CPU architecture"
HOMEPAGE="https://dbh.test/"
# dbh has no public repository yet: point git-r3 at a clone, e.g. in /etc/portage/env/app-portage/dbh
#   EGIT_OVERRIDE_REPO_DBH="file:///home/me/src/dbh"
EGIT_REPO_URI="https://dbh.test/dbh.git"

LICENSE="GPL-2+"
# Dependent crate licenses
LICENSE+=" Apache-2.0 BSD ISC LGPL-2+ MIT MPL-2.0 Unicode-3.0 ZLIB"
SLOT="0"

# sequoia-openpgp links nettle; bindgen needs libclang at build time.
DEPEND="dev-libs/nettle:="
BDEPEND="
	llvm-core/clang
	virtual/pkgconfig
"
# What dbh runs (tests/setup-host.sh is the Debian list of the same): QEMU with the system
# emulators of the targets, edk2 firmware, the image tools, OpenPGP, SSH, scanelf, bubblewrap for
# chroot builds, distcc for `vm build --distcc`; the account dbh-serve runs as.
RDEPEND="
	${DEPEND}
	acct-user/dbh
	acct-group/dbh
	app-arch/cpio
	app-arch/xz-utils
	app-arch/zstd
	app-crypt/gnupg
	app-emulation/qemu[qemu_softmmu_targets_aarch64,qemu_softmmu_targets_x86_64,qemu_softmmu_targets_riscv64,qemu_softmmu_targets_ppc64]
	app-misc/pax-utils
	dev-vcs/git
	net-misc/openssh
	sys-apps/bubblewrap
	sys-devel/distcc
	sys-firmware/edk2-bin
	sys-fs/dosfstools
	sys-fs/e2fsprogs
	sys-fs/mtools
	sys-fs/squashfs-tools
"

QA_FLAGS_IGNORED="usr/bin/dbh"

src_unpack() {
	git-r3_src_unpack
	cargo_live_src_unpack
}

src_install() {
	cargo_src_install

	# Completions and man pages come from the binary's own clap definition.
	local dbh="$(cargo_target_dir)/dbh"
	"${dbh}" man --dir "${T}/man" || die
	doman "${T}"/man/*.1
	"${dbh}" completions bash > "${T}/dbh.bash" || die
	newbashcomp "${T}/dbh.bash" dbh
	"${dbh}" completions zsh > "${T}/_dbh" || die
	dozshcomp "${T}/_dbh"
	"${dbh}" completions fish > "${T}/dbh.fish" || die
	dofishcomp "${T}/dbh.fish"

	# dbh serve as a service; the dbh account comes from acct-user/dbh (which also installs its
	# sysusers.d entry for systemd).
	systemd_dounit contrib/systemd/dbh-serve.service
	newinitd contrib/openrc/init.d/dbh-serve dbh-serve
	newconfd contrib/openrc/conf.d/dbh-serve dbh-serve
	keepdir /var/lib/dbh

	dodoc README.md
	docinto contracts
	dodoc docs/*.md
}

pkg_postinst() {
	elog "Create the binhost signing key once, as root: dbh key generate"
	elog "Then serve every target's binhost: rc-service dbh-serve start (OpenRC)"
	elog "or systemctl enable --now dbh-serve (systemd). See /usr/share/doc/${PF}/README.md*."
}

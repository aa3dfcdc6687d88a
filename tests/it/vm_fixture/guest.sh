#!/bin/sh
# Builds a minimal guest in the layout of docs/vm-contract.md ($DBH_HOME/images/<target>/), the lab's
# way (docs/lab.md, "QEMU and guests under TCG"): Debian bookworm .debs of the guest's architecture, a busybox
# initramfs running dropbear, an ext4 disk labelled dbh-root; for arm64 a UKI made with
# aarch64-linux-gnu-objcopy on a FAT ESP made with mtools, for ppc64el (no UEFI on pseries) the
# kernel, initramfs and command line for direct boot. bookworm-security's ppc64el index is stale
# on the mirror here (docs/lab.md, "A stale security index"), so ppc64el uses the kernel ABI of the bookworm point release. The guest stays in its initramfs (the runner only needs sshd, a console and
# the disk); if the disk holds a file `/nossh` it never starts sshd (for the boot-timeout test).
# A stand-in until `dbh vm image create` exists; the runner tests do not depend on how it is made.
#
# usage: guest.sh ARCH OUTDIR WORKDIR   ARCH: arm64 | ppc64el (Debian names)
#   OUTDIR gets disk.qcow2, disk-nossh.qcow2, ssh/, image.toml and esp.img + uki.efi (arm64) or
#   vmlinuz + initrd.img + cmdline (ppc64el)
set -eu
ARCH=$1; OUT=$(realpath -m "$2"); WORK=$(realpath -m "$3")
case $ARCH in
  arm64) KVER=6.1.0-56-cloud-arm64; CONSOLE=ttyAMA0; TARGET=arm64; EXTRA=systemd-boot-efi/bookworm ;;
  ppc64el) KVER=6.1.0-50-powerpc64le; CONSOLE=hvc0; TARGET=ppc64le; EXTRA= ;;
  *) echo "unknown ARCH $ARCH" >&2; exit 1 ;;
esac
mkdir -p "$OUT/ssh" "$WORK/debs" "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial"
o="-oAPT::Architecture=$ARCH -oAPT::Architectures=$ARCH -oDir::State::Lists=$WORK/apt/lists -oDir::Cache=$WORK/apt/cache"
if [ ! -e "$WORK/debs/.done" ]; then
  apt-get $o update >/dev/null 2>&1 || echo "warning: some apt indexes failed (a stale mirror index is ignored)" >&2
  (cd "$WORK/debs" && apt-get $o download linux-image-$KVER $EXTRA busybox-static \
     dropbear-bin libc6 zlib1g libcrypt1 libtomcrypt1 libtommath1 libgmp10 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2)
  touch "$WORK/debs/.done"
fi
X="$WORK/x"; rm -rf "$X"; mkdir -p "$X"
for d in "$WORK"/debs/*.deb; do dpkg -x "$d" "$X"; done

# Keys: the client pair and the pinned host key (contract: ssh/id_ed25519{,.pub}, ssh/host_ed25519_key.pub).
rm -f "$OUT"/ssh/*
ssh-keygen -q -t ed25519 -N '' -C dbh-client -f "$OUT/ssh/id_ed25519"
rm -f "$WORK/host_ed25519_key" "$WORK/host_ed25519_key.pub"
ssh-keygen -q -t ed25519 -N '' -C dbh-guest -f "$WORK/host_ed25519_key"
cp "$WORK/host_ed25519_key.pub" "$OUT/ssh/host_ed25519_key.pub"

# initramfs
I="$WORK/initramfs"; rm -rf "$I"; mkdir -p "$I"; cd "$I"
mkdir -p bin sbin proc sys dev etc/ssh etc/dropbear root/.ssh tmp run mnt lib/modules usr/bin usr/sbin usr/lib
cp "$X/bin/busybox" bin/busybox
MODS=""
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio \
         failover net_failover virtio_net virtio_blk crc16 mbcache jbd2 ext4; do
  f=$(find "$X/lib/modules/$KVER/kernel" -name "$m.ko" | head -1); [ -n "$f" ] || continue
  cp "$f" lib/modules/; MODS="$MODS $m"
done
cp "$X/usr/sbin/dropbear" usr/sbin/; cp "$X/usr/lib/dropbear/dropbearconvert" usr/bin/ 2>/dev/null || cp "$X/usr/bin/dropbearconvert" usr/bin/
for d in lib usr/lib; do
  find "$X/$d" -maxdepth 2 -name '*.so*' | while read -r f; do r=${f#"$X"/}; mkdir -p "$(dirname "$r")"; cp -a "$f" "$r"; done
done
[ -e "$X/lib64" ] && cp -a "$X/lib64" . || true
cp "$OUT/ssh/id_ed25519.pub" root/.ssh/authorized_keys
cp "$WORK/host_ed25519_key" etc/ssh/ssh_host_ed25519_key
chmod 700 root root/.ssh; chmod 600 root/.ssh/authorized_keys etc/ssh/ssh_host_ed25519_key
echo 'root:x:0:0:root:/root:/bin/sh' > etc/passwd; echo 'root::0:' > etc/group; echo '/bin/sh' > etc/shells
cat > init <<EOI
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $MODS; do insmod /lib/modules/\$m.ko 2>/dev/null; done
echo "dbh-guest: initramfs up on \$(uname -m) \$(cut -d' ' -f1 /proc/uptime)s"
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
mount -t ext4 -o ro LABEL=dbh-root /mnt 2>/dev/null || mount -t ext4 -o ro /dev/vda /mnt
if [ -e /mnt/nossh ]; then
  echo "dbh-guest: sshd disabled by /nossh"
else
  dropbearconvert openssh dropbear /etc/ssh/ssh_host_ed25519_key /etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1
  dropbear -r /etc/dropbear/dropbear_ed25519_host_key -s -E -p 22 2>&1
  echo "dbh-guest: sshd started"
fi
while :; do sleep 3600; done
EOI
chmod +x init
find . | sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$WORK/initrd.img"
cd "$WORK"

printf '%s' "root=LABEL=dbh-root rw console=$CONSOLE panic=-1" > cmdline
if [ "$ARCH" = ppc64el ]; then
  cp "$X/boot/vmlinux-$KVER" "$OUT/vmlinuz"; cp initrd.img "$OUT/initrd.img"; cp cmdline "$OUT/cmdline"
else
# UKI (systemd 252 objcopy recipe, section VMAs from the stub's SizeOfImage and the kernel size)
printf 'ID=dbh-test\nNAME="dbh test guest"\n' > osrel
STUB="$X/usr/lib/systemd/boot/efi/linuxaa64.efi.stub"; KERNEL="$X/boot/vmlinuz-$KVER"
align() { echo $(( ($1 + 0xFFFFF) / 0x100000 * 0x100000 )); }
end=$(( $(aarch64-linux-gnu-objdump -p "$STUB" | awk '/SizeOfImage/{print "0x"$2}') ))
osrel=$(align $end); cmd=$(( osrel + 0x10000 )); linux=$(align $(( cmd + 0x10000 )))
initrd=$(align $(( linux + $(stat -c%s "$KERNEL") )))
aarch64-linux-gnu-objcopy \
  --add-section .osrel=osrel     --change-section-vma .osrel=$(printf 0x%x $osrel) \
  --add-section .cmdline=cmdline --change-section-vma .cmdline=$(printf 0x%x $cmd) \
  --add-section .linux="$KERNEL" --change-section-vma .linux=$(printf 0x%x $linux) \
  --add-section .initrd=initrd.img --change-section-vma .initrd=$(printf 0x%x $initrd) \
  "$STUB" "$OUT/uki.efi"

# ESP: a bare FAT image (AAVMF boots it as a non-block boot device)
rm -f "$OUT/esp.img"
mkfs.vfat -C "$OUT/esp.img" $(( $(stat -c%s "$OUT/uki.efi") / 1024 + 8192 )) >/dev/null
mmd -i "$OUT/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$OUT/esp.img" "$OUT/uki.efi" ::/EFI/BOOT/BOOTAA64.EFI
fi

# disks: ext4 LABEL=dbh-root; the -nossh variant carries /nossh
for v in ssh nossh; do
  rm -rf root-$v; mkdir root-$v; [ $v = nossh ] && touch root-$v/nossh
  rm -f disk-$v.ext4; mkfs.ext4 -q -F -L dbh-root -d root-$v disk-$v.ext4 64M
done
qemu-img convert -f raw -O qcow2 disk-ssh.ext4 "$OUT/disk.qcow2"
qemu-img convert -f raw -O qcow2 disk-nossh.ext4 "$OUT/disk-nossh.qcow2"
cat > "$OUT/image.toml" <<EOT
target = "$TARGET"
created = $(date +%s)
kernel = "$KVER"
init = "busybox"
guest_pkgdir = "/var/cache/binpkgs"
portage = "/usr/bin/emerge"
[stage]
path = "tests/it/vm_fixture/guest.sh $ARCH"
EOT
rm -rf "$X" "$I" root-ssh root-nossh disk-ssh.ext4 disk-nossh.ext4
echo "guest image in $OUT"

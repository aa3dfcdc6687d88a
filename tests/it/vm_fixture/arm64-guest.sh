#!/bin/sh
# Builds a minimal arm64 guest in the layout of VM-CONTRACT.md ($DBH_HOME/images/<target>/), the lab's
# way (shared/lab/vm-boot.md §1, §3): Debian bookworm arm64 .debs, a busybox initramfs running
# dropbear, a UKI made with aarch64-linux-gnu-objcopy, a FAT ESP made with mtools, an ext4 disk
# labelled dbh-root. The guest stays in its initramfs (the runner only needs sshd, a console and
# the disk); if the disk holds a file `/nossh` it never starts sshd (for the boot-timeout test).
# A stand-in until `dbh vm image create` exists; the runner tests do not depend on how it is made.
#
# usage: arm64-guest.sh OUTDIR WORKDIR      (OUTDIR gets disk.qcow2 esp.img uki.efi ssh/ image.toml
#                                            disk-nossh.qcow2)
set -eu
OUT=$(realpath -m "$1"); WORK=$(realpath -m "$2")
mkdir -p "$OUT/ssh" "$WORK/debs" "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial"
KVER=6.1.0-56-cloud-arm64
o="-oAPT::Architecture=arm64 -oAPT::Architectures=arm64 -oDir::State::Lists=$WORK/apt/lists -oDir::Cache=$WORK/apt/cache"
if [ ! -e "$WORK/debs/.done" ]; then
  apt-get $o update >/dev/null 2>&1 || echo "warning: some apt indexes failed" >&2
  (cd "$WORK/debs" && apt-get $o download linux-image-$KVER systemd-boot-efi/bookworm busybox-static \
     dropbear-bin libc6 zlib1g libcrypt1 libtomcrypt1 libtommath1 libgmp10 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2)
  touch "$WORK/debs/.done"
fi
X="$WORK/x"; rm -rf "$X"; mkdir -p "$X"
for d in "$WORK"/debs/*.deb; do dpkg -x "$d" "$X"; done

# Keys: the client pair and the pinned host key (contract: ssh/id_ed25519{,.pub}, ssh/host_ed25519_key.pub).
rm -f "$OUT"/ssh/*
ssh-keygen -q -t ed25519 -N '' -C dbh-client -f "$OUT/ssh/id_ed25519"
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

# UKI (systemd 252 objcopy recipe, section VMAs from the stub's SizeOfImage and the kernel size)
printf '%s' "root=LABEL=dbh-root rw console=ttyAMA0 panic=-1" > cmdline
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

# disks: ext4 LABEL=dbh-root; the -nossh variant carries /nossh
for v in ssh nossh; do
  rm -rf root-$v; mkdir root-$v; [ $v = nossh ] && touch root-$v/nossh
  rm -f disk-$v.ext4; mkfs.ext4 -q -F -L dbh-root -d root-$v disk-$v.ext4 64M
done
qemu-img convert -f raw -O qcow2 disk-ssh.ext4 "$OUT/disk.qcow2"
qemu-img convert -f raw -O qcow2 disk-nossh.ext4 "$OUT/disk-nossh.qcow2"
cat > "$OUT/image.toml" <<EOT
target = "arm64"
created = $(date +%s)
kernel = "$KVER"
init = "busybox"
guest_pkgdir = "/var/cache/binpkgs"
portage = "/usr/bin/emerge"
[stage]
path = "tests/it/vm_fixture/arm64-guest.sh"
EOT
rm -rf "$X" "$I" root-ssh root-nossh disk-ssh.ext4 disk-nossh.ext4
echo "guest image in $OUT"

//! Configuring an unpacked stage as a dbh guest: SSH keys (a fresh ed25519 host key whose public
//! half is pinned on the host, a client key pair whose public half is root's authorized key), sshd
//! settings, the network QEMU user-net expects (10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3), sshd and
//! the network enabled for the stage's init system, the console marker line, `/etc/fstab`, and
//! Portage settings that work under emulation.
//!
//! Init systems (detected in this order):
//! - OpenRC (`/sbin/openrc`): `/etc/runlevels/default/{sshd,net.eth0|dhcpcd,local}` symlinks as
//!   `rc-update add` makes them, netifrc's `/etc/conf.d/net`, the marker from `/etc/local.d/`;
//! - systemd (`/lib/systemd/systemd` or `/usr/lib/systemd/systemd`): `sshd.service`/`ssh.service`,
//!   `systemd-networkd` and a marker unit linked into `multi-user.target.wants`, a `.network` file;
//! - busybox init (anything else with a busybox): `/etc/inittab` running `/etc/init.d/dbh-rc`,
//!   which mounts, configures eth0 with busybox `ip`, starts sshd and prints the marker.
//!
//! The kernel command line has `net.ifnames=0`, so the first NIC is `eth0` under every init system.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::events::{Event, Reporter};
use crate::process::Cmd;

use super::ImageError;

/// The line the guest prints on its console once sshd runs (docs/vm-contract.md).
pub const MARKER: &str = "dbh-guest: sshd started";
pub const GUEST_PKGDIR: &str = "/var/cache/binpkgs";
pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
pub const GUEST_GATEWAY: &str = "10.0.2.2";
pub const GUEST_DNS: &str = "10.0.2.3";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InitSystem {
    Openrc,
    Systemd,
    Busybox,
}

impl std::fmt::Display for InitSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InitSystem::Openrc => "openrc",
            InitSystem::Systemd => "systemd",
            InitSystem::Busybox => "busybox",
        })
    }
}

/// What configuration found out.
#[derive(Debug, Clone)]
pub struct Configured {
    pub init: InitSystem,
    /// The guest's `emerge`.
    pub portage: String,
}

fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::File(crate::util::fs::FileError::Write { path: path.to_owned(), source })
}

/// Where an absolute in-guest path lives on the host: every component but the last is resolved
/// inside `root` (absolute symlinks re-rooted, `..` clamped), so a stage's symlinks (merged /usr,
/// or a hostile `/etc -> /etc`) can never make dbh write outside the root.
fn at(root: &Path, p: &str) -> PathBuf {
    resolve(root, p, false)
}

fn resolve(root: &Path, p: &str, follow_last: bool) -> PathBuf {
    let mut cur = root.to_owned();
    let mut parts: Vec<String> = p.split('/').filter(|s| !s.is_empty()).map(str::to_owned).rev().collect();
    let mut hops = 0;
    while let Some(part) = parts.pop() {
        if part == "." {
            continue;
        }
        if part == ".." {
            if cur != root {
                cur.pop();
            }
            continue;
        }
        let next = cur.join(&part);
        let is_last = parts.is_empty();
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() && (!is_last || follow_last) && hops < 40 => {
                hops += 1;
                let Ok(t) = std::fs::read_link(&next) else { return next };
                if t.is_absolute() {
                    cur = root.to_owned();
                }
                for c in t.to_string_lossy().split('/').filter(|s| !s.is_empty()).rev() {
                    parts.push(c.to_owned());
                }
            }
            _ => cur = next,
        }
    }
    cur
}

/// True when `p` exists in the guest, following symlinks inside the root (merged /usr).
pub fn exists_in(root: &Path, p: &str) -> bool {
    std::fs::metadata(resolve(root, p, true)).is_ok()
}

fn first_existing<'a>(root: &Path, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().find(|c| exists_in(root, c))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs_err::create_dir_all(parent).map_err(werr(parent))?;
    }
    // Replace symlinks (e.g. resolv.conf -> /run/...) instead of writing through them.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        fs_err::remove_file(path).map_err(werr(path))?;
    }
    fs_err::write(path, text).map_err(werr(path))?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(werr(path))?;
    Ok(())
}

fn symlink(target: &str, link: &Path) -> Result<(), ImageError> {
    if let Some(parent) = link.parent() {
        fs_err::create_dir_all(parent).map_err(werr(parent))?;
    }
    if std::fs::symlink_metadata(link).is_ok() {
        fs_err::remove_file(link).map_err(werr(link))?;
    }
    std::os::unix::fs::symlink(target, link).map_err(werr(link))
}

fn append_once(path: &Path, marker: &str, text: &str) -> Result<(), ImageError> {
    let current = std::fs::read_to_string(path).unwrap_or_default();
    if current.contains(marker) {
        return Ok(());
    }
    let mut new = current;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(text);
    write(path, &new, 0o644)
}

/// What `/sbin/init` runs: busybox or systemd by where the link points, else OpenRC when the stage
/// has it (sysvinit + OpenRC, or openrc-init), else systemd when present, else busybox init.
pub fn detect_init(root: &Path) -> InitSystem {
    let init = resolve(root, "/sbin/init", true);
    let name = init.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if init.exists() && name.contains("busybox") {
        InitSystem::Busybox
    } else if init.exists() && name == "systemd" {
        InitSystem::Systemd
    } else if exists_in(root, "/sbin/openrc") || exists_in(root, "/usr/sbin/openrc") {
        InitSystem::Openrc
    } else if exists_in(root, "/lib/systemd/systemd") || exists_in(root, "/usr/lib/systemd/systemd") {
        InitSystem::Systemd
    } else {
        InitSystem::Busybox
    }
}

/// Generates the key pairs in `ssh_dir` (the image's `ssh/`) and installs them into the root.
fn ssh_keys(root: &Path, ssh_dir: &Path, target: &str) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::create_dir_all(ssh_dir).map_err(werr(ssh_dir))?;
    fs_err::set_permissions(ssh_dir, std::fs::Permissions::from_mode(0o700)).map_err(werr(ssh_dir))?;
    let keygen = |file: &Path, comment: &str| {
        Cmd::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(file)
            .install_hint("openssh-client (Debian) or net-misc/openssh (Gentoo)")
            .output()
    };
    let host = ssh_dir.join("host_ed25519_key");
    keygen(&host, &format!("dbh-guest-{target}"))?;
    let client = ssh_dir.join("id_ed25519");
    keygen(&client, &format!("dbh@{target}"))?;

    let etc_ssh = at(root, "/etc/ssh");
    fs_err::create_dir_all(&etc_ssh).map_err(werr(&etc_ssh))?;
    let host_priv = fs_err::read_to_string(&host).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: host.clone(), source }))?;
    let host_pub_path = ssh_dir.join("host_ed25519_key.pub");
    let host_pub =
        fs_err::read_to_string(&host_pub_path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: host_pub_path.clone(), source }))?;
    write(&etc_ssh.join("ssh_host_ed25519_key"), &host_priv, 0o600)?;
    write(&etc_ssh.join("ssh_host_ed25519_key.pub"), &host_pub, 0o644)?;
    // The private half lives only in the image.
    fs_err::remove_file(&host).map_err(werr(&host))?;

    let client_pub_path = ssh_dir.join("id_ed25519.pub");
    let client_pub =
        fs_err::read_to_string(&client_pub_path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: client_pub_path.clone(), source }))?;
    let dot_ssh = at(root, "/root/.ssh");
    fs_err::create_dir_all(&dot_ssh).map_err(werr(&dot_ssh))?;
    fs_err::set_permissions(&dot_ssh, std::fs::Permissions::from_mode(0o700)).map_err(werr(&dot_ssh))?;
    write(&dot_ssh.join("authorized_keys"), &client_pub, 0o600)?;
    Ok(())
}

const SSHD_SETTINGS: &str = "# dbh: key-only root login with the pinned host key\n\
HostKey /etc/ssh/ssh_host_ed25519_key\n\
PermitRootLogin prohibit-password\n\
PasswordAuthentication no\n\
KbdInteractiveAuthentication no\n";

fn sshd_config(root: &Path) -> Result<(), ImageError> {
    let main = at(root, "/etc/ssh/sshd_config");
    let text = std::fs::read_to_string(&main).unwrap_or_default();
    let includes_dropins = text
        .lines()
        .any(|l| l.trim_start().to_ascii_lowercase().starts_with("include") && l.contains("sshd_config.d"));
    if includes_dropins {
        write(&at(root, "/etc/ssh/sshd_config.d/10-dbh.conf"), SSHD_SETTINGS, 0o644)
    } else {
        // First value wins in sshd_config: put ours at the top.
        if text.contains("# dbh: key-only") {
            return Ok(());
        }
        write(&main, &format!("{SSHD_SETTINGS}\n{text}"), 0o644)
    }
}

fn sshd_binary(root: &Path) -> &'static str {
    first_existing(root, &["/usr/sbin/sshd", "/sbin/sshd", "/usr/bin/sshd"]).unwrap_or("/usr/sbin/sshd")
}

pub fn openrc(root: &Path) -> Result<(), ImageError> {
    let default = at(root, "/etc/runlevels/default");
    symlink("/etc/init.d/sshd", &default.join("sshd"))?;
    if exists_in(root, "/etc/init.d/net.lo") {
        symlink("net.lo", &at(root, "/etc/init.d/net.eth0"))?;
        symlink("/etc/init.d/net.eth0", &default.join("net.eth0"))?;
        append_once(
            &at(root, "/etc/conf.d/net"),
            "# dbh:",
            &format!(
                "# dbh: QEMU user networking\nconfig_eth0=\"{GUEST_ADDRESS}\"\nroutes_eth0=\"default via {GUEST_GATEWAY}\"\ndns_servers_eth0=\"{GUEST_DNS}\"\n"
            ),
        )?;
    } else if exists_in(root, "/etc/init.d/dhcpcd") {
        symlink("/etc/init.d/dhcpcd", &default.join("dhcpcd"))?;
    }
    symlink("/etc/init.d/local", &default.join("local"))?;
    write(
        &at(root, "/etc/local.d/dbh-marker.start"),
        &format!("#!/bin/sh\n# dbh: tell the host's runner (console) that sshd is up\necho \"{MARKER}\" > /dev/console\n"),
        0o755,
    )?;
    // OpenRC's serial getty is irrelevant; the console must not be cleared by agetty either way.
    Ok(())
}

pub fn systemd(root: &Path) -> Result<(), ImageError> {
    let wants = at(root, "/etc/systemd/system/multi-user.target.wants");
    let unit_dir = first_existing(root, &["/usr/lib/systemd/system", "/lib/systemd/system"]).unwrap_or("/usr/lib/systemd/system");
    let sshd_unit = ["sshd.service", "ssh.service"]
        .into_iter()
        .find(|u| exists_in(root, &format!("{unit_dir}/{u}")))
        .unwrap_or("sshd.service");
    symlink(&format!("{unit_dir}/{sshd_unit}"), &wants.join(sshd_unit))?;
    symlink(&format!("{unit_dir}/systemd-networkd.service"), &wants.join("systemd-networkd.service"))?;
    symlink(
        &format!("{unit_dir}/systemd-networkd.socket"),
        &at(root, "/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"),
    )?;
    write(
        &at(root, "/etc/systemd/network/20-dbh.network"),
        &format!(
            "# dbh: QEMU user networking\n[Match]\nName=eth0 en*\n\n[Network]\nAddress={GUEST_ADDRESS}\nGateway={GUEST_GATEWAY}\nDNS={GUEST_DNS}\n"
        ),
        0o644,
    )?;
    write(
        &at(root, "/etc/systemd/system/dbh-marker.service"),
        &format!(
            "[Unit]\nDescription=dbh: tell the host's runner that sshd is up\nAfter={sshd_unit}\nWants={sshd_unit}\n\n\
             [Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo \"{MARKER}\" > /dev/console'\n\n[Install]\nWantedBy=multi-user.target\n"
        ),
        0o644,
    )?;
    symlink("/etc/systemd/system/dbh-marker.service", &wants.join("dbh-marker.service"))?;
    Ok(())
}

pub fn busybox_init(root: &Path) -> Result<(), ImageError> {
    let bb = first_existing(root, &["/bin/busybox", "/usr/bin/busybox", "/sbin/busybox"]).unwrap_or("/bin/busybox");
    let sshd = sshd_binary(root);
    if !exists_in(root, "/sbin/init") {
        symlink(bb, &at(root, "/sbin/init"))?;
    }
    for applet in ["poweroff", "reboot", "halt"] {
        if !exists_in(root, &format!("/sbin/{applet}")) && !exists_in(root, &format!("/usr/sbin/{applet}")) {
            symlink(bb, &at(root, &format!("/usr/sbin/{applet}")))?;
        }
    }
    write(
        &at(root, "/etc/inittab"),
        "# dbh: busybox init\n::sysinit:/etc/init.d/dbh-rc start\n::ctrlaltdel:/sbin/reboot\n::shutdown:/etc/init.d/dbh-rc stop\n",
        0o644,
    )?;
    let addr = GUEST_ADDRESS;
    let gw = GUEST_GATEWAY;
    write(
        &at(root, "/etc/init.d/dbh-rc"),
        &format!(
            r#"#!{bb} sh
# dbh: the whole boot of a busybox-init guest: filesystems, network (QEMU user-net), sshd.
BB={bb}
case "$1" in
stop)
	$BB killall sshd 2>/dev/null
	$BB sync
	$BB mount -o remount,ro / 2>/dev/null
	exit 0
	;;
esac
$BB mount -t proc proc /proc 2>/dev/null
$BB mount -t sysfs sysfs /sys 2>/dev/null
$BB mount -t devtmpfs devtmpfs /dev 2>/dev/null
$BB mkdir -p /dev/pts /dev/shm
# What udev/OpenRC would add to a bare devtmpfs (Portage checks /dev/fd).
[ -e /dev/fd ] || $BB ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || $BB ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || $BB ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || $BB ln -s /proc/self/fd/2 /dev/stderr
$BB mount -t devpts -o gid=5,mode=620 devpts /dev/pts
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$BB mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
$BB mount -o remount,rw /
$BB mkdir -p /run/sshd /var/log /var/tmp
$BB chmod 0755 /run/sshd
[ -r /etc/hostname ] && $BB hostname -F /etc/hostname
$BB ip link set lo up
$BB ip link set eth0 up
$BB ip addr add {addr} dev eth0
$BB ip route add default via {gw}
{sshd} && echo "{MARKER}" > /dev/console
"#
        ),
        0o755,
    )?;
    Ok(())
}

/// Portage settings for building binary packages in the guest under emulation.
pub const MAKE_CONF: &str = "\n# dbh: build binary packages in this guest (sandboxes need namespaces that emulation makes slow or absent)\n\
FEATURES=\"buildpkg -sandbox -usersandbox -pid-sandbox -network-sandbox -ipc-sandbox -mount-sandbox\"\n\
PKGDIR=\"/var/cache/binpkgs\"\n\
BINPKG_FORMAT=\"gpkg\"\n";

fn portage(root: &Path) -> Result<String, ImageError> {
    append_once(&at(root, "/etc/portage/make.conf"), "# dbh: build binary packages", MAKE_CONF)?;
    fs_err::create_dir_all(at(root, GUEST_PKGDIR)).map_err(werr(&at(root, GUEST_PKGDIR)))?;
    Ok(first_existing(root, &["/usr/bin/emerge", "/bin/emerge"]).unwrap_or("/usr/bin/emerge").to_owned())
}

fn fstab(root: &Path) -> Result<(), ImageError> {
    let path = at(root, "/etc/fstab");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let has_root = text.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        !l.trim_start().starts_with('#') && w.get(1) == Some(&"/")
    });
    if !has_root {
        append_once(&path, "LABEL=dbh-root", "LABEL=dbh-root\t/\text4\tdefaults,noatime\t0 1\n")?;
    }
    Ok(())
}

/// Configures `root` for `target`; key material goes to `ssh_dir`.
pub fn configure(root: &Path, target: &crate::target::Target, ssh_dir: &Path, reporter: &dyn Reporter) -> Result<Configured, ImageError> {
    ssh_keys(root, ssh_dir, &target.name)?;
    sshd_config(root)?;
    fs_err::create_dir_all(at(root, "/run/sshd")).map_err(werr(&at(root, "/run/sshd")))?;
    fstab(root)?;
    write(&at(root, "/etc/resolv.conf"), &format!("nameserver {GUEST_DNS}\n"), 0o644)?;
    let hostname = format!("dbh-{}", target.name);
    write(&at(root, "/etc/hostname"), &format!("{hostname}\n"), 0o644)?;
    if exists_in(root, "/etc/conf.d") {
        write(&at(root, "/etc/conf.d/hostname"), &format!("hostname=\"{hostname}\"\n"), 0o644)?;
    }
    let init = detect_init(root);
    match init {
        InitSystem::Openrc => openrc(root)?,
        InitSystem::Systemd => systemd(root)?,
        InitSystem::Busybox => busybox_init(root)?,
    }
    let portage = portage(root)?;
    reporter.event(Event::Note { message: format!("configured the {init} guest: sshd, eth0 {GUEST_ADDRESS}, Portage") });
    Ok(Configured { init, portage })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(root: &Path, dir: &str) -> Vec<(String, String)> {
        let mut out: Vec<_> = std::fs::read_dir(at(root, dir))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read_link(e.path()).unwrap().display().to_string())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn openrc_layout_is_what_rc_update_makes() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for f in ["/sbin/openrc", "/etc/init.d/net.lo", "/etc/init.d/sshd", "/etc/init.d/local"] {
            write(&at(r, f), "#!/sbin/openrc-run\n", 0o755).unwrap();
        }
        assert_eq!(detect_init(r), InitSystem::Openrc);
        openrc(r).unwrap();
        assert_eq!(
            links(r, "/etc/runlevels/default"),
            [
                ("local".into(), "/etc/init.d/local".into()),
                ("net.eth0".into(), "/etc/init.d/net.eth0".into()),
                ("sshd".into(), "/etc/init.d/sshd".into())
            ]
        );
        assert_eq!(std::fs::read_link(at(r, "/etc/init.d/net.eth0")).unwrap(), Path::new("net.lo"));
        let net = std::fs::read_to_string(at(r, "/etc/conf.d/net")).unwrap();
        assert!(net.contains("config_eth0=\"10.0.2.15/24\"\nroutes_eth0=\"default via 10.0.2.2\""), "{net}");
        openrc(r).unwrap();
        assert_eq!(std::fs::read_to_string(at(r, "/etc/conf.d/net")).unwrap(), net, "idempotent");
        assert!(std::fs::read_to_string(at(r, "/etc/local.d/dbh-marker.start")).unwrap().contains(MARKER));
    }

    #[test]
    fn systemd_layout_enables_sshd_networkd_and_marker() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for f in ["/usr/lib/systemd/systemd", "/usr/lib/systemd/system/sshd.service"] {
            write(&at(r, f), "", 0o755).unwrap();
        }
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        assert_eq!(detect_init(r), InitSystem::Systemd);
        systemd(r).unwrap();
        assert_eq!(
            links(r, "/etc/systemd/system/multi-user.target.wants"),
            [
                ("dbh-marker.service".into(), "/etc/systemd/system/dbh-marker.service".into()),
                ("sshd.service".into(), "/usr/lib/systemd/system/sshd.service".into()),
                ("systemd-networkd.service".into(), "/usr/lib/systemd/system/systemd-networkd.service".into())
            ]
        );
        let network = std::fs::read_to_string(at(r, "/etc/systemd/network/20-dbh.network")).unwrap();
        assert!(network.contains("[Match]\nName=eth0 en*\n") && network.contains("Address=10.0.2.15/24\nGateway=10.0.2.2\n"));
        let marker = std::fs::read_to_string(at(r, "/etc/systemd/system/dbh-marker.service")).unwrap();
        assert!(marker.contains("After=sshd.service") && marker.contains(MARKER));
    }

    #[test]
    fn busybox_init_gets_inittab_and_rc() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(&at(r, "/usr/bin/busybox"), "", 0o755).unwrap();
        write(&at(r, "/usr/sbin/sshd"), "", 0o755).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", r.join("sbin")).unwrap();
        assert_eq!(detect_init(r), InitSystem::Busybox);
        // systemd being installed does not matter while /sbin/init is busybox (Debian test stages).
        write(&at(r, "/usr/lib/systemd/systemd"), "", 0o755).unwrap();
        std::os::unix::fs::symlink("../bin/busybox", r.join("usr/sbin/init")).unwrap();
        assert_eq!(detect_init(r), InitSystem::Busybox);
        std::fs::remove_file(r.join("usr/sbin/init")).unwrap();
        busybox_init(r).unwrap();
        assert!(std::fs::read_to_string(at(r, "/etc/inittab")).unwrap().contains("::sysinit:/etc/init.d/dbh-rc start"));
        let rc = std::fs::read_to_string(at(r, "/etc/init.d/dbh-rc")).unwrap();
        assert!(rc.starts_with("#!/bin/busybox sh\n"), "{rc}");
        assert!(rc.contains("ip addr add 10.0.2.15/24 dev eth0") && rc.contains("/usr/sbin/sshd && echo \"dbh-guest: sshd started\""));
        assert_eq!(std::fs::read_link(at(r, "/usr/sbin/init")).unwrap(), Path::new("/bin/busybox"));
        assert_eq!(std::fs::read_link(at(r, "/usr/sbin/poweroff")).unwrap(), Path::new("/bin/busybox"));
    }

    #[test]
    fn sshd_settings_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(&at(r, "/etc/ssh/sshd_config"), "PermitRootLogin yes\n", 0o644).unwrap();
        sshd_config(r).unwrap();
        let t = std::fs::read_to_string(at(r, "/etc/ssh/sshd_config")).unwrap();
        assert!(t.starts_with("# dbh: key-only") && t.ends_with("PermitRootLogin yes\n"));
        write(&at(r, "/etc/ssh/sshd_config"), "Include /etc/ssh/sshd_config.d/*.conf\n", 0o644).unwrap();
        sshd_config(r).unwrap();
        assert!(at(r, "/etc/ssh/sshd_config.d/10-dbh.conf").exists());
    }
}

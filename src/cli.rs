//! The command line: clap types only. docs/architecture.md ("Command contract") is the contract for names and flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// dbh — build, sign and serve Gentoo binary packages for other CPU architectures.
///
/// Data goes to stdout, everything else to stderr. Exit status: 0 success, 1 a user or
/// configuration error or a failed build, 2 a usage error, 101 a bug in dbh.
#[derive(Debug, Parser)]
#[command(name = "dbh", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// State directory [env: DBH_HOME; default: /var/lib/dbh as root, else $XDG_DATA_HOME/dbh]
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// More output: -v shows every command dbh runs, -vv debug, -vvv trace
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors; no progress bars
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Colour in log lines: auto = when stderr is a terminal and NO_COLOR is unset or empty
    #[arg(long, global = true, value_enum, default_value_t = ColorWhen::Auto, value_name = "WHEN")]
    pub color: ColorWhen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the built-in and user-defined targets with their QEMU and CHOST facts
    Targets {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show the resolved settings
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Index, check and add to binhosts (PKGDIRs)
    #[command(subcommand)]
    Binhost(BinhostCommand),
    /// The binhost signing key (OpenPGP), kept under $DBH_HOME/keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Serve every target's binhost over HTTP at /<target>/
    Serve(ServeArgs),
    /// Unified Kernel Images
    #[command(subcommand)]
    Uki(UkiCommand),
    /// Guest images and virtual machines of a target's architecture
    #[command(subcommand)]
    Vm(VmCommand),
    /// Cross-compile on the host (CBUILD = host, CHOST = target)
    #[command(subcommand)]
    Cross(CrossCommand),
    /// Build packages for a target with the best available backend
    Build(BuildArgs),
    /// Root filesystems and bootable images from a target's binhost
    #[command(subcommand)]
    Rootfs(RootfsCommand),
    /// Print a shell completion script on stdout (e.g. `dbh completions bash > /usr/share/bash-completion/completions/dbh`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print dbh's man page (roff) on stdout, or write one page per subcommand into a directory
    Man {
        /// Write dbh.1, dbh-vm.1, dbh-vm-build.1, ... into DIR instead
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Ebuild repositories: dbh-managed trees (e.g. ::gentoo) and cached snapshots
    #[command(subcommand)]
    Repo(RepoCommand),
    /// On a Gentoo client: why its Portage would not use a binhost's packages
    #[command(subcommand)]
    Client(ClientCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Run this client's `emerge --pretend --verbose --getbinpkg` and say, for every package it
    /// would build from source although the binhost has it, why (USE, keyword, CHOST, changed
    /// dependencies, a stale cached index) and what makes it take the binpkg; exit 0 when
    /// everything would come from a binhost
    Explain {
        /// The target's binhost URL as the client uses it, e.g. http://HOST:8080/arm64
        #[arg(long, value_name = "URL")]
        binhost: String,
        /// Portage's configuration root (PORTAGE_CONFIGROOT), e.g. a copy of a client's /etc/portage's parent [default: the environment's, else /]
        #[arg(long, value_name = "DIR")]
        config_root: Option<PathBuf>,
        /// Atoms or sets [default: @world]
        #[arg(value_name = "ATOM")]
        atoms: Vec<String>,
        /// Extra arguments for emerge, after `--`
        #[arg(last = true, value_name = "EMERGE_ARGS")]
        emerge_args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Update a dbh-managed repository (under $DBH_HOME/repos/NAME) from a git or rsync URL
    Sync {
        /// Repository name, e.g. gentoo
        name: String,
        /// git URL, rsync://HOST/MODULE or a local directory [default: the URL of the last sync]
        #[arg(long)]
        url: Option<String>,
    },
    /// List dbh-managed repositories and cached snapshots
    List,
    /// Make (or find cached) the read-only snapshot builders get of a repository
    Snapshot {
        /// A repository directory, or the name of a dbh-managed repository
        repo: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every setting with its value and where it came from, then the per-target build
    /// configuration ($DBH_HOME/targets/T/portage/) of every target that has one
    Show(ConfigShowArgs),
}

#[derive(Debug, Args)]
pub struct ConfigShowArgs {
    /// Show only this target's build configuration (written with defaults if it has none yet)
    #[arg(long, short)]
    pub target: Option<String>,
    /// Print JSON instead of TOML-like text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BinhostCommand {
    /// (Re)write DIR/Packages and DIR/Packages.gz from the binary packages under DIR
    Index {
        /// The binhost directory (a PKGDIR)
        dir: PathBuf,
        /// Re-read every package, not only those whose size or mtime changed
        #[arg(long)]
        full: bool,
    },
    /// List every inconsistency between DIR's index and its files; exit 1 if there is any
    Check {
        /// The binhost directory (a PKGDIR)
        dir: PathBuf,
        /// Print JSON (`{"dir", "consistent", "problems": [{"path", "message"}]}`) instead of lines
        #[arg(long)]
        json: bool,
    },
    /// Verify, sign, give BUILD_IDs to and publish binary packages into a target's binhost
    Add {
        /// The target whose binhost receives the packages
        #[arg(long, short)]
        target: String,
        /// Publish without signing (clients then need verify-signature = false)
        #[arg(long)]
        unsigned: bool,
        /// Binary packages (.gpkg.tar, .xpak, .tbz2)
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// List the generations of a target's published index, oldest first
    Generations {
        #[arg(long, short)]
        target: String,
        /// One JSON array of objects (generation, time, timestamp, op, packages, added, removed)
        #[arg(long)]
        json: bool,
    },
    /// Republish an earlier generation's index as a new generation (TIMESTAMP still moves forward)
    Rollback {
        #[arg(long, short)]
        target: String,
        /// The generation to republish [default: the one before the current]
        #[arg(long, value_name = "N")]
        to: Option<u64>,
    },
    /// Take packages out of a target's index (a new generation); files stay until `prune`
    Rm {
        #[arg(long, short)]
        target: String,
        /// Only list what would be taken out
        #[arg(long)]
        dry_run: bool,
        /// CATEGORY/PN (every version), a CPV (every BUILD_ID) or CPV-BUILD_ID
        #[arg(required = true, value_name = "ATOM|CPV[-BUILD_ID]")]
        packages: Vec<String>,
    },
    /// Drop old BUILD_IDs (and with --unreferenced packages the repositories no longer have), delete files no kept generation lists, old logs
    Prune {
        #[arg(long, short)]
        target: String,
        /// BUILD_IDs kept per CPV, newest first
        #[arg(long, default_value_t = 1, value_name = "N")]
        keep: usize,
        /// Generations whose files are kept (and that stay available to rollback), counting the new one
        #[arg(long, default_value_t = 5, value_name = "M")]
        keep_generations: usize,
        /// Also drop packages whose ebuild is no longer in their repository (eclean-pkg's rule), at the revision REPO_REVISIONS records
        #[arg(long)]
        unreferenced: bool,
        /// A repository to consult for --unreferenced (repeatable) [default: the target's repos.conf locations]
        #[arg(long, value_name = "PATH")]
        repo: Vec<PathBuf>,
        /// Only list what would go
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a binrepos.conf stanza for a target and the steps to trust its key
    Conf {
        #[arg(long, short)]
        target: String,
        /// The binhost's base URL as clients reach it (the target's path is appended)
        #[arg(long)]
        url: String,
        /// The binhost is served unsigned: write verify-signature = false
        #[arg(long)]
        unsigned: bool,
        /// Print the client's trust script (what GET /<target>/trust.sh serves) instead of the stanza
        #[arg(long, conflicts_with = "unsigned")]
        trust_script: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create the binhost signing key (ed25519) if there is none
    Generate {
        /// User id, e.g. "Example binhost <binhost@example.org>" [default: setting key.uid]
        #[arg(long)]
        uid: Option<String>,
        /// Replace an existing key (clients must import the new one)
        #[arg(long)]
        force: bool,
    },
    /// Print the public key, ASCII-armored, on stdout
    Export,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory holding one binhost per target [default: $DBH_HOME/binhost]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Address to listen on; repeat for several (IPv6 as [::1]:8080) [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Base URL clients use, written into the served binrepos.conf [default: from the Host header]
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum UkiCommand {
    /// Assemble a UKI from a systemd-stub, a kernel, an initramfs and a command line
    Build(UkiBuildArgs),
}

#[derive(Debug, Args)]
pub struct UkiBuildArgs {
    #[arg(long, short)]
    pub target: String,
    /// The kernel image (arm64/riscv64 Image or x86 bzImage, with an EFI stub)
    #[arg(long)]
    pub kernel: PathBuf,
    /// The initramfs [default: generated for the target from --modules]
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line [default: root=LABEL=dbh-root console=<target console>]
    #[arg(long)]
    pub cmdline: Option<String>,
    /// The systemd-stub to use [default: found on the host for the target's EFI arch]
    #[arg(long)]
    pub stub: Option<PathBuf>,
    /// Kernel modules directory for a generated initramfs (lib/modules/<version>)
    #[arg(long)]
    pub modules: Option<PathBuf>,
    /// Output file
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Guest disk images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Boot the target's guest and wait until SSH answers
    Start(VmTarget),
    /// Shut the target's guest down (ACPI power-off, then quit, then kill)
    Stop(VmTarget),
    /// Say whether the target's guest runs, and how to reach it
    Status(VmStatusArgs),
    /// Open an interactive shell in the target's guest
    Ssh(VmTarget),
    /// Run a command in the target's guest and pass its output and exit status through
    Exec {
        #[arg(long, short)]
        target: String,
        /// The command and its arguments
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build packages in the target's guest, then sign and publish them
    Build(VmBuildArgs),
}

#[derive(Debug, Args)]
pub struct VmTarget {
    #[arg(long, short)]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct VmStatusArgs {
    #[arg(long, short)]
    pub target: String,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Make the target's guest image from a stage tarball
    Create(ImageCreateArgs),
    /// Install packages from the target's binhost into its base image (default: the build tools
    /// distcc and gnupg, where missing), so that every later guest starts with them
    Update(ImageUpdateArgs),
}

#[derive(Debug, Args)]
pub struct ImageUpdateArgs {
    #[arg(long, short)]
    pub target: String,
    /// A local ebuild repository the packages' ebuilds and the profile come from; repeatable
    #[arg(long = "repo", value_name = "PATH")]
    pub repos: Vec<PathBuf>,
    /// Portage profile as `eselect profile` names it, REPO:PATH [default: the target's]
    #[arg(long, value_name = "REPO:PATH")]
    pub profile: Option<String>,
    /// Packages to install from the binhost [default: sys-devel/distcc and app-crypt/gnupg, where missing]
    #[arg(value_name = "ATOM")]
    pub atoms: Vec<String>,
    #[command(flatten)]
    pub size: VmSizeArgs,
}

#[derive(Debug, Args)]
pub struct ImageCreateArgs {
    #[arg(long, short)]
    pub target: String,
    /// Stage tarball: a URL or a local path
    #[arg(long)]
    pub stage: String,
    /// Gentoo DIGESTS file [default: the stage's URL or path + .DIGESTS]
    #[arg(long)]
    pub digests: Option<String>,
    /// OpenPGP keyring to verify the DIGESTS signature [default: Gentoo's release keys,
    /// /usr/share/openpgp-keys/gentoo-release.asc]
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Accept a DIGESTS file whose signature is missing or not checked (only the stage's
    /// integrity is then verified, not who made it)
    #[arg(long, conflicts_with = "keyring")]
    pub insecure_no_signature: bool,
    /// Kernel image to boot [default: from the stage's /boot]
    #[arg(long, requires = "modules")]
    pub kernel: Option<PathBuf>,
    /// Kernel modules directory [default: from the stage's /lib/modules]
    #[arg(long, requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// systemd-stub for a UKI [default: the stage's or the host's; without one the firmware boots
    /// the kernel's own EFI stub]
    #[arg(long, value_name = "FILE")]
    pub stub: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildCommon {
    #[arg(long, short)]
    pub target: String,
    /// A local ebuild repository to make available (named by its profiles/repo_name); repeatable
    #[arg(long = "repo", value_name = "PATH")]
    pub repos: Vec<PathBuf>,
    /// Portage profile as `eselect profile` names it, REPO:PATH [default: the target's]
    #[arg(long, value_name = "REPO:PATH")]
    pub profile: Option<String>,
    /// Parallel jobs [default: setting build.jobs]
    #[arg(long, short)]
    pub jobs: Option<u32>,
    /// Package atoms or @sets [default: the target's world file, as @dbh-world]
    #[arg(value_name = "ATOM")]
    pub atoms: Vec<String>,
    /// Extra arguments for emerge, after `--`
    #[arg(last = true, value_name = "EMERGE_ARGS")]
    pub emerge_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VmBuildArgs {
    #[command(flatten)]
    pub common: BuildCommon,
    /// Offload the guest's compiles to the host's cross compilers through distcc
    #[arg(long)]
    pub distcc: bool,
    /// Leave the guest running afterwards; the next build of the target reuses it warm
    #[arg(long)]
    pub keep_vm: bool,
    /// Keep the binhost current: emerge --update --deep --newuse with the binpkg checks; only
    /// what changed is built [default atoms: the target's world]
    #[arg(long)]
    pub update: bool,
    #[command(flatten)]
    pub size: VmSizeArgs,
}

/// Guest sizes on the command line (settings `vm.cpus`, `vm.memory`).
#[derive(Debug, Args)]
pub struct VmSizeArgs {
    /// vCPUs of the guest [default: setting vm.cpus: every host core]
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// RAM of the guest, e.g. 8G or 4096M [default: setting vm.memory: half the host's RAM]
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CrossCommand {
    /// Cross-compile packages into the target's binhost
    Build(BuildCommonArgs),
}

#[derive(Debug, Args)]
pub struct BuildCommonArgs {
    #[command(flatten)]
    pub common: BuildCommon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Auto,
    Vm,
    Cross,
    Chroot,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub common: BuildCommon,
    /// How to build: in a guest, cross on the host, or in a qemu-user chroot
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
}

#[derive(Debug, Subcommand)]
pub enum RootfsCommand {
    /// Install packages from a binhost into an empty root and pack it
    Build(RootfsBuildArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RootfsFormat {
    TarZst,
    TarXz,
    Squashfs,
    Qcow2,
    Img,
    Oci,
}

#[derive(Debug, Args)]
pub struct RootfsBuildArgs {
    /// The target whose packages are installed (see `dbh targets`)
    #[arg(long, short)]
    pub target: String,
    /// Binhost URL or directory [default: the target's own binhost]
    #[arg(long)]
    pub binhost: Option<String>,
    /// An ebuild repository the profile comes from (named by its profiles/repo_name)
    #[arg(long = "repo", value_name = "PATH")]
    pub repos: Vec<PathBuf>,
    /// The Portage profile [default: the target's]
    #[arg(long, value_name = "REPO:PATH")]
    pub profile: Option<String>,
    /// Output file (the format follows its extension unless --format is given)
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum)]
    pub format: Option<RootfsFormat>,
    /// Add an ESP with a UKI (.qcow2/.img)
    #[arg(long)]
    pub bootable: bool,
    /// --bootable: the kernel [default: the newest in the root's /boot]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// --bootable: a ready initramfs [default: generated from --modules' root or the rootfs]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// --bootable: ROOT/lib/modules/<version> for a generated initramfs
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// --bootable: the kernel command line [default: root=LABEL=dbh-root console=<target console>]
    #[arg(long)]
    pub cmdline: Option<String>,
    /// --bootable: the systemd-stub [default: found for the target's EFI arch]
    #[arg(long, value_name = "PATH")]
    pub stub: Option<PathBuf>,
    /// Timestamp for every file [default: $SOURCE_DATE_EPOCH, else the newest BUILD_TIME installed]
    #[arg(long, value_name = "SECONDS")]
    pub source_date_epoch: Option<u64>,
    /// Print the packages that would be installed, and stop
    #[arg(long)]
    pub dry_run: bool,
    /// Packages and sets to install, with their runtime dependencies
    #[arg(required = true, value_name = "ATOM")]
    pub atoms: Vec<String>,
}

/// Parses the command line; on `--help`/`--version` or a usage error clap's text is printed and
/// the caller is told which it was (it decides the exit status).
pub fn parse() -> Result<Cli, Printed> {
    Cli::try_parse().map_err(|err| {
        let _ = err.print();
        if err.use_stderr() { Printed::UsageError } else { Printed::Info }
    })
}

/// What [`parse`] printed instead of returning a command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Printed {
    /// `--help`, `--version`: success.
    Info,
    /// The arguments are wrong.
    UsageError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}

//! Layered settings and the `$DBH_HOME` layout.
//!
//! Precedence (highest first): command-line flags, `DBH_*` environment variables, `./dbh.toml` (not as root),
//! the user's config (`$XDG_CONFIG_HOME/dbh/dbh.toml`), `/etc/dbh/dbh.toml`, built-in defaults.
//! Every resolved value remembers where it came from so that `dbh config show` can say so.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hint::Hint;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid TOML")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("settings file {path} has an unknown key `{key}`")]
    UnknownKey { path: PathBuf, key: String },
    #[error("setting `{key}` from {origin} has the wrong type: expected {expected}")]
    Type { key: String, origin: Origin, expected: &'static str },
    #[error("setting `{key}` from {origin} is {value}, out of range: expected {expected}")]
    Range { key: String, origin: Origin, value: i64, expected: &'static str },
    #[error("cannot find a home directory for dbh's state")]
    NoHome,
}

impl Hint for SettingsError {
    fn hint(&self) -> Option<String> {
        match self {
            SettingsError::UnknownKey { .. } => Some(format!(
                "known keys are: {}",
                KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            )),
            SettingsError::NoHome => Some("pass --home DIR or set DBH_HOME".into()),
            _ => None,
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Cli(&'static str),
    Env(String),
    File(PathBuf),
    /// Derived from this host (the text says from what).
    Host(String),
    Default,
}

impl Origin {
    /// Precedence of the layer a value came from, higher wins.
    fn rank(&self) -> u8 {
        match self {
            Origin::Cli(_) => 3,
            Origin::Env(_) => 2,
            Origin::File(_) => 1,
            Origin::Host(_) | Origin::Default => 0,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Cli(flag) => write!(f, "command line ({flag})"),
            Origin::Env(var) => write!(f, "environment ({var})"),
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Host(why) => write!(f, "this host ({why})"),
            Origin::Default => write!(f, "built-in default"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    List,
    Bool,
    Int,
    /// A size: "8G", "512M", "64GiB"; a bare number is MiB.
    Size,
}

struct KeyDef {
    name: &'static str,
    kind: Kind,
    doc: &'static str,
}

/// Every key dbh understands, with its meaning; files with other keys are refused.
const KEYS: &[KeyDef] = &[
    KeyDef { name: "home", kind: Kind::Str, doc: "state directory (binhosts, images, keys, logs)" },
    KeyDef { name: "serve.dir", kind: Kind::Str, doc: "directory whose <target>/ subdirectories are served" },
    KeyDef { name: "serve.listen", kind: Kind::List, doc: "addresses `dbh serve` listens on" },
    KeyDef { name: "serve.public_url", kind: Kind::Str, doc: "base URL written into served binrepos.conf" },
    KeyDef { name: "serve.header_timeout", kind: Kind::Int, doc: "seconds a client may take to send a request head" },
    KeyDef { name: "serve.max_connections", kind: Kind::Int, doc: "connections `dbh serve` handles at once" },
    KeyDef { name: "serve.max_per_ip", kind: Kind::Int, doc: "connections one client address may hold in `dbh serve`" },
    KeyDef { name: "binhost.priority", kind: Kind::Int, doc: "priority in generated binrepos.conf stanzas" },
    KeyDef { name: "binhost.log_max_age_days", kind: Kind::Int, doc: "`dbh binhost prune` deletes files in logs/<target>/ older than this many days [default: 30]" },
    KeyDef { name: "build.jobs", kind: Kind::Int, doc: "parallel jobs for builds (MAKEOPTS -j)" },
    KeyDef { name: "build.distcc", kind: Kind::Bool, doc: "offload guest compiles to the host's distccd" },
    KeyDef { name: "build.gentoo_binhost", kind: Kind::Bool, doc: "keep the image's own binhosts (a stage3's gentoobinhost.conf) in vm builds" },
    KeyDef { name: "distcc.hosts", kind: Kind::List, doc: "extra distcc hosts for builds" },
    KeyDef { name: "distcc.distccd", kind: Kind::Str, doc: "the distccd program dbh starts on this host for guest builds [default: distccd on PATH]" },
    KeyDef { name: "vm.boot_timeout", kind: Kind::Int, doc: "seconds a guest may take to answer SSH [default: 300 under TCG, 120 under KVM]" },
    KeyDef { name: "vm.powerdown_timeout", kind: Kind::Int, doc: "seconds `dbh vm stop` waits for an ACPI power-off before quitting QEMU [default: 20]" },
    KeyDef { name: "vm.cpus", kind: Kind::Int, doc: "vCPUs of build guests; per target as [vm.<target>] cpus = N [default: every host core, capped by the machine]" },
    KeyDef { name: "vm.memory", kind: Kind::Size, doc: "RAM of build guests (8G, 4096M); per target as [vm.<target>] memory [default: half the host's RAM]" },
    KeyDef { name: "vm.disk_size", kind: Kind::Size, doc: "root filesystem size `vm image create` makes; per target as [vm.<target>] disk_size [default: the stage + 25 % + 4 GiB]" },
    KeyDef { name: "vm.scratch_size", kind: Kind::Size, doc: "sparse scratch disk for PORTAGE_TMPDIR per build (gcc, llvm); per target as [vm.<target>] scratch_size; 0 = none" },
    KeyDef { name: "portage.emerge", kind: Kind::Str, doc: "the emerge dbh runs on this host: `rootfs build`, the plan before a vm build, egencache beside it, `client explain` (a path, or a name looked up in PATH)" },
    KeyDef { name: "key.uid", kind: Kind::Str, doc: "user id of a newly generated signing key" },
];

/// One resolved value and its origin.
#[derive(Debug, Clone)]
pub struct Value {
    pub value: toml::Value,
    pub origin: Origin,
}

/// The resolved settings: one typed section per key prefix, checked once when they are loaded, so
/// no caller looks a key up by name, repeats a default or clamps a value.
#[derive(Debug, Clone)]
pub struct Settings {
    /// By key; per-target keys (`vm.<target>.cpus`) are stored under their full name. Kept for
    /// `dbh config show` (value and origin of every key) and the per-target guest sizes.
    values: BTreeMap<String, Value>,
    home: Home,
    pub serve: ServeSettings,
    pub binhost: BinhostSettings,
    pub build: BuildSettings,
    pub distcc: DistccSettings,
    pub vm: VmSettings,
    pub portage: PortageSettings,
    pub key: KeySettings,
}

/// `serve.*`: what `dbh serve` serves, where, and its limits.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub dir: PathBuf,
    pub listen: Vec<String>,
    pub public_url: Option<String>,
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_per_ip: usize,
}

/// `binhost.*`.
#[derive(Debug, Clone)]
pub struct BinhostSettings {
    /// Priority in generated binrepos.conf stanzas.
    pub priority: i64,
    /// `dbh binhost prune` deletes build logs older than this.
    pub log_max_age: Duration,
}

/// `build.*`: what every backend's build gets.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// Parallel jobs, 1 to [`MAX_JOBS`].
    pub jobs: u32,
    pub distcc: bool,
    pub gentoo_binhost: bool,
}

/// `distcc.*`.
#[derive(Debug, Clone)]
pub struct DistccSettings {
    pub hosts: Vec<String>,
    /// `None`: `distccd` on PATH.
    pub distccd: Option<PathBuf>,
}

/// `vm.*` apart from the per-target sizes ([`Settings::vm_sizing`]).
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// `None`: the runner's default for the accelerator (longer under TCG).
    pub boot_timeout: Option<Duration>,
    pub powerdown_timeout: Duration,
}

/// `portage.*`.
#[derive(Debug, Clone)]
pub struct PortageSettings {
    /// The host's emerge: a path, or a name looked up in PATH.
    pub emerge: PathBuf,
}

/// `key.*`.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// User id of a newly generated signing key.
    pub uid: String,
}

/// The most parallel jobs `build.jobs` accepts: more is a typo, not a machine.
pub const MAX_JOBS: u32 = 1024;

/// `vm.powerdown_timeout` when unset.
pub const DEFAULT_POWERDOWN: Duration = Duration::from_secs(20);

/// The `vm.*` keys that may also be given per target, as `vm.<target>.<key>`.
const PER_TARGET: &[&str] = &["cpus", "memory", "disk_size", "scratch_size"];

/// Default scratch disk: room for gcc's or llvm's build tree; sparse, so it costs what is used.
pub const DEFAULT_SCRATCH_BYTES: u64 = 64 << 30;

/// `vm.<target>.<key>` → the definition of `vm.<key>`.
fn per_target_def(key: &str) -> Option<&'static KeyDef> {
    let rest = key.strip_prefix("vm.")?;
    let (target, k) = rest.rsplit_once('.')?;
    if target.is_empty() || !PER_TARGET.contains(&k) {
        return None;
    }
    KEYS.iter().find(|d| d.name.strip_prefix("vm.") == Some(k))
}

/// Parses a size setting: "8G", "512M", "64GiB", "1T"; a bare number is MiB.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B').to_ascii_uppercase().as_str() {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

fn size_of(value: &toml::Value) -> Option<u64> {
    match value {
        toml::Value::Integer(i) => u64::try_from(*i).ok().and_then(|i| i.checked_mul(1 << 20)),
        toml::Value::String(s) => parse_size(s),
        _ => None,
    }
}

/// What a target's guests get, each with where it came from.
#[derive(Debug, Clone)]
pub struct VmSizing {
    pub cpus: (u32, Origin),
    pub memory_mib: (u32, Origin),
    /// `None`: sized from the stage.
    pub disk_bytes: (Option<u64>, Origin),
    /// `None`: no scratch disk.
    pub scratch_bytes: (Option<u64>, Origin),
}

/// The host's RAM in MiB (`MemTotal` of /proc/meminfo).
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib >> 10)
}

/// Values given on the command line, by key.
pub type CliValues = Vec<(&'static str, &'static str, toml::Value)>;

impl Settings {
    /// Resolves every layer. `cli` holds (key, flag, value) for flags the user passed.
    pub fn load(cli: CliValues) -> Result<Settings, SettingsError> {
        let mut files = vec![PathBuf::from("/etc/dbh/dbh.toml")];
        if let Some(dir) = config_dir() {
            files.push(dir.join("dbh.toml"));
        }
        // Not as root: ./dbh.toml belongs to whoever owns the working directory, and settings
        // name programs dbh runs (portage.emerge, ...). Root reads /etc/dbh and its own config.
        if !nix::unistd::geteuid().is_root() {
            files.push(PathBuf::from("dbh.toml"));
        }
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(cli, &files, &env)
    }

    /// Like [`Settings::load`] with explicit files (lowest precedence first) and environment.
    pub fn load_from(
        cli: CliValues,
        files: &[PathBuf],
        env: &[(String, String)],
    ) -> Result<Settings, SettingsError> {
        let mut values: BTreeMap<String, Value> = BTreeMap::new();
        for path in files {
            let text = match fs_err::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(SettingsError::Read { path: path.clone(), source }),
            };
            let table: toml::Table = text
                .parse()
                .map_err(|source| SettingsError::Parse { path: path.clone(), source })?;
            let mut flat = Vec::new();
            flatten("", &toml::Value::Table(table), &mut flat);
            for (key, value) in flat {
                let def = KEYS
                    .iter()
                    .find(|k| k.name == key)
                    .or_else(|| per_target_def(&key))
                    .ok_or_else(|| SettingsError::UnknownKey { path: path.clone(), key: key.clone() })?;
                let origin = Origin::File(absolute(path));
                check_kind(def, &value, &origin)?;
                let origin = Origin::File(absolute(path));
                values.insert(key, Value { value, origin });
            }
        }
        for def in KEYS {
            let var = env_name(def.name);
            if let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) {
                let origin = Origin::Env(var.clone());
                let value = parse_env(def, raw, &origin)?;
                values.insert(def.name.to_owned(), Value { value, origin });
            }
        }
        for (key, flag, value) in cli {
            let def = KEYS.iter().find(|k| k.name == key).expect("CLI passes known keys");
            values.insert(def.name.to_owned(), Value { value, origin: Origin::Cli(flag) });
        }
        let mut raw = Raw { values };
        raw.fill_defaults()?;
        raw.resolve()
    }

    /// The per-target value of `vm.<key>` (`vm.<target>.<key>`) or the global one, whichever comes
    /// from the higher layer; at the same layer the per-target one wins.
    fn for_target(&self, target: &str, key: &str) -> Option<&Value> {
        let global = self.values.get(&format!("vm.{key}"));
        let own = self.values.get(&format!("vm.{target}.{key}"));
        match (own, global) {
            (Some(o), Some(g)) if g.origin.rank() > o.origin.rank() => Some(g),
            (Some(o), _) => Some(o),
            (None, g) => g,
        }
    }
}

/// Every layer merged, before the typed sections are checked.
struct Raw {
    values: BTreeMap<String, Value>,
}

impl Raw {
    fn fill_defaults(&mut self) -> Result<(), SettingsError> {
        if !self.values.contains_key("home") {
            let home = default_home().ok_or(SettingsError::NoHome)?;
            self.default("home", toml::Value::String(home.display().to_string()));
        }
        let home = PathBuf::from(self.str("home").expect("home was just set"));
        self.default("serve.dir", toml::Value::String(home.join("binhost").display().to_string()));
        self.default("serve.listen", toml::Value::Array(vec!["127.0.0.1:8080".into()]));
        self.default("serve.header_timeout", toml::Value::Integer(10));
        self.default("serve.max_connections", toml::Value::Integer(4096));
        self.default("serve.max_per_ip", toml::Value::Integer(1024));
        self.default("binhost.priority", toml::Value::Integer(10));
        let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.default("build.jobs", toml::Value::Integer(jobs as i64));
        self.default("build.distcc", toml::Value::Boolean(false));
        self.default("build.gentoo_binhost", toml::Value::Boolean(false));
        self.default("portage.emerge", toml::Value::String("emerge".into()));
        self.default("distcc.hosts", toml::Value::Array(vec![]));
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        self.default("key.uid", toml::Value::String(format!("dbh binhost signing key <dbh@{host}>")));
        self.values.entry("vm.cpus".into()).or_insert(Value {
            value: toml::Value::Integer(jobs as i64),
            origin: Origin::Host(format!("all {jobs} cores")),
        });
        let (memory, why) = match host_memory_mib() {
            // Half, in 256 MiB steps, at least 1 GiB: the host keeps room for itself and dbh.
            Some(total) => (((total / 2) >> 8 << 8).max(1024), format!("half of {total} MiB RAM")),
            None => (2048, "no /proc/meminfo: 2 GiB".to_owned()),
        };
        self.values
            .entry("vm.memory".into())
            .or_insert(Value { value: toml::Value::String(format!("{memory}M")), origin: Origin::Host(why) });
        self.default("vm.scratch_size", toml::Value::String(format!("{}G", DEFAULT_SCRATCH_BYTES >> 30)));
        Ok(())
    }

    fn default(&mut self, key: &'static str, value: toml::Value) {
        self.values.entry(key.to_owned()).or_insert(Value { value, origin: Origin::Default });
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.value.as_str())
    }

    fn list(&self, key: &str) -> Vec<String> {
        match self.get(key).map(|v| &v.value) {
            Some(toml::Value::Array(items)) => {
                items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect()
            }
            _ => Vec::new(),
        }
    }

    fn bool(&self, key: &str) -> bool {
        self.get(key).and_then(|v| v.value.as_bool()).unwrap_or(false)
    }

    /// An integer setting within `range`, or `None` when unset; out of range is an error naming
    /// the key and where the value came from.
    fn int_in(&self, key: &str, range: std::ops::RangeInclusive<i64>, expected: &'static str) -> Result<Option<i64>, SettingsError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.value.as_integer() {
                Some(i) if range.contains(&i) => Ok(Some(i)),
                Some(value) => Err(SettingsError::Range { key: key.to_owned(), origin: v.origin.clone(), value, expected }),
                None => Err(SettingsError::Type { key: key.to_owned(), origin: v.origin.clone(), expected }),
            },
        }
    }

    fn seconds(&self, key: &str) -> Result<Option<Duration>, SettingsError> {
        Ok(self.int_in(key, 1..=i64::from(u32::MAX), "a positive number of seconds")?.map(|s| Duration::from_secs(s as u64)))
    }

    fn count(&self, key: &str) -> Result<Option<usize>, SettingsError> {
        Ok(self.int_in(key, 1..=i64::from(u32::MAX), "a positive integer")?.map(|n| n as usize))
    }

    /// Every typed section, checked; the one place a default or a range is applied.
    fn resolve(self) -> Result<Settings, SettingsError> {
        let home = Home::new(self.str("home").expect("home always has a value"));
        let serve = ServeSettings {
            dir: PathBuf::from(self.str("serve.dir").expect("serve.dir has a built-in default")),
            listen: self.list("serve.listen"),
            public_url: self.str("serve.public_url").map(str::to_owned),
            header_timeout: self.seconds("serve.header_timeout")?.unwrap_or(Duration::from_secs(10)),
            max_connections: self.count("serve.max_connections")?.unwrap_or(4096),
            max_per_ip: self.count("serve.max_per_ip")?.unwrap_or(1024),
        };
        let binhost = BinhostSettings {
            priority: self.int_in("binhost.priority", i64::MIN..=i64::MAX, "an integer")?.unwrap_or(10),
            log_max_age: Duration::from_secs(
                self.int_in("binhost.log_max_age_days", 0..=100_000, "a number of days from 0 to 100000")?.unwrap_or(30) as u64 * 86_400,
            ),
        };
        let build = BuildSettings {
            jobs: self.int_in("build.jobs", 1..=i64::from(MAX_JOBS), "an integer from 1 to 1024")?.unwrap_or(1) as u32,
            distcc: self.bool("build.distcc"),
            gentoo_binhost: self.bool("build.gentoo_binhost"),
        };
        let distcc = DistccSettings {
            hosts: self.list("distcc.hosts"),
            distccd: self.str("distcc.distccd").map(PathBuf::from),
        };
        let vm = VmSettings {
            boot_timeout: self.seconds("vm.boot_timeout")?,
            powerdown_timeout: self
                .int_in("vm.powerdown_timeout", 0..=i64::from(u32::MAX), "a number of seconds")?
                .map_or(DEFAULT_POWERDOWN, |s| Duration::from_secs(s as u64)),
        };
        let portage = PortageSettings { emerge: PathBuf::from(self.str("portage.emerge").unwrap_or("emerge")) };
        let key = KeySettings { uid: self.str("key.uid").unwrap_or("dbh binhost signing key").to_owned() };
        let settings =
            Settings { values: self.values, home, serve, binhost, build, distcc, vm, portage, key };
        // The per-target sizes are checked now too, so a bad one fails every command the same way:
        // once per target that has any (each check reads all four keys), then the defaults.
        let targets: std::collections::BTreeSet<&str> = settings
            .values
            .keys()
            .filter_map(|k| k.strip_prefix("vm.").and_then(|r| r.rsplit_once('.')).map(|(t, _)| t))
            .collect();
        for target in targets.into_iter().chain([""]) {
            settings.vm_sizing(target)?;
        }
        Ok(settings)
    }
}

impl Settings {
    /// The guest sizes for `target` (settings `vm.cpus`, `vm.memory`, `vm.disk_size`,
    /// `vm.scratch_size`, each also per target).
    pub fn vm_sizing(&self, target: &str) -> Result<VmSizing, SettingsError> {
        let size = |key: &str| -> Result<(Option<u64>, Origin), SettingsError> {
            match self.for_target(target, key) {
                None => Ok((None, Origin::Default)),
                Some(v) => match size_of(&v.value) {
                    Some(b) => Ok((Some(b), v.origin.clone())),
                    None => Err(SettingsError::Type {
                        key: format!("vm.{key}"),
                        origin: v.origin.clone(),
                        expected: "a size such as 8G or 4096M",
                    }),
                },
            }
        };
        let cpus = match self.for_target(target, "cpus") {
            Some(v) => match v.value.as_integer().and_then(|i| u32::try_from(i).ok()).filter(|&i| i > 0) {
                Some(n) => (n, v.origin.clone()),
                None => return Err(SettingsError::Type { key: "vm.cpus".into(), origin: v.origin.clone(), expected: "a positive integer" }),
            },
            None => (1, Origin::Default),
        };
        let (memory, memory_origin) = size("memory")?;
        let memory_mib = u32::try_from(memory.unwrap_or(2 << 30) >> 20).unwrap_or(u32::MAX).max(128);
        let (scratch, scratch_origin) = size("scratch_size")?;
        Ok(VmSizing {
            cpus,
            memory_mib: (memory_mib, memory_origin),
            disk_bytes: size("disk_size")?,
            scratch_bytes: (scratch.filter(|&b| b > 0), scratch_origin),
        })
    }

    pub fn home(&self) -> Home {
        self.home.clone()
    }

    /// The resolved value and origin of `key` (for `dbh config show` and tests).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// Every key with its value, origin and meaning, for `dbh config show`.
    pub fn describe(&self) -> Vec<(String, String, &Origin, &'static str)> {
        let mut out: Vec<_> = KEYS
            .iter()
            .filter_map(|def| {
                let v = self.values.get(def.name)?;
                Some((def.name.to_owned(), v.value.to_string(), &v.origin, def.doc))
            })
            .collect();
        for (key, v) in &self.values {
            if let Some(def) = per_target_def(key) {
                out.push((key.clone(), v.value.to_string(), &v.origin, def.doc));
            }
        }
        out
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

fn check_kind(def: &KeyDef, value: &toml::Value, origin: &Origin) -> Result<(), SettingsError> {
    let (ok, expected) = match def.kind {
        Kind::Str => (value.is_str(), "a string"),
        Kind::List => {
            (value.as_array().is_some_and(|a| a.iter().all(|i| i.is_str())), "a list of strings")
        }
        Kind::Bool => (value.is_bool(), "true or false"),
        Kind::Int => (value.is_integer(), "an integer"),
        Kind::Size => (size_of(value).is_some(), "a size such as 8G or 4096M (a bare number is MiB)"),
    };
    if ok {
        Ok(())
    } else {
        Err(SettingsError::Type { key: def.name.into(), origin: origin.clone(), expected })
    }
}

fn parse_env(def: &KeyDef, raw: &str, origin: &Origin) -> Result<toml::Value, SettingsError> {
    let err = |expected| SettingsError::Type { key: def.name.into(), origin: origin.clone(), expected };
    Ok(match def.kind {
        Kind::Str => toml::Value::String(raw.to_string()),
        Kind::List => toml::Value::Array(
            raw.split([',', ' ']).filter(|s| !s.is_empty()).map(|s| s.to_string().into()).collect(),
        ),
        Kind::Bool => match raw {
            "1" | "true" | "yes" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "" => toml::Value::Boolean(false),
            _ => return Err(err("true or false")),
        },
        Kind::Int => toml::Value::Integer(raw.parse().map_err(|_| err("an integer"))?),
        Kind::Size => {
            parse_size(raw).ok_or_else(|| err("a size such as 8G or 4096M (a bare number is MiB)"))?;
            toml::Value::String(raw.to_string())
        }
    })
}

/// `serve.public_url` → `DBH_SERVE_PUBLIC_URL`.
fn env_name(key: &str) -> String {
    format!("DBH_{}", key.replace('.', "_").to_ascii_uppercase())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn config_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("dbh"))
}

/// `/var/lib/dbh` as root, else `$XDG_DATA_HOME/dbh` (`~/.local/share/dbh`).
fn default_home() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from("/var/lib/dbh"));
    }
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("dbh"))
}

/// The layout of `$DBH_HOME` (docs/architecture.md, "Storage").
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The PKGDIR that is served for a target.
    pub fn binhost(&self, target: &str) -> PathBuf {
        self.root.join("binhost").join(target)
    }
    pub fn images(&self, target: &str) -> PathBuf {
        self.root.join("images").join(target)
    }
    pub fn logs(&self, target: &str) -> PathBuf {
        self.root.join("logs").join(target)
    }
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// Portage's DISTDIR for every target and backend: a source tarball is downloaded once.
    pub fn distfiles(&self) -> PathBuf {
        self.root.join("distfiles")
    }
    /// The per-target Portage configuration synced into builders.
    pub fn target_config(&self, target: &str) -> PathBuf {
        self.root.join("targets").join(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn precedence_cli_env_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let low = write(dir.path(), "etc.toml", "home = \"/etc-home\"\n[serve]\nlisten = [\"0.0.0.0:1\"]\npublic_url = \"http://a/\"\n");
        let high = write(dir.path(), "user.toml", "[serve]\nlisten = [\"[::1]:2\"]\n");
        let env = vec![("DBH_SERVE_PUBLIC_URL".to_string(), "http://env/".to_string())];
        let cli = vec![("home", "--home", toml::Value::String("/cli-home".into()))];
        let s = Settings::load_from(cli, &[low.clone(), high.clone()], &env).unwrap();
        assert_eq!(s.home().root(), Path::new("/cli-home"));
        assert_eq!(s.get("home").unwrap().origin, Origin::Cli("--home"));
        assert_eq!(s.serve.listen, vec!["[::1]:2"]);
        assert_eq!(s.get("serve.listen").unwrap().origin, Origin::File(high));
        assert_eq!(s.serve.public_url.as_deref(), Some("http://env/"));
        assert_eq!(s.serve.dir, Path::new("/cli-home/binhost"));
        assert_eq!(s.get("serve.dir").unwrap().origin, Origin::Default);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "dbh.toml", "[serve]\nlisen = []\n");
        let err = Settings::load_from(vec![], std::slice::from_ref(&f), &[]).unwrap_err();
        assert_eq!(err.to_string(), format!("settings file {} has an unknown key `serve.lisen`", f.display()));
        assert!(err.hint().unwrap().contains("serve.listen"));
    }

    #[test]
    fn vm_sizes_per_target_and_from_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "dbh.toml", "[vm]\nmemory = \"3G\"\n[vm.arm64]\ncpus = 6\nscratch_size = \"100G\"\n");
        let env = vec![("DBH_VM_MEMORY".to_string(), "5000M".to_string())];
        let s = Settings::load_from(vec![], std::slice::from_ref(&f), &env).unwrap();
        let arm = s.vm_sizing("arm64").unwrap();
        assert_eq!(arm.cpus, (6, Origin::File(f.clone())));
        assert_eq!(arm.memory_mib, (5000, Origin::Env("DBH_VM_MEMORY".into())), "env beats the file");
        assert_eq!(arm.scratch_bytes.0, Some(100 << 30));
        let amd = s.vm_sizing("amd64").unwrap();
        assert!(matches!(amd.cpus.1, Origin::Host(ref why) if why.contains("cores")), "{:?}", amd.cpus);
        assert_eq!(amd.scratch_bytes, (Some(DEFAULT_SCRATCH_BYTES), Origin::Default));
        assert_eq!(amd.disk_bytes.0, None);
        let shown: Vec<String> = s.describe().into_iter().map(|(k, v, o, _)| format!("{k} = {v} ({o})")).collect();
        assert!(shown.iter().any(|l| l.starts_with("vm.arm64.cpus = 6 (")), "{shown:?}");
        assert!(shown.iter().any(|l| l.starts_with("vm.cpus = ") && l.contains("this host (all")), "{shown:?}");
        // Without settings, half the host's RAM.
        let d = Settings::load_from(vec![], &[], &[]).unwrap().vm_sizing("riscv64").unwrap();
        assert!(matches!(d.memory_mib.1, Origin::Host(ref why) if why.starts_with("half of")), "{:?}", d.memory_mib);
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("64GiB"), Some(64 << 30));
        assert_eq!(parse_size("512"), Some(512 << 20));
        assert_eq!(parse_size("lots"), None);
        let bad = write(dir.path(), "bad.toml", "[vm.arm64]\nmemory = \"lots\"\n");
        let err = Settings::load_from(vec![], &[bad], &[]).unwrap_err();
        assert!(err.to_string().contains("expected a size"), "{err}");
        let bad = write(dir.path(), "bad2.toml", "[vm.arm64]\nmemroy = 1\n");
        assert!(matches!(Settings::load_from(vec![], &[bad], &[]), Err(SettingsError::UnknownKey { .. })));
    }

    #[test]
    fn wrong_type_from_env_is_refused() {
        let env = vec![("DBH_BUILD_JOBS".to_string(), "many".to_string())];
        let err = Settings::load_from(vec![], &[], &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `build.jobs` from environment (DBH_BUILD_JOBS) has the wrong type: expected an integer"
        );
    }

    #[test]
    fn typed_sections_carry_defaults_and_refuse_out_of_range_values() {
        let d = Settings::load_from(vec![], &[], &[]).unwrap();
        assert_eq!(d.serve.header_timeout, Duration::from_secs(10));
        assert_eq!((d.serve.max_connections, d.serve.max_per_ip), (4096, 1024));
        assert_eq!(d.binhost.priority, 10);
        assert_eq!(d.binhost.log_max_age, Duration::from_secs(30 * 86_400));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        assert_eq!(d.build.jobs, cores);
        assert!(!d.build.distcc && !d.build.gentoo_binhost);
        assert_eq!(d.vm.powerdown_timeout, DEFAULT_POWERDOWN);
        assert_eq!(d.vm.boot_timeout, None);
        assert_eq!(d.portage.emerge, Path::new("emerge"));
        assert!(d.key.uid.starts_with("dbh binhost signing key <dbh@"), "{}", d.key.uid);

        // A flag is the highest layer and keeps its origin.
        let cli = vec![("build.jobs", "--jobs", toml::Value::Integer(3))];
        let env = vec![("DBH_BUILD_JOBS".to_string(), "7".to_string())];
        let s = Settings::load_from(cli, &[], &env).unwrap();
        assert_eq!(s.build.jobs, 3);
        assert_eq!(s.get("build.jobs").unwrap().origin, Origin::Cli("--jobs"));

        for (var, raw, key, expected) in [
            ("DBH_BUILD_JOBS", "0", "build.jobs", "an integer from 1 to 1024"),
            ("DBH_BUILD_JOBS", "5000", "build.jobs", "an integer from 1 to 1024"),
            ("DBH_SERVE_HEADER_TIMEOUT", "0", "serve.header_timeout", "a positive number of seconds"),
            ("DBH_SERVE_MAX_PER_IP", "-1", "serve.max_per_ip", "a positive integer"),
            ("DBH_VM_POWERDOWN_TIMEOUT", "-5", "vm.powerdown_timeout", "a number of seconds"),
        ] {
            let env = vec![(var.to_string(), raw.to_string())];
            let err = Settings::load_from(vec![], &[], &env).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("setting `{key}` from environment ({var}) is {raw}, out of range: expected {expected}"),
                "{var}={raw}"
            );
        }
        // `--jobs 0` is refused naming the flag, not silently clamped.
        let cli = vec![("build.jobs", "--jobs", toml::Value::Integer(0))];
        let err = Settings::load_from(cli, &[], &[]).unwrap_err();
        assert!(err.to_string().contains("from command line (--jobs)"), "{err}");
        // A bad per-target size fails at load, whichever command runs.
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "dbh.toml", "[vm.riscv64]\ncpus = 0\n");
        let err = Settings::load_from(vec![], &[f], &[]).unwrap_err();
        assert!(err.to_string().contains("`vm.cpus`") && err.to_string().contains("positive"), "{err}");
    }
}

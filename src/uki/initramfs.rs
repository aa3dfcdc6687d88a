//! The initramfs dbh puts into a guest's UKI: a deterministic cpio (newc) archive, gzip- or
//! zstd-compressed, holding the kernel modules needed to reach the root disk and a small `/init`
//! that loads them, waits for `root=LABEL=…`/`UUID=…`/a device, mounts it and `switch_root`s.
//!
//! Tools come from the stage itself, never from the host (they must run on the target's CPU):
//! - [`Tools::Busybox`]: the stage's busybox (Gentoo stage3s and the Debian test stages have one);
//!   an applet it lacks is taken from the stage's own tools instead;
//! - [`Tools::Stage`]: the stage's shell, kmod `insmod`, util-linux `mount`/`switch_root`/`findfs`,
//!   coreutils `sleep`;
//! - [`Tools::Auto`] (the default): busybox when the stage has one.
//!
//! Shared libraries are found by reading each copied ELF's `PT_INTERP` and `DT_NEEDED` (see [`elf`])
//! and resolving them in the stage's library directories (`/lib`, `/usr/lib`, `/lib64`, `/usr/lib64`
//! and multiarch `…/<triplet>`), recursively: the minimal set, not whole lib dirs. Every symlink met
//! on the way (merged-/usr `/lib -> usr/lib`, `insmod -> kmod`) is recreated, so the dynamic loader
//! finds the libraries under the same names as in the stage.
//!
//! Modules: `modules.dep` when the stage has one; otherwise (Debian packages unpacked without their
//! postinst, or a kernel tree never `depmod`ed) each module's own `.modinfo` `depends=`. `pre:`
//! softdeps are followed when they resolve. Modules listed in `modules.builtin` are skipped.
//! `.ko.xz`/`.ko.zst`/`.ko.gz` are decompressed to `.ko`, since busybox `insmod` may not read them.
//! Everything dbh adds lives under `/dbh/` in the archive (`/dbh/bin`, `/dbh/modules`), so it cannot
//! collide with a merged-/usr symlink such as `/lib`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::hint::Hint;
use crate::uki::elf::Elf;

/// How long `/init` waits for the root device (150 polls of 0.2 s).
pub const ROOT_WAIT_SECS: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("the stage {root} has no `{tool}` for the initramfs (looked in /bin, /sbin, /usr/bin, /usr/sbin)")]
    MissingTool { root: PathBuf, tool: String },
    #[error("`{needed_by}` in {root} needs the library `{library}`, which is not in the stage's library directories")]
    MissingLibrary { root: PathBuf, library: String, needed_by: String },
    #[error("kernel module `{module}` is neither in {dir} nor built into the kernel (modules.builtin)")]
    MissingModule { dir: PathBuf, module: String },
    #[error("the stage {root} has no busybox, but the busybox initramfs was asked for")]
    NoBusybox { root: PathBuf },
    /// File IO through fs-err, whose error names the file and what was done to it.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot decompress kernel module {path}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot compress the initramfs")]
    Compress(#[source] std::io::Error),
    #[error("symlinks loop while resolving {path} in {root}")]
    SymlinkLoop { root: PathBuf, path: String },
}

impl Hint for InitramfsError {
    fn hint(&self) -> Option<String> {
        match self {
            InitramfsError::MissingModule { .. } => Some(
                "pass the kernel's own modules with --modules (lib/modules/<version>), or a kernel with virtio and ext4 built in"
                    .into(),
            ),
            InitramfsError::MissingTool { .. } | InitramfsError::NoBusybox { .. } => Some(
                "the stage needs busybox, or a shell, kmod, util-linux (mount, switch_root, findfs) and coreutils".into(),
            ),
            _ => None,
        }
    }
}

/// Where the initramfs's tools come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tools {
    #[default]
    Auto,
    Busybox,
    Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
    None,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// The root whose tools and libraries go in (the unpacked stage).
    pub root: &'a Path,
    /// The kernel's module directory (`lib/modules/<version>`); `None` for a kernel without modules.
    pub modules_dir: Option<&'a Path>,
    /// Modules to load, in the target's order; their dependencies are loaded first.
    pub modules: &'a [String],
    pub tools: Tools,
    pub compression: Compression,
}

/// A built initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The compressed archive.
    pub data: Vec<u8>,
    /// The modules `/init` loads, in load order.
    pub load_order: Vec<String>,
    /// True when busybox supplies the tools.
    pub busybox: bool,
    /// Every path in the archive (without leading `/`), sorted.
    pub paths: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// cpio newc

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// A deterministic cpio "newc" archive: members sorted by path, uid/gid 0, mtime 0, inode numbers
/// in path order, parents created implicitly with mode 0755.
#[derive(Debug, Default, Clone)]
pub struct Cpio {
    entries: BTreeMap<String, Entry>,
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    fn add_parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert(Entry::Dir { mode: 0o755 });
        }
    }

    /// Adds (or replaces) a member; `path` is relative (leading `/` removed).
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_owned();
        self.add_parents(&path);
        self.entries.insert(path, entry);
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    pub fn paths(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// The uncompressed archive.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir { mode } => (0o040000 | mode, &[]),
                Entry::File { mode, data } => (0o100000 | mode, data),
                Entry::Symlink { target } => (0o120777, target.as_bytes()),
            };
            let nlink = if matches!(entry, Entry::Dir { .. }) { 2 } else { 1 };
            write_member(&mut out, ino as u32 + 1, mode, nlink, path, data);
        }
        write_member(&mut out, 0, 0, 1, "TRAILER!!!", &[]);
        // The kernel reads in 512-byte blocks happily either way; pad like cpio(1) does.
        while !out.len().is_multiple_of(512) {
            out.push(0);
        }
        out
    }

    /// Parses an uncompressed newc archive (for tests and `dbh` self-checks).
    pub fn parse(mut data: &[u8]) -> Result<Cpio, String> {
        let mut cpio = Cpio::new();
        let mut consumed = 0usize;
        loop {
            if data.len() < 110 {
                return Err(format!("truncated header at byte {consumed}"));
            }
            if &data[..6] != b"070701" {
                return Err(format!("bad magic at byte {consumed}"));
            }
            let field = |i: usize| -> Result<u32, String> {
                let s = std::str::from_utf8(&data[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
                u32::from_str_radix(s, 16).map_err(|e| e.to_string())
            };
            let mode = field(1)?;
            let (uid, gid, mtime) = (field(2)?, field(3)?, field(5)?);
            if uid != 0 || gid != 0 || mtime != 0 {
                return Err(format!("member at byte {consumed} is not uid/gid 0 and mtime 0"));
            }
            let filesize = field(6)? as usize;
            let namesize = field(11)? as usize;
            let name_end = 110 + namesize;
            let name = std::str::from_utf8(data.get(110..name_end - 1).ok_or("truncated name")?)
                .map_err(|e| e.to_string())?
                .to_owned();
            let data_start = name_end.div_ceil(4) * 4;
            let body = data.get(data_start..data_start + filesize).ok_or("truncated data")?.to_vec();
            let next = (data_start + filesize).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
            let entry = match mode & 0o170000 {
                0o040000 => Entry::Dir { mode: mode & 0o7777 },
                0o100000 => Entry::File { mode: mode & 0o7777, data: body },
                0o120000 => Entry::Symlink { target: String::from_utf8_lossy(&body).into_owned() },
                other => return Err(format!("unexpected file type {other:o} for {name}")),
            };
            cpio.entries.insert(name, entry);
            consumed += next;
            data = data.get(next..).ok_or("truncated member")?;
        }
        Ok(cpio)
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_start_matches('/'))
    }
}

fn write_member(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8]) {
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        dmaj = 0,
        dmin = 0,
        rmaj = 0,
        rmin = 0,
        namesize = name.len() + 1,
        check = 0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

pub fn compress(data: &[u8], compression: Compression) -> Result<Vec<u8>, InitramfsError> {
    match compression {
        Compression::None => Ok(data.to_vec()),
        Compression::Gzip => {
            // flate2 writes mtime 0 and no file name: deterministic.
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            enc.write_all(data).map_err(InitramfsError::Compress)?;
            enc.finish().map_err(InitramfsError::Compress)
        }
        Compression::Zstd => zstd::stream::encode_all(data, 9).map_err(InitramfsError::Compress),
    }
}

/// Undoes [`compress`] (by magic), for tests and inspection.
pub fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        out = zstd::stream::decode_all(data)?;
    } else {
        out = data.to_vec();
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Files from a foreign root

/// Resolves `path` inside `root` like the kernel would with `root` as `/`, following symlinks;
/// returns the canonical in-root path (no leading `/`) and every symlink met (in-root path, target).
/// A canonical in-root path and the symlinks (in-root path, target) met on the way to it.
type Resolved = (String, Vec<(String, String)>);

fn resolve_in_root(root: &Path, path: &str) -> Result<Option<Resolved>, InitramfsError> {
    let mut links = Vec::new();
    let mut pending: Vec<String> = path.split('/').filter(|c| !c.is_empty()).map(str::to_owned).rev().collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let rel = if resolved.is_empty() { part.clone() } else { format!("{}/{}", resolved.join("/"), part) };
        let host = root.join(&rel);
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return Err(InitramfsError::SymlinkLoop { root: root.to_owned(), path: path.to_owned() });
            }
            let target = fs_err::read_link(&host)?;
            let target_s = target.to_string_lossy().into_owned();
            if !links.iter().any(|(l, _)| *l == rel) {
                links.push((rel, target_s.clone()));
            }
            if target.is_absolute() {
                resolved.clear();
            }
            for c in target_s.split('/').filter(|c| !c.is_empty()).rev() {
                pending.push(c.to_owned());
            }
        } else {
            resolved.push(part);
        }
    }
    Ok(Some((resolved.join("/"), links)))
}

/// A regular file at `path` inside `root`, symlinks resolved inside the root (`insmod -> /bin/kmod`
/// must not be looked up on the host).
fn is_file_in_root(root: &Path, path: &str) -> bool {
    matches!(resolve_in_root(root, path), Ok(Some((canonical, _))) if root.join(&canonical).is_file())
}

/// Copies files from the stage into the archive with their libraries.
struct Collector<'a> {
    root: &'a Path,
    cpio: Cpio,
    lib_dirs: Vec<String>,
    done: BTreeSet<String>,
}

impl<'a> Collector<'a> {
    fn new(root: &'a Path) -> Collector<'a> {
        let mut lib_dirs = Vec::new();
        for base in ["lib", "usr/lib", "lib64", "usr/lib64"] {
            if let Ok(entries) = std::fs::read_dir(root.join(base)) {
                let mut triplets: Vec<String> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("-linux-"))
                    .collect();
                triplets.sort();
                lib_dirs.extend(triplets.into_iter().map(|t| format!("{base}/{t}")));
            }
        }
        lib_dirs.extend(["lib64", "usr/lib64", "lib", "usr/lib"].map(String::from));
        Collector { root, cpio: Cpio::new(), lib_dirs, done: BTreeSet::new() }
    }

    /// Adds `path` (an absolute in-root path) with the symlinks leading to it; returns the
    /// canonical path, or None when it does not exist.
    fn add_path(&mut self, path: &str) -> Result<Option<String>, InitramfsError> {
        let Some((canonical, links)) = resolve_in_root(self.root, path)? else { return Ok(None) };
        for (link, target) in links {
            self.cpio.add(&link, Entry::Symlink { target });
        }
        if self.done.insert(canonical.clone()) {
            let host = self.root.join(&canonical);
            let data = fs_err::read(&host)?;
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &fs_err::metadata(&host)?.permissions(),
            ) & 0o7777;
            let deps = match Elf::parse(&data) {
                Some(elf) => {
                    let mut d: Vec<String> = elf.interpreter().into_iter().collect();
                    d.extend(elf.needed().into_iter().map(|n| format!("\0{n}")));
                    d
                }
                None => Vec::new(),
            };
            self.cpio.add(&canonical, Entry::File { mode, data });
            for dep in deps {
                if let Some(soname) = dep.strip_prefix('\0') {
                    self.add_library(soname, &canonical)?;
                } else if self.add_path(&dep)?.is_none() {
                    return Err(InitramfsError::MissingLibrary {
                        root: self.root.to_owned(),
                        library: dep,
                        needed_by: canonical.clone(),
                    });
                }
            }
        }
        Ok(Some(canonical))
    }

    fn add_library(&mut self, soname: &str, needed_by: &str) -> Result<(), InitramfsError> {
        for dir in self.lib_dirs.clone() {
            let candidate = format!("/{dir}/{soname}");
            if std::fs::symlink_metadata(self.root.join(candidate.trim_start_matches('/'))).is_ok()
                && self.add_path(&candidate)?.is_some()
            {
                return Ok(());
            }
        }
        Err(InitramfsError::MissingLibrary {
            root: self.root.to_owned(),
            library: soname.to_owned(),
            needed_by: needed_by.to_owned(),
        })
    }

    fn find_tool(&self, name: &str) -> Option<String> {
        ["usr/sbin", "usr/bin", "sbin", "bin"]
            .iter()
            .map(|d| format!("/{d}/{name}"))
            .find(|p| is_file_in_root(self.root, p))
    }
}

/// The tools `/init` calls, by the name it calls them.
const TOOLS: &[&str] = &["sh", "mount", "insmod", "switch_root", "findfs", "sleep"];

fn busybox_has(binary: &[u8], applet: &str) -> bool {
    let needle = format!("\0{applet}\0");
    binary.windows(needle.len()).any(|w| w == needle.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Kernel modules

#[derive(Debug, Clone)]
struct ModuleInfo {
    path: PathBuf,
    depends: Vec<String>,
    softdeps_pre: Vec<String>,
}

fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"].iter().find_map(|s| base.strip_suffix(s))?;
    Some(stem.replace('-', "_"))
}

fn read_module(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let raw = fs_err::read(path)?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let res = if name.ends_with(".xz") {
        xz2::read::XzDecoder::new(&raw[..]).read_to_end(&mut out).map(|_| ())
    } else if name.ends_with(".zst") {
        zstd::stream::decode_all(&raw[..]).map(|d| out = d)
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map(|_| ())
    } else {
        return Ok(raw);
    };
    res.map_err(|source| InitramfsError::Decompress { path: path.to_owned(), source })?;
    Ok(out)
}

fn modinfo(data: &[u8]) -> Vec<(String, String)> {
    let Some(elf) = Elf::parse(data) else { return Vec::new() };
    let Some(section) = elf.section(".modinfo") else { return Vec::new() };
    section
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn parse_softdep_pre(spec: &str) -> Vec<String> {
    // "pre: crc32c post: foo" -> [crc32c]
    let mut out = Vec::new();
    let mut in_pre = false;
    for word in spec.split_whitespace() {
        match word {
            "pre:" => in_pre = true,
            "post:" => in_pre = false,
            w if in_pre => out.push(w.replace('-', "_")),
            _ => {}
        }
    }
    out
}

/// The kernel's modules: name -> info, aliases, built-ins.
struct ModuleIndex {
    dir: PathBuf,
    modules: HashMap<String, ModuleInfo>,
    aliases: HashMap<String, String>,
    builtin: BTreeSet<String>,
    has_builtin_list: bool,
}

impl ModuleIndex {
    fn load(dir: &Path) -> Result<ModuleIndex, InitramfsError> {
        let mut modules = HashMap::new();
        let mut aliases = HashMap::new();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        if let Some(dep) = read("modules.dep") {
            for line in dep.lines() {
                let Some((file, deps)) = line.split_once(':') else { continue };
                let Some(name) = module_name(file) else { continue };
                let depends = deps.split_whitespace().filter_map(module_name).collect();
                modules.insert(name, ModuleInfo { path: dir.join(file), depends, softdeps_pre: Vec::new() });
            }
            if let Some(soft) = read("modules.softdep") {
                for line in soft.lines() {
                    let mut words = line.split_whitespace();
                    if words.next() != Some("softdep") {
                        continue;
                    }
                    let Some(name) = words.next().map(|n| n.replace('-', "_")) else { continue };
                    let rest: Vec<&str> = words.collect();
                    if let Some(m) = modules.get_mut(&name) {
                        m.softdeps_pre = parse_softdep_pre(&rest.join(" "));
                    }
                }
            }
            if let Some(alias) = read("modules.alias") {
                for line in alias.lines() {
                    let mut w = line.split_whitespace();
                    if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next())
                        && !a.contains('*')
                        && !a.contains(':')
                    {
                        aliases.entry(a.replace('-', "_")).or_insert_with(|| m.replace('-', "_"));
                    }
                }
            }
        } else {
            // No depmod output (Debian's postinst never ran): read each module's .modinfo.
            let mut stack = vec![dir.join("kernel")];
            let mut files = Vec::new();
            while let Some(d) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&d) else { continue };
                for e in entries.filter_map(Result::ok) {
                    let p = e.path();
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(p);
                    } else if module_name(&p.to_string_lossy()).is_some() {
                        files.push(p);
                    }
                }
            }
            files.sort();
            for path in files {
                let name = module_name(&path.to_string_lossy()).unwrap_or_default();
                modules.insert(name, ModuleInfo { path, depends: Vec::new(), softdeps_pre: Vec::new() });
            }
        }
        let builtin_text = read("modules.builtin");
        let builtin = builtin_text.as_deref().unwrap_or("").lines().filter_map(module_name).collect();
        Ok(ModuleIndex { dir: dir.to_owned(), modules, aliases, builtin, has_builtin_list: builtin_text.is_some() })
    }

    /// Fills `depends`/`softdeps_pre` of one module from its .modinfo when modules.dep was missing.
    fn info(&mut self, name: &str, from_modinfo: bool) -> Result<Option<(ModuleInfo, Vec<u8>)>, InitramfsError> {
        let Some(info) = self.modules.get(name).cloned() else { return Ok(None) };
        let data = read_module(&info.path)?;
        if !from_modinfo {
            return Ok(Some((info, data)));
        }
        let mut info = info;
        for (k, v) in modinfo(&data) {
            match k.as_str() {
                "depends" => info.depends = v.split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect(),
                "softdep" => info.softdeps_pre.extend(parse_softdep_pre(&v)),
                _ => {}
            }
        }
        Ok(Some((info, data)))
    }

    fn lookup(&self, name: &str) -> Option<String> {
        let name = name.replace('-', "_");
        if self.modules.contains_key(&name) {
            return Some(name);
        }
        if let Some(m) = self.aliases.get(&name).filter(|m| self.modules.contains_key(*m)) {
            return Some(m.clone());
        }
        // Without modules.alias (no depmod), a crypto softdep like ext4's `pre: crc32c` names an
        // algorithm whose generic implementation is `<name>_generic` (the kernel's own naming).
        // ext4 asks for `crypto-crc32c` (request_module's name for the algorithm).
        let algorithm = name.strip_prefix("crypto_").unwrap_or(&name);
        [algorithm.to_owned(), format!("{algorithm}_generic")].into_iter().find(|m| self.modules.contains_key(m))
    }
}

/// Resolves `wanted` (plus dependencies, dependencies first) to (name, decompressed .ko) in load order.
fn resolve_modules(dir: &Path, wanted: &[String]) -> Result<Vec<(String, Vec<u8>)>, InitramfsError> {
    let mut index = ModuleIndex::load(dir)?;
    let from_modinfo = !dir.join("modules.dep").exists();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();

    // Iterative DFS: (name, required, deps_done)
    fn visit(
        index: &mut ModuleIndex,
        from_modinfo: bool,
        name: &str,
        required: bool,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), InitramfsError> {
        let norm = name.replace('-', "_");
        if index.builtin.contains(&norm) || depth > 64 {
            return Ok(());
        }
        let Some(real) = index.lookup(&norm) else {
            // Absent and not listed as built-in: fatal only for a module the target asks for by
            // name when the kernel ships a modules.builtin list to tell "built in" from "missing".
            if required && index.has_builtin_list {
                return Err(InitramfsError::MissingModule { dir: index.dir.clone(), module: norm });
            }
            return Ok(());
        };
        if !seen.insert(real.clone()) {
            return Ok(());
        }
        let Some((info, data)) = index.info(&real, from_modinfo)? else { return Ok(()) };
        for soft in &info.softdeps_pre {
            visit(index, from_modinfo, soft, false, seen, order, depth + 1)?;
        }
        for dep in &info.depends {
            visit(index, from_modinfo, dep, true, seen, order, depth + 1)?;
        }
        order.push((real, data));
        Ok(())
    }
    for name in wanted {
        visit(&mut index, from_modinfo, name, true, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

// ---------------------------------------------------------------------------------------------

fn init_script(modules: &[String], busybox: bool) -> String {
    let variant = if busybox { "the stage's busybox" } else { "the stage's shell, kmod and util-linux" };
    let polls = ROOT_WAIT_SECS * 5;
    format!(
        r#"#!/dbh/bin/sh
# dbh initramfs (tools: {variant}): load the modules that reach the root disk, wait for the root
# filesystem named by root= (LABEL=, UUID= or a device), mount it and switch_root to its init.
PATH=/dbh/bin
export PATH
fail() {{
	echo "dbh-initramfs: error: $*"
	# Exiting panics the kernel; with panic=-1 the machine resets (QEMU -no-reboot then exits).
	exit 1
}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "dbh-initramfs: started (tools: {variant})"
MODULES="{modules}"
for m in $MODULES; do
	insmod /dbh/modules/$m.ko || echo "dbh-initramfs: warning: cannot load module $m"
done
root=
init=/sbin/init
fstype=auto
flags=rw
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	root=*) root=${{arg#root=}} ;;
	init=*) init=${{arg#init=}} ;;
	rootfstype=*) fstype=${{arg#rootfstype=}} ;;
	ro) flags=ro ;;
	rw) flags=rw ;;
	esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"
echo "dbh-initramfs: waiting for root $root"
n=0
while :; do
	case "$root" in
	LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
	*) dev=$root ;;
	esac
	[ -n "$dev" ] && [ -b "$dev" ] && break
	n=$((n + 1))
	[ $n -lt {polls} ] || fail "timed out after {ROOT_WAIT_SECS} s waiting for the root device $root"
	sleep 0.2
done
if [ "$fstype" = auto ]; then
	mount -o $flags "$dev" /newroot || mount -t ext4 -o $flags "$dev" /newroot || fail "cannot mount $dev ($root)"
else
	mount -t "$fstype" -o $flags "$dev" /newroot || fail "cannot mount $dev ($root) as $fstype"
fi
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fail "$init does not exist on $root"
echo "dbh-initramfs: switching to $dev ($root)"
for d in dev proc sys; do
	mount --move /$d /newroot/$d 2>/dev/null
done
exec switch_root /newroot "$init"
"#,
        modules = modules.join(" "),
    )
}

/// Builds the initramfs.
pub fn build(spec: &Spec) -> Result<Initramfs, InitramfsError> {
    let mut c = Collector::new(spec.root);
    let busybox_path = ["/bin/busybox", "/usr/bin/busybox", "/sbin/busybox", "/usr/sbin/busybox"]
        .into_iter()
        .find(|p| is_file_in_root(spec.root, p));
    let use_busybox = match spec.tools {
        Tools::Stage => false,
        Tools::Auto => busybox_path.is_some(),
        Tools::Busybox => {
            if busybox_path.is_none() {
                return Err(InitramfsError::NoBusybox { root: spec.root.to_owned() });
            }
            true
        }
    };
    let busybox = match (use_busybox, busybox_path) {
        (true, Some(p)) => {
            let host = spec.root.join(p.trim_start_matches('/'));
            let data = fs_err::read(&host)?;
            let canonical = c.add_path(p)?.expect("busybox exists");
            Some((canonical, data))
        }
        _ => None,
    };
    for tool in TOOLS {
        let target = match &busybox {
            Some((canonical, data)) if busybox_has(data, tool) => canonical.clone(),
            _ => {
                let found = match *tool {
                    "sh" => ["/bin/sh", "/usr/bin/sh", "/bin/bash", "/bin/dash"]
                        .into_iter()
                        .find(|p| resolve_in_root(spec.root, p).ok().flatten().is_some())
                        .map(str::to_owned),
                    _ => c.find_tool(tool),
                };
                let path = found.ok_or_else(|| InitramfsError::MissingTool {
                    root: spec.root.to_owned(),
                    tool: tool.to_string(),
                })?;
                c.add_path(&path)?.ok_or_else(|| InitramfsError::MissingTool {
                    root: spec.root.to_owned(),
                    tool: tool.to_string(),
                })?;
                // Keep the tool's own name as the link's last hop (kmod and busybox dispatch on argv[0]).
                path
            }
        };
        c.cpio.add(&format!("dbh/bin/{tool}"), Entry::Symlink { target: format!("/{}", target.trim_start_matches('/')) });
    }

    let mut load_order = Vec::new();
    if let Some(dir) = spec.modules_dir {
        for (name, data) in resolve_modules(dir, spec.modules)? {
            c.cpio.add(&format!("dbh/modules/{name}.ko"), Entry::File { mode: 0o644, data });
            load_order.push(name);
        }
    }
    for dir in ["proc", "sys", "dev", "newroot", "run", "tmp"] {
        if !c.cpio.contains(dir) {
            c.cpio.add(dir, Entry::Dir { mode: 0o755 });
        }
    }
    c.cpio.add("init", Entry::File { mode: 0o755, data: init_script(&load_order, busybox.is_some()).into_bytes() });
    let raw = c.cpio.to_bytes();
    Ok(Initramfs {
        data: compress(&raw, spec.compression)?,
        load_order,
        busybox: busybox.is_some(),
        paths: c.cpio.paths(),
    })
}

/// `true` when `path` is a plain relative path without `..` (archive member names).
pub fn is_safe_member(path: &str) -> bool {
    Path::new(path).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_round_trips_and_is_deterministic() {
        let mut a = Cpio::new();
        a.add("/init", Entry::File { mode: 0o755, data: b"#!/bin/sh\n".to_vec() });
        a.add("usr/bin/busybox", Entry::File { mode: 0o755, data: vec![1, 2, 3] });
        a.add("bin", Entry::Symlink { target: "usr/bin".into() });
        let bytes = a.to_bytes();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 512, 0);
        let back = Cpio::parse(&bytes).unwrap();
        assert_eq!(back.paths(), ["bin", "init", "usr", "usr/bin", "usr/bin/busybox"]);
        assert_eq!(back.get("usr/bin/busybox"), Some(&Entry::File { mode: 0o755, data: vec![1, 2, 3] }));
        assert_eq!(back.get("bin"), Some(&Entry::Symlink { target: "usr/bin".into() }));
        assert_eq!(back.get("usr"), Some(&Entry::Dir { mode: 0o755 }));
        // Same input, same bytes; both compressors round-trip.
        assert_eq!(a.to_bytes(), bytes);
        for comp in [Compression::Gzip, Compression::Zstd] {
            let z = compress(&bytes, comp).unwrap();
            assert_eq!(compress(&bytes, comp).unwrap(), z);
            assert_eq!(decompress(&z).unwrap(), bytes);
        }
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::fs::write(r.join("usr/bin/kmod"), b"x").unwrap();
        std::os::unix::fs::symlink("/bin/kmod", r.join("usr/bin/insmod")).unwrap();
        let (canon, links) = resolve_in_root(r, "/bin/insmod").unwrap().unwrap();
        assert_eq!(canon, "usr/bin/kmod");
        assert_eq!(links, [("bin".into(), "usr/bin".into()), ("usr/bin/insmod".into(), "/bin/kmod".into())]);
        assert!(resolve_in_root(r, "/bin/nothing").unwrap().is_none());
    }

    #[test]
    fn crypto_softdeps_find_the_generic_module_without_depmod() {
        let index = ModuleIndex {
            dir: PathBuf::from("/m"),
            modules: [("crc32c_generic", "crypto/crc32c_generic.ko.xz"), ("ext4", "fs/ext4/ext4.ko.xz")]
                .into_iter()
                .map(|(n, p)| (n.to_owned(), ModuleInfo { path: PathBuf::from(p), depends: vec![], softdeps_pre: vec![] }))
                .collect(),
            aliases: HashMap::new(),
            builtin: BTreeSet::new(),
            has_builtin_list: true,
        };
        assert_eq!(index.lookup("crypto-crc32c").as_deref(), Some("crc32c_generic"));
        assert_eq!(index.lookup("crc32c").as_deref(), Some("crc32c_generic"));
        assert_eq!(index.lookup("ext4").as_deref(), Some("ext4"));
        assert_eq!(index.lookup("nope"), None);
    }

    #[test]
    fn softdep_pre_is_parsed() {
        assert_eq!(parse_softdep_pre("pre: crc32c crc-t10dif post: x"), ["crc32c", "crc_t10dif"]);
    }

    #[test]
    fn init_script_lists_modules_in_order() {
        let s = init_script(&["virtio".into(), "virtio_blk".into()], true);
        assert!(s.starts_with("#!/dbh/bin/sh\n"));
        assert!(s.contains("MODULES=\"virtio virtio_blk\"\n"));
        assert!(init_script(&[], false).contains("MODULES=\"\"\n"));
    }
}

//! The host's per-target Portage configuration, `$DBH_HOME/targets/<target>/portage/`: its
//! files, their defaults (written on first use) and the world file's atoms.

use std::path::PathBuf;

use super::{BuildError, io};
use crate::settings::Home;

/// Default files of `$DBH_HOME/targets/<target>/portage/`, written on first use.
const DEFAULT_MAKE_CONF: &str = "\
# dbh: added to the builder's /etc/portage/make.conf before every build of this target.
# dbh itself sets MAKEOPTS, FEATURES=buildpkg, BINPKG_FORMAT and PKGDIR after this file.
# Every license is accepted so that any package can be built; restrict it here if you need to.
ACCEPT_LICENSE=\"*\"
";
const DEFAULT_PACKAGE_USE: &str = "# dbh: synced to the builder's /etc/portage/package.use/dbh\n";
const DEFAULT_ACCEPT_KEYWORDS: &str = "# dbh: synced to the builder's /etc/portage/package.accept_keywords/dbh\n";
const DEFAULT_WORLD: &str = "\
# dbh: what `dbh vm build --target T` builds when no atom is given, one atom or @set per line.
# Synced to the builder as the set @dbh-world (/etc/portage/sets/dbh-world).
";
const DEFAULT_REPOS_CONF: &str = "\
# dbh: synced to the builder's /etc/portage/repos.conf/50-dbh-host.conf before every build.
# Repositories the builder has or syncs itself (--repo ones are added after this and win), e.g.
# [guru]
# location = /var/db/repos/guru
# sync-type = git
# sync-uri = https://github.com/gentoo-mirror/guru.git
";

/// The files of `$DBH_HOME/targets/<target>/portage/`, in the order `dbh config show` prints them.
pub const CONFIG_FILES: &[&str] = &["make.conf", "package.use", "package.accept_keywords", "world", "repos.conf"];

/// The host's per-target Portage configuration; created with defaults on first use.
#[derive(Debug, Clone)]
pub struct PortageConfig {
    pub make_conf: String,
    pub package_use: String,
    pub package_accept_keywords: String,
    /// Atoms and @sets, one per line: the build's default when no atom is given.
    pub world: String,
    /// repos.conf sections added to the builder's own (besides `--repo` ones).
    pub repos_conf: String,
}

impl PortageConfig {
    pub fn dir(home: &Home, target: &str) -> PathBuf {
        home.target_config(target).join("portage")
    }

    pub fn load_or_create(home: &Home, target: &str) -> Result<PortageConfig, BuildError> {
        let dir = Self::dir(home, target);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let read = |name: &str, default: &str| -> Result<String, BuildError> {
            let path = dir.join(name);
            if !path.exists() {
                std::fs::write(&path, default).map_err(io("write", &path))?;
            }
            if path.is_dir() {
                // A directory like /etc/portage's own: its files concatenated in name order.
                let mut names: Vec<PathBuf> =
                    std::fs::read_dir(&path).map_err(io("read", &path))?.flatten().map(|e| e.path()).collect();
                names.sort();
                let mut all = String::new();
                for f in names.iter().filter(|f| f.is_file()) {
                    all.push_str(&std::fs::read_to_string(f).map_err(io("read", f))?);
                    all.push('\n');
                }
                return Ok(all);
            }
            std::fs::read_to_string(&path).map_err(io("read", &path))
        };
        Ok(PortageConfig {
            make_conf: read("make.conf", DEFAULT_MAKE_CONF)?,
            package_use: read("package.use", DEFAULT_PACKAGE_USE)?,
            package_accept_keywords: read("package.accept_keywords", DEFAULT_ACCEPT_KEYWORDS)?,
            world: read("world", DEFAULT_WORLD)?,
            repos_conf: read("repos.conf", DEFAULT_REPOS_CONF)?,
        })
    }

    /// The atoms of the `world` file (comments and blank lines dropped).
    pub fn world_atoms(&self) -> Vec<String> {
        self.world
            .lines()
            .map(|l| l.split_once('#').map_or(l, |(a, _)| a).trim())
            .filter(|l| !l.is_empty())
            .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portage_config_defaults_are_written_once() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let c = PortageConfig::load_or_create(&home, "arm64").unwrap();
        assert!(c.make_conf.contains("ACCEPT_LICENSE"));
        let dir = PortageConfig::dir(&home, "arm64");
        std::fs::write(dir.join("make.conf"), "X=1\n").unwrap();
        assert_eq!(PortageConfig::load_or_create(&home, "arm64").unwrap().make_conf, "X=1\n");
        for f in CONFIG_FILES {
            assert!(dir.join(f).is_file(), "{f} is written on first use");
        }
        assert!(c.world_atoms().is_empty(), "the default world builds nothing");
        assert!(c.repos_conf.lines().all(|l| l.starts_with('#')), "{}", c.repos_conf);
    }

    #[test]
    fn world_atoms_skip_comments() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let dir = PortageConfig::dir(&home, "arm64");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("world"), "# mine\ndbh-test/hello\n\n  @dbh-extra # a set\n").unwrap();
        let c = PortageConfig::load_or_create(&home, "arm64").unwrap();
        assert_eq!(c.world_atoms(), ["dbh-test/hello", "@dbh-extra"]);
    }
}

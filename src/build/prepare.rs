//! What every backend checks and loads on the host before it builds ([`Prepared`]): the signing
//! key, the profile, the `--repo`s, the target's Portage configuration, a log directory; and
//! publishing what a build returned into the target's binhost.

use std::path::{Path, PathBuf};

use super::{BuildError, PortageConfig, Request, io, repo_name, repos_conf_sections, split_profile, timestamp};
use crate::events::{Event, Reporter};
use crate::settings::Home;
use crate::sign::{KeyStore, Signer};
use crate::target::Target;

/// What every backend checks and loads on the host before it starts building.
pub struct Prepared {
    pub signer: Signer,
    pub profile_repo: String,
    pub profile_path: String,
    /// `(name, path)` of every `--repo`.
    pub repos: Vec<(String, PathBuf)>,
    pub config: PortageConfig,
    pub binhost_dir: PathBuf,
    /// `$DBH_HOME/logs/<target>/<timestamp>`, created.
    pub log_dir: PathBuf,
}

pub fn prepare(home: &Home, target: &Target, req: &Request) -> Result<Prepared, BuildError> {
    let keys = KeyStore::new(home.keys());
    if !keys.exists() {
        return Err(BuildError::NoKey { dir: home.keys() });
    }
    let signer = keys.signer()?;
    let profile = req.profile.clone().unwrap_or_else(|| target.profile.clone());
    let (profile_repo, profile_path) = split_profile(&profile)?;
    let mut repos = Vec::new();
    for path in &req.repos {
        let abs = std::path::absolute(path).map_err(io("resolve", path))?;
        repos.push((repo_name(&abs)?, abs));
    }
    let config = PortageConfig::load_or_create(home, &target.name)?;
    if req.atoms.is_empty() && config.world_atoms().is_empty() {
        let world = PortageConfig::dir(home, &target.name).join("world");
        return Err(BuildError::NothingToBuild { target: target.name.clone(), world });
    }
    let log_dir = home.logs(&target.name).join(timestamp());
    std::fs::create_dir_all(&log_dir).map_err(io("create", &log_dir))?;
    Ok(Prepared { signer, profile_repo, profile_path, repos, config, binhost_dir: home.binhost(&target.name), log_dir })
}

impl Prepared {
    /// What emerge is asked for: the request's atoms, else the atoms of the target's world file.
    pub fn atoms(&self, req: &Request) -> Vec<String> {
        if req.atoms.is_empty() { self.config.world_atoms() } else { req.atoms.clone() }
    }

    /// Signs and publishes `files` into the target's binhost (atomic, re-indexed) and counts them.
    pub fn publish(&self, target: &Target, files: &[PathBuf], reporter: &dyn Reporter) -> Result<Vec<crate::binhost::add::Added>, BuildError> {
        let published = if files.is_empty() {
            Vec::new()
        } else {
            crate::binhost::add::add(&self.binhost_dir, target, files, Some(&self.signer), reporter)?
        };
        reporter.event(Event::Count { name: "binpkg.transferred".into(), value: files.len() as u64 });
        Ok(published)
    }

    /// repos.conf (for `PORTAGE_REPOSITORIES`, which replaces every repos.conf) naming the profile's
    /// repository as main-repo: the target's own repos.conf sections, then every `--repo` at
    /// `location(name, path)` (a `--repo` wins over a section of the same name), then `fallback`
    /// for the profile's repository when neither names it.
    pub fn repos_conf(&self, location: impl Fn(&str, &Path) -> String, fallback: Option<String>) -> String {
        let mut conf = format!("# written by dbh before each build\n[DEFAULT]\nmain-repo = {}\n", self.profile_repo);
        let own = repos_conf_sections(&self.config.repos_conf);
        for (name, text) in &own {
            if name != "DEFAULT" && !self.repos.iter().any(|(n, _)| n == name) {
                conf.push('\n');
                conf.push_str(text);
            }
        }
        for (name, path) in &self.repos {
            conf.push_str(&format!("\n[{name}]\nlocation = {}\nauto-sync = no\n", location(name, path)));
        }
        let named = |n: &str| self.repos.iter().any(|(r, _)| r == n) || own.iter().any(|(o, _)| o == n);
        if let Some(loc) = fallback.filter(|_| !named(&self.profile_repo)) {
            conf.push_str(&format!("\n[{}]\nlocation = {loc}\nauto-sync = no\n", self.profile_repo));
        }
        conf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_backends_get_the_targets_repos_conf_and_the_repos() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let mut config = PortageConfig::load_or_create(&home, "arm64").unwrap();
        config.repos_conf = "# mine\n[DEFAULT]\nmain-repo = x\n[guru]\nlocation = /var/db/repos/guru\n\n[r]\nlocation = /old\n[gentoo]\nlocation = /g\n".into();
        let mut prep = Prepared {
            signer: crate::sign::Signer::generate_ephemeral("t <t@t>").unwrap(),
            profile_repo: "gentoo".into(),
            profile_path: "default/linux/arm64/23.0".into(),
            repos: vec![("r".into(), PathBuf::from("/src/r"))],
            config,
            binhost_dir: home.binhost("arm64"),
            log_dir: home.logs("arm64"),
        };
        let conf = prep.repos_conf(|n, _| format!("/var/db/repos/{n}"), Some("/fallback".into()));
        assert_eq!(
            conf,
            "# written by dbh before each build\n[DEFAULT]\nmain-repo = gentoo\n\n[guru]\nlocation = /var/db/repos/guru\n\n\
             [gentoo]\nlocation = /g\n\n[r]\nlocation = /var/db/repos/r\nauto-sync = no\n"
        );
        prep.config.repos_conf.clear();
        assert!(prep.repos_conf(|_, p| p.display().to_string(), Some("/fallback".into())).ends_with("[gentoo]\nlocation = /fallback\nauto-sync = no\n"));
    }
}

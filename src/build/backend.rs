//! Which backend builds a request, with what options, and running it: the one dispatch that
//! `dbh build --backend …`, `dbh vm build` and `dbh cross build` share.
//!
//! A [`Backend`] carries its backend's options, resolved from the typed settings by
//! [`Backend::resolve`]; [`run`] builds and publishes. `auto` is decided by [`super::choice`]
//! before a backend is resolved, so the reason can be shown.

use super::{BuildError, Outcome, Request, chroot, cross, vm};
use crate::events::Reporter;
use crate::settings::{Home, Settings, SettingsError};
use crate::target::Target;

/// A backend without its options: what the user or [`super::choice`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vm,
    Cross,
    Chroot,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::Cross => "cross",
            Kind::Chroot => "chroot",
        }
    }
}

/// A backend with its options.
#[derive(Debug, Clone)]
pub enum Backend {
    Vm(vm::VmOptions),
    Cross(cross::CrossOptions),
    Chroot(chroot::ChrootOptions),
}

/// What the command line adds to the settings for a build.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    /// `--keep-vm`: leave the guest running for the next build.
    pub keep_vm: bool,
    /// `-v`: pass every line of emerge's output on.
    pub echo_output: bool,
}

impl Backend {
    /// The options of `kind` for `target` from the settings (`portage.emerge`, `vm.*` sizes and
    /// timeouts) and the command-line flags.
    pub fn resolve(kind: Kind, settings: &Settings, target: &Target, flags: Flags) -> Result<Backend, SettingsError> {
        let emerge = settings.portage.emerge.clone();
        Ok(match kind {
            Kind::Vm => {
                let sizing = settings.vm_sizing(&target.name)?;
                Backend::Vm(vm::VmOptions {
                    keep_vm: flags.keep_vm,
                    boot_deadline: settings.vm.boot_timeout,
                    echo_output: flags.echo_output,
                    repo_tools: crate::repo::snapshot::Tools::find(&emerge),
                    cpus: Some(sizing.cpus.0),
                    memory_mib: Some(sizing.memory_mib.0),
                    scratch_bytes: sizing.scratch_bytes.0,
                    emerge: Some(emerge),
                })
            }
            Kind::Cross => Backend::Cross(cross::CrossOptions { emerge, echo_output: flags.echo_output }),
            Kind::Chroot => Backend::Chroot(chroot::ChrootOptions { echo_output: flags.echo_output }),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Backend::Vm(_) => Kind::Vm,
            Backend::Cross(_) => Kind::Cross,
            Backend::Chroot(_) => Kind::Chroot,
        }
    }
}

/// Builds `req` for `target` with `backend` and publishes what was built. Returns the outcome
/// also when packages failed; [`Outcome::failures`] turns those into an error.
pub fn run(home: &Home, target: &Target, req: &Request, backend: &Backend, reporter: &dyn Reporter) -> Result<Outcome, BuildError> {
    match backend {
        Backend::Vm(opts) => {
            let guarded = crate::vm::with_signals(vm::build(home, target, req, opts, reporter));
            crate::util::runtime::block_on(guarded).map_err(BuildError::Runtime)??
        }
        Backend::Cross(opts) => cross::build(home, target, req, opts, reporter),
        Backend::Chroot(opts) => chroot::build(home, target, req, opts, reporter),
    }
}

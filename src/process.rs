//! The one wrapper through which dbh runs every external program (QEMU, emerge, gpg, mkfs, …).
//!
//! It logs a copy-pasteable command line before running, keeps the tail of stderr for the error
//! message, and tells an exit code from a signal. Long-lived children (QEMU) are spawned through
//! [`Cmd::std_command`] / [`Cmd::tokio_command`] so that they are logged the same way, and tied to
//! dbh's life with [`die_with_parent`] (the only `pre_exec` that does so).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::hint::Hint;

/// How many stderr lines an error keeps.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("`{program}` was not found on PATH")]
    NotFound { program: String, install: Option<String> },
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` {termination}{}", tail_suffix(.stderr_tail))]
    Failed {
        command: String,
        termination: Termination,
        stderr_tail: String,
    },
    #[error("I/O error while talking to `{command}`")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; its last stderr lines:\n{}", indent(tail))
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

impl Hint for ProcessError {
    fn hint(&self) -> Option<String> {
        match self {
            ProcessError::NotFound { install: Some(install), .. } => Some(format!("install {install}")),
            ProcessError::Failed { .. } => Some("run with -v to see the full command output".into()),
            _ => None,
        }
    }
}

/// How a child ended when it did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    Code(i32),
    Signal(i32),
}

impl Termination {
    pub fn from_status(status: ExitStatus) -> Option<Self> {
        if status.success() {
            None
        } else if let Some(code) = status.code() {
            Some(Termination::Code(code))
        } else {
            Some(Termination::Signal(status.signal().unwrap_or(0)))
        }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::Code(code) => write!(f, "exited with status {code}"),
            Termination::Signal(sig) => {
                let name = nix::sys::signal::Signal::try_from(*sig).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "was killed by signal {sig} ({name})")
            }
        }
    }
}

/// Captured result of a successful run.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Which stream a line came from, for [`Cmd::run_lines`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A command to run: a builder that also knows how to print itself for a shell.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    env_clear: bool,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    install: Option<String>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            cwd: None,
            stdin: None,
            install: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Start from an empty environment (Portage runs this way so the host's settings do not leak in).
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    pub fn stdin_bytes(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// What to install when the program is missing, e.g. "qemu-system-arm (Debian) or app-emulation/qemu (Gentoo)".
    pub fn install_hint(mut self, install: impl Into<String>) -> Self {
        self.install = Some(install.into());
        self
    }

    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// The command as a line one can paste into a shell.
    pub fn display(&self) -> String {
        let mut parts = Vec::new();
        if let Some(cwd) = &self.cwd {
            parts.push(format!("cd {} &&", shell_quote(cwd.as_os_str())));
        }
        if self.env_clear {
            parts.push("env -i".to_string());
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => parts.push(format!("{}={}", k.to_string_lossy(), shell_quote(v))),
                None if !self.env_clear => parts.push(format!("-u {}", k.to_string_lossy())),
                None => {}
            }
        }
        if !self.env_clear && self.env.iter().any(|(_, v)| v.is_none()) {
            parts.insert(parts.iter().position(|p| p.starts_with("-u ")).unwrap_or(0), "env".into());
        }
        parts.push(shell_quote(&self.program));
        parts.extend(self.args.iter().map(|a| shell_quote(a)));
        parts.join(" ")
    }

    /// A `std::process::Command` for a long-lived child; logs the command line.
    pub fn std_command(&self) -> Command {
        tracing::info!(target: "dbh::process", "running: {}", self.display());
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        if self.env_clear {
            cmd.env_clear();
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }

    /// A `tokio::process::Command` for a long-lived child; logs the command line.
    pub fn tokio_command(&self) -> tokio::process::Command {
        tokio::process::Command::from(self.std_command())
    }

    fn spawn_error(&self, source: std::io::Error) -> ProcessError {
        if source.kind() == std::io::ErrorKind::NotFound {
            ProcessError::NotFound {
                program: self.program.to_string_lossy().into_owned(),
                install: self.install.clone(),
            }
        } else {
            ProcessError::Spawn { command: self.display(), source }
        }
    }

    /// Runs to completion capturing stdout and stderr; any non-zero exit is an error.
    pub fn output(&self) -> Result<Output, ProcessError> {
        let mut cmd = self.std_command();
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        let writer = self.stdin.clone().and_then(|input| {
            let mut pipe = child.stdin.take()?;
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            }))
        });
        let out = child
            .wait_with_output()
            .map_err(|source| ProcessError::Io { command: self.display(), source })?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        if let Some(termination) = Termination::from_status(out.status) {
            return Err(ProcessError::Failed {
                command: self.display(),
                termination,
                stderr_tail: tail(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(Output { stdout: out.stdout, stderr: out.stderr })
    }

    /// Runs to completion and hands every output line to `on_line` as it arrives (for live progress
    /// and logs); keeps the stderr tail for the error.
    pub fn run_lines(&self, mut on_line: impl FnMut(Stream, &str)) -> Result<(), ProcessError> {
        let mut cmd = self.std_command();
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        if let (Some(input), Some(mut pipe)) = (self.stdin.clone(), child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let (tx, rx) = std::sync::mpsc::channel::<(Stream, String)>();
        let readers: Vec<_> = [
            (Stream::Stdout, child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
            (Stream::Stderr, child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
        ]
        .into_iter()
        .filter_map(|(which, pipe)| {
            let pipe = pipe?;
            let tx = tx.clone();
            Some(std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                    if tx.send((which, String::from_utf8_lossy(&line).into_owned())).is_err() {
                        break;
                    }
                }
            }))
        })
        .collect();
        drop(tx);
        let mut stderr_tail: VecDeque<String> = VecDeque::new();
        for (which, line) in rx {
            if which == Stream::Stderr {
                if stderr_tail.len() == STDERR_TAIL_LINES {
                    stderr_tail.pop_front();
                }
                stderr_tail.push_back(line.clone());
            }
            on_line(which, &line);
        }
        for r in readers {
            let _ = r.join();
        }
        let status = child
            .wait()
            .map_err(|source| ProcessError::Io { command: self.display(), source })?;
        if let Some(termination) = Termination::from_status(status) {
            return Err(ProcessError::Failed {
                command: self.display(),
                termination,
                stderr_tail: stderr_tail.into_iter().collect::<Vec<_>>().join("\n"),
            });
        }
        Ok(())
    }
}

/// Makes the child `command` spawns receive `signal` when the thread that spawned it dies
/// (`PR_SET_PDEATHSIG`), so a long-lived child (QEMU, distccd) never outlives a killed dbh. Spawn
/// from a thread that lives as long as dbh (the main thread): the signal follows the *thread*.
/// A parent that died between fork and the prctl is caught too: the child then already belongs
/// to init and kills itself.
pub fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe calls (prctl, getppid, getpid, kill) between fork and exec,
    // and the closure touches no memory but its copied `signal`.
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            if libc::getppid() == 1 {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// Quotes one word for a POSIX shell, leaving plain words alone so logs stay readable.
pub fn shell_quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    if !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_copy_pasteable() {
        let cmd = Cmd::new("emerge").arg("--oneshot").arg("it's here").env("FEATURES", "buildpkg -sandbox");
        assert_eq!(cmd.display(), "FEATURES='buildpkg -sandbox' emerge --oneshot 'it'\\''s here'");
    }

    #[test]
    fn failure_keeps_stderr_tail_and_code() {
        let err = Cmd::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]).output().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exited with status 3"), "{text}");
        assert!(text.contains("    two"), "{text}");
    }

    #[test]
    fn signal_is_told_apart_from_exit_code() {
        let err = Cmd::new("sh").args(["-c", "kill -9 $$"]).output().unwrap_err();
        assert!(err.to_string().contains("killed by signal 9 (SIGKILL)"), "{err}");
    }

    #[test]
    fn missing_program_names_itself_and_the_package() {
        let err = Cmd::new("dbh-no-such-program").install_hint("the dbh-test package").output().unwrap_err();
        assert_eq!(err.to_string(), "`dbh-no-such-program` was not found on PATH");
        assert_eq!(err.hint().as_deref(), Some("install the dbh-test package"));
    }

    #[test]
    fn run_lines_streams_both_streams() {
        let mut seen = Vec::new();
        Cmd::new("sh")
            .args(["-c", "echo out; echo err >&2"])
            .run_lines(|s, l| seen.push((s, l.to_string())))
            .unwrap();
        seen.sort_by_key(|(s, _)| *s == Stream::Stderr);
        assert_eq!(seen, vec![(Stream::Stdout, "out".into()), (Stream::Stderr, "err".into())]);
    }
}

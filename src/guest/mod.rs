//! SSH into a running guest: the readiness probe, one pinned-key connection per guest, commands
//! with streamed output, file transfer and the interactive shell.
//!
//! One russh connection per guest carries every channel: a key exchange costs ~2.5 s under TCG
//! (docs/lab.md, "SSH into a guest"), a channel a few milliseconds. The server's key must equal the image's
//! `ssh/host_ed25519_key.pub`; there is no trust-on-first-use.
//!
//! Files move over exec channels (`cat > FILE` / `cat FILE`), not SFTP: the `russh-sftp` crate is
//! not among dbh's dependencies and its releases trail russh's; a guest without an SFTP subsystem
//! (dropbear, busybox images) still works, and file sizes here (binpkgs, configs) do not need more.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelMsg;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hint::Hint;
use crate::process::{Cmd, Stream};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(
        "the SSH server of the {target} guest has host key {found}, but the image pins {expected} ({pinned})"
    )]
    HostKeyMismatch { target: String, expected: String, found: String, pinned: PathBuf },
    #[error("cannot read SSH key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: Box<russh::keys::Error>,
    },
    #[error("cannot connect to the {target} guest's SSH server on 127.0.0.1:{port}")]
    Connect {
        target: String,
        port: u16,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("the {target} guest refused the client key {key} for root")]
    AuthRefused { target: String, key: PathBuf },
    #[error("SSH to the {target} guest failed while {doing}")]
    Ssh {
        target: String,
        doing: String,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("`{command}` in the {target} guest ended without an exit status")]
    NoExitStatus { target: String, command: String },
    #[error("`{command}` in the {target} guest exited with status {status}: {stderr}")]
    CommandFailed { target: String, command: String, status: u32, stderr: String },
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for GuestError {
    fn hint(&self) -> Option<String> {
        match self {
            GuestError::HostKeyMismatch { .. } => Some(
                "the guest is not the image dbh made, or the image was rebuilt while it ran; \
                 stop it (`dbh vm stop`) and recreate the image (`dbh vm image create`)"
                    .into(),
            ),
            GuestError::AuthRefused { .. } => {
                Some("the image's /root/.ssh/authorized_keys does not hold ssh/id_ed25519.pub; recreate the image".into())
            }
            _ => None,
        }
    }
}

/// The image's key files (docs/vm-contract.md: `ssh/id_ed25519`, `ssh/host_ed25519_key.pub`).
#[derive(Debug, Clone)]
pub struct Keys {
    pub client: PathBuf,
    pub host_pub: PathBuf,
}

impl Keys {
    pub fn in_image(image_dir: &Path) -> Keys {
        Keys { client: image_dir.join("ssh/id_ed25519"), host_pub: image_dir.join("ssh/host_ed25519_key.pub") }
    }
}

/// Whether the guest's sshd answers: QEMU's user networking accepts TCP connections on the
/// forwarded port before anything listens in the guest, so only the `SSH-` banner counts.
pub async fn banner_ready(port: u16) -> bool {
    probe_banner(port).await.is_some()
}

/// Connects to the forwarded port and reads the first bytes of the server's banner; returns the
/// connection (with those bytes put back) when they are `SSH-`, to continue as an SSH session.
pub async fn probe_banner(port: u16) -> Option<Probed> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.ok()?;
        let _ = s.set_nodelay(true);
        (&buf == b"SSH-").then(|| Probed { prefix: buf.to_vec(), pos: 0, inner: s })
    };
    tokio::time::timeout(Duration::from_secs(3), attempt).await.ok().flatten()
}

/// A TCP stream whose first bytes were already read by [`probe_banner`] and are replayed.
pub struct Probed {
    prefix: Vec<u8>,
    pos: usize,
    inner: tokio::net::TcpStream,
}

impl tokio::io::AsyncRead for Probed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Probed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Pinned {
    expected: PublicKey,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl russh::client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        *self.seen.lock().expect("poisoned") = Some(key.clone());
        Ok(key.key_data() == self.expected.key_data())
    }
}

/// An exit status of a guest command; a signal counts as 128 + its number, as in a shell.
pub type ExitCode = u32;

/// Output of [`Guest::exec_capture`].
#[derive(Debug, Clone)]
pub struct Captured {
    pub status: ExitCode,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Captured {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A connected guest. Cheap to share (`&Guest`): every call opens its own channel.
pub struct Guest {
    target: String,
    port: u16,
    keys: Keys,
    handle: russh::client::Handle<Pinned>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("target", &self.target).field("port", &self.port).finish()
    }
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl Guest {
    /// Connects as root with the image's client key, refusing any host key but the pinned one.
    pub async fn connect(target: &str, port: u16, keys: &Keys) -> Result<Guest, GuestError> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| GuestError::Connect {
            target: target.to_owned(),
            port,
            source: Box::new(russh::Error::IO(e)),
        })?;
        let _ = stream.set_nodelay(true);
        Self::connect_stream(target, port, keys, stream).await
    }

    /// [`Guest::connect`] over an established connection (e.g. from [`probe_banner`]).
    pub async fn connect_stream<S>(target: &str, port: u16, keys: &Keys, stream: S) -> Result<Guest, GuestError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let expected = russh::keys::load_public_key(&keys.host_pub)
            .map_err(|source| GuestError::Key { path: keys.host_pub.clone(), source: Box::new(source) })?;
        let client = russh::keys::load_secret_key(&keys.client, None)
            .map_err(|source| GuestError::Key { path: keys.client.clone(), source: Box::new(source) })?;
        let seen = Arc::new(Mutex::new(None));
        let handler = Pinned { expected: expected.clone(), seen: seen.clone() };
        let config = russh::client::Config {
            // A guest under TCG can stall for seconds (a compile saturating both host cores).
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 8,
            nodelay: true,
            ..Default::default()
        };
        let connected = russh::client::connect_stream(Arc::new(config), stream, handler).await;
        let mut handle = match connected {
            Ok(h) => h,
            Err(russh::Error::UnknownKey) => {
                let found = seen.lock().expect("poisoned").clone();
                return Err(GuestError::HostKeyMismatch {
                    target: target.to_owned(),
                    expected: fingerprint(&expected),
                    found: found.as_ref().map_or_else(|| "(a certificate)".to_owned(), fingerprint),
                    pinned: keys.host_pub.clone(),
                });
            }
            Err(source) => return Err(GuestError::Connect { target: target.to_owned(), port, source: Box::new(source) }),
        };
        let auth = handle
            .authenticate_publickey("root", PrivateKeyWithHashAlg::new(Arc::new(client), None))
            .await
            .map_err(|source| GuestError::Ssh {
                target: target.to_owned(),
                doing: "authenticating".into(),
                source: Box::new(source),
            })?;
        if !auth.success() {
            return Err(GuestError::AuthRefused { target: target.to_owned(), key: keys.client.clone() });
        }
        Ok(Guest { target: target.to_owned(), port, keys: keys.clone(), handle })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn ssh_err(&self, doing: impl Into<String>) -> impl FnOnce(russh::Error) -> GuestError + '_ {
        let doing = doing.into();
        move |source| GuestError::Ssh { target: self.target.clone(), doing, source: Box::new(source) }
    }

    /// Runs `command` (a shell command line) and hands every chunk of its output to `on_data` as it
    /// arrives; `stdin` is sent first, then EOF. Returns the exit status.
    pub async fn exec_raw(
        &self,
        command: &str,
        stdin: Option<&mut (dyn tokio::io::AsyncRead + Unpin + Send)>,
        mut on_data: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitCode, GuestError> {
        let mut channel =
            self.handle.channel_open_session().await.map_err(self.ssh_err(format!("opening a channel for `{command}`")))?;
        channel.exec(true, command).await.map_err(self.ssh_err(format!("starting `{command}`")))?;
        if let Some(input) = stdin {
            channel.data(input).await.map_err(self.ssh_err(format!("sending input to `{command}`")))?;
        }
        channel.eof().await.map_err(self.ssh_err(format!("closing the input of `{command}`")))?;
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => on_data(Stream::Stdout, &data),
                ChannelMsg::ExtendedData { data, ext: 1 } => on_data(Stream::Stderr, &data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => status = Some(128 + signal_number(&signal_name)),
                _ => {}
            }
        }
        status.ok_or_else(|| GuestError::NoExitStatus { target: self.target.clone(), command: command.to_owned() })
    }

    /// Runs `command` and hands each output line (without its newline) to `on_output`.
    pub async fn exec(&self, command: &str, mut on_output: impl FnMut(Stream, &str)) -> Result<ExitCode, GuestError> {
        let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let status = self
            .exec_raw(command, None, |stream, data| {
                let buf = &mut pending[usize::from(stream == Stream::Stderr)];
                buf.extend_from_slice(data);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    on_output(stream, String::from_utf8_lossy(&line[..line.len() - 1]).trim_end_matches('\r'));
                }
            })
            .await?;
        for (i, rest) in pending.iter().enumerate() {
            if !rest.is_empty() {
                on_output(if i == 0 { Stream::Stdout } else { Stream::Stderr }, &String::from_utf8_lossy(rest));
            }
        }
        Ok(status)
    }

    /// Runs `command` and returns its status and whole output.
    pub async fn exec_capture(&self, command: &str) -> Result<Captured, GuestError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self
            .exec_raw(command, None, |s, d| match s {
                Stream::Stdout => stdout.extend_from_slice(d),
                Stream::Stderr => stderr.extend_from_slice(d),
            })
            .await?;
        Ok(Captured { status, stdout, stderr })
    }

    /// Runs `command`; a non-zero exit is an error carrying its stderr.
    pub async fn exec_ok(&self, command: &str) -> Result<Captured, GuestError> {
        let out = self.exec_capture(command).await?;
        if out.status != 0 {
            return Err(GuestError::CommandFailed {
                target: self.target.clone(),
                command: command.to_owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out)
    }

    /// Copies a local file to `remote` in the guest (created or replaced, with `mode`).
    pub async fn upload(&self, local: &Path, remote: &str, mode: u32) -> Result<(), GuestError> {
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|source| GuestError::Io { path: local.to_owned(), source })?;
        self.upload_from(&mut file, remote, mode).await
    }

    /// Writes `data` to `remote` in the guest.
    pub async fn upload_bytes(&self, data: &[u8], remote: &str, mode: u32) -> Result<(), GuestError> {
        let mut reader: &[u8] = data;
        self.upload_from(&mut reader, remote, mode).await
    }

    async fn upload_from(
        &self,
        reader: &mut (dyn tokio::io::AsyncRead + Unpin + Send),
        remote: &str,
        mode: u32,
    ) -> Result<(), GuestError> {
        let q = shell_quote(remote);
        // Write beside the target and rename, so a reader never sees half a file.
        let command = format!("cat > {q}.dbh-part && chmod {mode:o} {q}.dbh-part && mv -f {q}.dbh-part {q}");
        let mut stderr = Vec::new();
        let status = self
            .exec_raw(&command, Some(reader), |s, d| {
                if s == Stream::Stderr {
                    stderr.extend_from_slice(d)
                }
            })
            .await?;
        if status != 0 {
            return Err(GuestError::CommandFailed {
                target: self.target.clone(),
                command,
                status,
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// Copies `remote` from the guest to a local file.
    pub async fn download(&self, remote: &str, local: &Path) -> Result<(), GuestError> {
        let part = local.with_extension("dbh-part");
        let mut file =
            tokio::fs::File::create(&part).await.map_err(|source| GuestError::Io { path: part.clone(), source })?;
        let command = format!("cat {}", shell_quote(remote));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let mut stderr = Vec::new();
        let writer = async {
            while let Some(chunk) = rx.recv().await {
                file.write_all(&chunk).await?;
            }
            file.flush().await
        };
        let run = async {
            let r = self
                .exec_raw(&command, None, |s, d| match s {
                    Stream::Stdout => {
                        let _ = tx.send(d.to_vec());
                    }
                    Stream::Stderr => stderr.extend_from_slice(d),
                })
                .await;
            drop(tx);
            r
        };
        let (status, written) = tokio::join!(run, writer);
        let status = status?;
        written.map_err(|source| GuestError::Io { path: part.clone(), source })?;
        if status != 0 {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(GuestError::CommandFailed {
                target: self.target.clone(),
                command,
                status,
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
        tokio::fs::rename(&part, local).await.map_err(|source| GuestError::Io { path: local.to_owned(), source })
    }

    /// Closes the connection politely (the guest's sshd logs a clean disconnect).
    pub async fn disconnect(&self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }

    /// The system `ssh` command that opens an interactive shell in the guest with the pinned key,
    /// through a known_hosts file written to `known_hosts`. Interactive terminals are what OpenSSH
    /// does best (PTY modes, window changes, escape sequences); dbh only pins the key.
    pub fn interactive_command(&self, known_hosts: &Path) -> Result<Cmd, GuestError> {
        interactive_command(self.port, &self.keys, known_hosts)
    }
}

/// See [`Guest::interactive_command`]; usable without a connection.
pub fn interactive_command(port: u16, keys: &Keys, known_hosts: &Path) -> Result<Cmd, GuestError> {
    let pinned = fs_err::read_to_string(&keys.host_pub)
        .map_err(|source| GuestError::Io { path: keys.host_pub.clone(), source })?;
    let mut fields = pinned.split_whitespace();
    let (algo, key) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
    fs_err::write(known_hosts, format!("[127.0.0.1]:{port} {algo} {key}\n"))
        .map_err(|source| GuestError::Io { path: known_hosts.to_owned(), source })?;
    Ok(Cmd::new("ssh")
        .args(["-i"])
        .arg(&keys.client)
        .args(["-p", &port.to_string()])
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("root@127.0.0.1")
        .install_hint("openssh-client (Debian) or net-misc/openssh (Gentoo)"))
}

fn signal_number(sig: &russh::Sig) -> u32 {
    use russh::Sig::*;
    match sig {
        HUP => 1,
        INT => 2,
        QUIT => 3,
        ILL => 4,
        ABRT => 6,
        FPE => 8,
        KILL => 9,
        USR1 => 10,
        SEGV => 11,
        PIPE => 13,
        ALRM => 14,
        TERM => 15,
        _ => 127,
    }
}

/// Quotes a word for the guest's POSIX shell.
pub fn shell_quote(word: &str) -> String {
    crate::process::shell_quote(std::ffi::OsStr::new(word))
}

/// Joins argv words into one shell command line (SSH carries a string, not an argv).
pub fn shell_join(words: &[String]) -> String {
    words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_quoted_for_the_guest_shell() {
        let words = vec!["sh".to_string(), "-c".into(), "echo 'a b'; exit 3".into()];
        assert_eq!(shell_join(&words), r#"sh -c 'echo '\''a b'\''; exit 3'"#);
    }

    #[tokio::test]
    async fn a_bare_tcp_accept_is_not_a_banner() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"HTTP/1.0 200 OK\r\n").await.unwrap();
            let (mut s2, _) = listener.accept().await.unwrap();
            s2.write_all(b"SSH-2.0-test\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        assert!(!banner_ready(port).await);
        assert!(banner_ready(port).await);
        server.await.unwrap();
    }
}

//! Stage tarballs: fetching (a local path, or an HTTP(S) URL downloaded into `$DBH_HOME/cache/`
//! with resume), and verification against Gentoo's DIGESTS file and its OpenPGP signature before
//! anything is unpacked. The signature is checked by default, against `--keyring` or Gentoo's
//! release keys ([`GENTOO_RELEASE_KEYS`]); only `--insecure-no-signature` skips it
//! ([`release_keyring`]): digests alone prove integrity, not who made the stage.
//!
//! DIGESTS format (what Gentoo's release tooling writes next to every stage3):
//! ```text
//! # BLAKE2B HASH
//! <hex>  stage3-arm64-openrc-20250101T000000Z.tar.xz
//! # SHA512 HASH
//! <hex>  stage3-arm64-openrc-20250101T000000Z.tar.xz
//! ```
//! A file may list several files (the `.CONTENTS.gz` too), and may be wrapped in an OpenPGP clear
//! signature. The stage's own lines are picked by file name; every listed algorithm dbh knows
//! (BLAKE2B, SHA512) must match, and at least one must be present.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blake2::Digest as _;

use crate::hint::Hint;
use crate::events::{Event, Reporter, Unit};

/// How long a download may go without receiving a byte.
pub const STALL_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot download {url}")]
    Download {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot download {url}: the server answered {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("download of {url} stalled: no data for {} s", STALL_DEADLINE.as_secs())]
    Stalled { url: String },
    #[error("{0}")]
    File(#[from] crate::util::fs::FileError),
    #[error("the DIGESTS file {digests} has no entry for `{file}`")]
    NoEntry { digests: String, file: String },
    #[error("{file} does not match its {algorithm} digest in {digests} (expected {expected}, got {actual}): refusing to unpack it")]
    Mismatch { file: String, digests: String, algorithm: &'static str, expected: String, actual: String },
    #[error("the OpenPGP signature of {digests} does not verify with the keyring {keyring}")]
    BadSignature {
        digests: String,
        keyring: PathBuf,
        #[source]
        source: anyhow_free::SigError,
    },
    #[error("{digests} is not signed (no clear signature, no {digests}.asc), and dbh only unpacks a stage whose DIGESTS signature verifies")]
    Unsigned { digests: String },
    #[error("cannot verify the signature of {digests}: no keyring given and no Gentoo release keys at {default}")]
    NoKeyring { digests: String, default: PathBuf },
    #[error("cannot read the OpenPGP keyring {keyring}")]
    Keyring {
        keyring: PathBuf,
        #[source]
        source: anyhow_free::SigError,
    },
}

/// A plain error type for sequoia's `anyhow` errors (dbh does not depend on anyhow).
pub mod anyhow_free {
    #[derive(Debug)]
    pub struct SigError(pub String);

    impl std::fmt::Display for SigError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for SigError {}
}
use anyhow_free::SigError;

impl Hint for StageError {
    fn hint(&self) -> Option<String> {
        match self {
            StageError::Mismatch { .. } => Some(
                "the download is corrupt or was tampered with; delete it from $DBH_HOME/cache/ and retry, or check the mirror"
                    .into(),
            ),
            StageError::NoEntry { .. } => Some("pass the DIGESTS file that belongs to this stage with --digests".into()),
            StageError::BadSignature { .. } | StageError::Keyring { .. } => Some(
                "use Gentoo's release keys (sec-keys/openpgp-keys-gentoo-release: /usr/share/openpgp-keys/gentoo-release.asc) \
                 with --keyring; only if you trust the source otherwise, --insecure-no-signature skips the check"
                    .into(),
            ),
            StageError::Unsigned { .. } => Some(
                "fetch the signed DIGESTS (Gentoo's are clear-signed) or its .asc; only if you trust the source \
                 otherwise, --insecure-no-signature accepts it unsigned"
                    .into(),
            ),
            StageError::NoKeyring { .. } => Some(
                "install Gentoo's release keys (sec-keys/openpgp-keys-gentoo-release) or pass --keyring FILE; \
                 --insecure-no-signature skips the check (integrity only, not authenticity)"
                    .into(),
            ),
            StageError::Stalled { .. } | StageError::Download { .. } => {
                Some("run the command again: the download resumes where it stopped".into())
            }
            _ => None,
        }
    }
}

pub fn is_url(location: &str) -> bool {
    location.starts_with("http://") || location.starts_with("https://")
}

/// The last path segment of a URL or path.
pub fn file_name(location: &str) -> String {
    let trimmed = location.split(['?', '#']).next().unwrap_or(location);
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_owned()
}

/// Where [`fetch`] keeps a downloaded stage (a local path is used where it is).
pub fn cached_path(location: &str, cache_dir: &Path) -> PathBuf {
    if !is_url(location) {
        return PathBuf::from(location);
    }
    // The URL's hash keeps two stages of the same file name (different mirrors/dates) apart.
    let key = hex::encode(&sha2::Sha256::digest(location.as_bytes())[..6]);
    cache_dir.join(format!("{key}-{}", file_name(location)))
}

/// Makes a stage or DIGESTS location available as a local file: paths are used as they are, URLs
/// are downloaded into `cache_dir` (resuming a `.partial` file with a Range request).
pub fn fetch(location: &str, cache_dir: &Path, reporter: &dyn Reporter) -> Result<PathBuf, StageError> {
    if !is_url(location) {
        return Ok(PathBuf::from(location));
    }
    fs_err::create_dir_all(cache_dir).map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: cache_dir.to_owned(), source }))?;
    let dest = cached_path(location, cache_dir);
    let partial = dest.with_file_name(format!("{}.partial", dest.file_name().unwrap_or_default().to_string_lossy()));
    download(location, &dest, &partial, reporter)?;
    Ok(dest)
}

fn download(url: &str, dest: &Path, partial: &Path, reporter: &dyn Reporter) -> Result<(), StageError> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        // blocking: applies to each read of the body, i.e. a stall deadline
        .timeout(STALL_DEADLINE)
        .build()
        .map_err(|source| StageError::Download { url: url.to_owned(), source })?;
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().map_err(|source| StageError::Download { url: url.to_owned(), source })?;
    let status = resp.status().as_u16();
    let (mut file, mut position) = match status {
        206 if have > 0 => {
            let f = fs_err::OpenOptions::new()
                .append(true)
                .open(partial)
                .map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: partial.to_owned(), source }))?;
            (f, have)
        }
        200 => (
            fs_err::File::create(partial).map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: partial.to_owned(), source }))?,
            0,
        ),
        416 if have > 0 => {
            // Already complete.
            fs_err::rename(partial, dest).map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: dest.to_owned(), source }))?;
            return Ok(());
        }
        _ => return Err(StageError::HttpStatus { url: url.to_owned(), status }),
    };
    let total = resp.content_length().map(|l| l + position);
    let task = format!("download:{url}");
    reporter.event(Event::Start { task: task.clone(), label: format!("downloading {}", file_name(url)), total, unit: Unit::Bytes });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(StageError::Stalled { url: url.to_owned() }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(StageError::File(crate::util::fs::FileError::Read { path: PathBuf::from(url), source })),
        };
        file.write_all(&buf[..n]).map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: partial.to_owned(), source }))?;
        position += n as u64;
        reporter.event(Event::Progress { task: task.clone(), position, message: None });
    }
    file.flush().map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: partial.to_owned(), source }))?;
    drop(file);
    if total.is_some_and(|total| position < total) {
        return Err(StageError::Stalled { url: url.to_owned() });
    }
    fs_err::rename(partial, dest).map_err(|source| StageError::File(crate::util::fs::FileError::Write { path: dest.to_owned(), source }))?;
    reporter.event(Event::Finish { task, message: format!("downloaded {} ({position} bytes)", file_name(url)) });
    Ok(())
}

/// One `<hex>  <file>` line under a `# <ALGO> HASH` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestLine {
    pub algorithm: String,
    pub hex: String,
    pub file: String,
}

/// Parses Gentoo's DIGESTS text (already stripped of any clear-signature armor).
pub fn parse_digests(text: &str) -> Vec<DigestLine> {
    let mut out = Vec::new();
    let mut algorithm = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('#') {
            let words: Vec<&str> = rest.split_whitespace().collect();
            algorithm = match words.as_slice() {
                [algo, "HASH"] => Some(algo.to_ascii_uppercase()),
                _ => None,
            };
            continue;
        }
        let (Some(algo), Some((hex, file))) = (&algorithm, line.split_once(char::is_whitespace)) else { continue };
        let file = file.trim().trim_start_matches('*');
        out.push(DigestLine { algorithm: algo.clone(), hex: hex.to_ascii_lowercase(), file: file_name(file) });
    }
    out
}

/// Removes the clear-signature armor (for unverified use: without --keyring).
pub fn strip_clearsign(text: &str) -> String {
    if !text.trim_start().starts_with("-----BEGIN PGP SIGNED MESSAGE-----") {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut in_body = false;
    let mut past_headers = false;
    for line in text.lines() {
        if !in_body {
            if line.starts_with("-----BEGIN PGP SIGNED MESSAGE-----") {
                in_body = true;
            }
            continue;
        }
        if !past_headers {
            if line.is_empty() {
                past_headers = true;
            }
            continue;
        }
        if line.starts_with("-----BEGIN PGP SIGNATURE-----") {
            break;
        }
        out.push_str(line.strip_prefix("- ").unwrap_or(line));
        out.push('\n');
    }
    out
}

struct Helper {
    certs: Vec<sequoia_openpgp::Cert>,
}

impl sequoia_openpgp::parse::stream::VerificationHelper for Helper {
    fn get_certs(&mut self, _ids: &[sequoia_openpgp::KeyHandle]) -> sequoia_openpgp::Result<Vec<sequoia_openpgp::Cert>> {
        Ok(self.certs.clone())
    }

    fn check(&mut self, structure: sequoia_openpgp::parse::stream::MessageStructure) -> sequoia_openpgp::Result<()> {
        use sequoia_openpgp::parse::stream::MessageLayer;
        for layer in structure.into_iter() {
            if let MessageLayer::SignatureGroup { results } = layer {
                if results.iter().any(|r| r.is_ok()) {
                    return Ok(());
                }
                let why: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
                return Err(sequoia_openpgp::Error::InvalidOperation(format!("no valid signature: {}", why.join("; "))).into());
            }
        }
        Err(sequoia_openpgp::Error::InvalidOperation("the message carries no signature".into()).into())
    }
}

fn load_keyring(keyring: &Path) -> Result<Vec<sequoia_openpgp::Cert>, StageError> {
    use sequoia_openpgp::parse::Parse;
    let err = |e: &dyn std::fmt::Display| StageError::Keyring { keyring: keyring.to_owned(), source: SigError(e.to_string()) };
    let parser = sequoia_openpgp::cert::CertParser::from_file(keyring).map_err(|e| err(&e))?;
    let certs: Vec<_> = parser.collect::<Result<_, _>>().map_err(|e| err(&e))?;
    if certs.is_empty() {
        return Err(err(&"no certificates in it"));
    }
    Ok(certs)
}

/// Where Gentoo's release keys are installed (sec-keys/openpgp-keys-gentoo-release).
pub const GENTOO_RELEASE_KEYS: &str = "/usr/share/openpgp-keys/gentoo-release.asc";

/// The keyring a DIGESTS signature is checked against: `--keyring`, else Gentoo's release keys
/// where installed. Verification is the default; only `insecure` (`--insecure-no-signature`)
/// gives `None`, and without a keyring anywhere that is the only way on.
pub fn release_keyring(given: Option<&Path>, insecure: bool, digests: &str) -> Result<Option<PathBuf>, StageError> {
    if insecure {
        return Ok(None);
    }
    if let Some(k) = given {
        return Ok(Some(k.to_owned()));
    }
    let default = Path::new(GENTOO_RELEASE_KEYS);
    if default.is_file() {
        return Ok(Some(default.to_owned()));
    }
    Err(StageError::NoKeyring { digests: file_name(digests), default: default.to_owned() })
}

/// Returns the DIGESTS text to trust: verified against `keyring` when given (a clear signature, or
/// a detached `<digests>.asc` next to it), else with any clear-signature armor stripped.
pub fn digests_text(
    digests_path: &Path,
    digests_name: &str,
    detached_sig: Option<&Path>,
    keyring: Option<&Path>,
) -> Result<String, StageError> {
    use sequoia_openpgp::parse::Parse;
    use sequoia_openpgp::parse::stream::{DetachedVerifierBuilder, VerifierBuilder};
    let raw = fs_err::read(digests_path).map_err(|source| StageError::File(crate::util::fs::FileError::Read { path: digests_path.to_owned(), source }))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some(keyring) = keyring else { return Ok(strip_clearsign(&text)) };
    let certs = load_keyring(keyring)?;
    let policy = sequoia_openpgp::policy::StandardPolicy::new();
    let bad = |e: &dyn std::fmt::Display| StageError::BadSignature {
        digests: digests_name.to_owned(),
        keyring: keyring.to_owned(),
        source: SigError(e.to_string()),
    };
    if text.trim_start().starts_with("-----BEGIN PGP SIGNED MESSAGE-----") {
        let mut v = VerifierBuilder::from_bytes(&raw)
            .and_then(|b| b.with_policy(&policy, None, Helper { certs }))
            .map_err(|e| bad(&e))?;
        let mut content = String::new();
        v.read_to_string(&mut content).map_err(|e| bad(&e))?;
        if !v.message_processed() {
            return Err(bad(&"the signed message was not read to its end"));
        }
        return Ok(content);
    }
    let Some(sig) = detached_sig.filter(|p| p.is_file()) else {
        return Err(StageError::Unsigned { digests: digests_name.to_owned() });
    };
    let sig_bytes = fs_err::read(sig).map_err(|source| StageError::File(crate::util::fs::FileError::Read { path: sig.to_owned(), source }))?;
    let mut v = DetachedVerifierBuilder::from_bytes(&sig_bytes)
        .and_then(|b| b.with_policy(&policy, None, Helper { certs }))
        .map_err(|e| bad(&e))?;
    v.verify_bytes(&raw).map_err(|e| bad(&e))?;
    Ok(text)
}

/// The stage's verified digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub sha512: String,
    pub blake2b: Option<String>,
}

/// Checks `stage` (its file name in the DIGESTS is `stage_name`) against `digests`. Reads the file
/// once, computing every digest dbh knows.
pub fn verify(stage: &Path, stage_name: &str, digests: &str, digests_name: &str, reporter: &dyn Reporter) -> Result<Verified, StageError> {
    let lines: Vec<DigestLine> = parse_digests(digests).into_iter().filter(|l| l.file == stage_name).collect();
    let known: Vec<&DigestLine> = lines.iter().filter(|l| l.algorithm == "SHA512" || l.algorithm == "BLAKE2B").collect();
    if known.is_empty() {
        return Err(StageError::NoEntry { digests: digests_name.to_owned(), file: stage_name.to_owned() });
    }
    let mut f = fs_err::File::open(stage).map_err(|source| StageError::File(crate::util::fs::FileError::Read { path: stage.to_owned(), source }))?;
    let total = f.metadata().map(|m| m.len()).ok();
    let task = format!("verify:{}", stage.display());
    reporter.event(Event::Start { task: task.clone(), label: format!("verifying {stage_name}"), total, unit: Unit::Bytes });
    let mut sha = sha2::Sha512::new();
    let mut b2 = blake2::Blake2b512::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|source| StageError::File(crate::util::fs::FileError::Read { path: stage.to_owned(), source }))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        b2.update(&buf[..n]);
        pos += n as u64;
        reporter.event(Event::Progress { task: task.clone(), position: pos, message: None });
    }
    let sha512 = hex::encode(sha.finalize());
    let blake2b = hex::encode(b2.finalize());
    for line in &known {
        let (algorithm, actual): (&'static str, &str) =
            if line.algorithm == "SHA512" { ("SHA512", &sha512) } else { ("BLAKE2B", &blake2b) };
        if line.hex != actual {
            return Err(StageError::Mismatch {
                file: stage_name.to_owned(),
                digests: digests_name.to_owned(),
                algorithm,
                expected: line.hex.clone(),
                actual: actual.to_owned(),
            });
        }
    }
    reporter.event(Event::Finish { task, message: format!("{stage_name}: digests match") });
    Ok(Verified {
        sha512,
        blake2b: known.iter().any(|l| l.algorithm == "BLAKE2B").then_some(blake2b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Silent;

    const DIGESTS: &str = "# BLAKE2B HASH\nb2a  stage3-x.tar.xz.CONTENTS.gz\nB2B  stage3-x.tar.xz\n# SHA512 HASH\nshaa  stage3-x.tar.xz.CONTENTS.gz\nshab  stage3-x.tar.xz\n";

    #[test]
    fn picks_the_stage_lines_among_several_files() {
        let lines = parse_digests(DIGESTS);
        assert_eq!(lines.len(), 4);
        let mine: Vec<_> = lines.iter().filter(|l| l.file == "stage3-x.tar.xz").collect();
        assert_eq!(mine[0], &DigestLine { algorithm: "BLAKE2B".into(), hex: "b2b".into(), file: "stage3-x.tar.xz".into() });
        assert_eq!(mine[1].algorithm, "SHA512");
    }

    fn digests_for(data: &[u8], name: &str) -> String {
        format!(
            "# BLAKE2B HASH\n{}  {name}\n# SHA512 HASH\n{}  {name}\n",
            hex::encode(blake2::Blake2b512::digest(data)),
            hex::encode(sha2::Sha512::digest(data))
        )
    }

    #[test]
    fn verify_accepts_good_and_refuses_tampered_or_unlisted() {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("s.tar.xz");
        std::fs::write(&stage, b"stage contents").unwrap();
        let good = digests_for(b"stage contents", "s.tar.xz");
        let v = verify(&stage, "s.tar.xz", &good, "D", &Silent).unwrap();
        assert_eq!(v.sha512, hex::encode(sha2::Sha512::digest(b"stage contents")));
        std::fs::write(&stage, b"stage contentz").unwrap();
        let err = verify(&stage, "s.tar.xz", &good, "D", &Silent).unwrap_err();
        assert!(err.to_string().contains("does not match its BLAKE2B digest"), "{err}");
        let err = verify(&stage, "other.tar.xz", &good, "D", &Silent).unwrap_err();
        assert_eq!(err.to_string(), "the DIGESTS file D has no entry for `other.tar.xz`");
    }

    #[test]
    fn clearsign_armor_is_stripped() {
        let signed = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n# SHA512 HASH\nabc  f.tar.xz\n- -dash\n-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----\n";
        assert_eq!(strip_clearsign(signed), "# SHA512 HASH\nabc  f.tar.xz\n-dash\n");
    }

    fn signing_keypair(cert: &sequoia_openpgp::Cert) -> sequoia_openpgp::crypto::KeyPair {
        let policy = sequoia_openpgp::policy::StandardPolicy::new();
        cert.keys()
            .unencrypted_secret()
            .with_policy(&policy, None)
            .supported()
            .for_signing()
            .next()
            .unwrap()
            .key()
            .clone()
            .into_keypair()
            .unwrap()
    }

    /// A fresh signing certificate and a clear-signed `text`, as Gentoo's release tooling writes.
    fn signed(text: &str) -> (sequoia_openpgp::Cert, Vec<u8>) {
        use sequoia_openpgp::cert::CertBuilder;
        use sequoia_openpgp::serialize::stream::{Message, Signer};
        use std::io::Write;
        let (cert, _) = CertBuilder::general_purpose(Some("release <release@example.org>")).generate().unwrap();
        let keypair = signing_keypair(&cert);
        let mut sink = Vec::new();
        let mut signer = Signer::new(Message::new(&mut sink), keypair).unwrap().cleartext().build().unwrap();
        signer.write_all(text.as_bytes()).unwrap();
        signer.finalize().unwrap();
        (cert, sink)
    }

    fn keyring(dir: &Path, cert: &sequoia_openpgp::Cert) -> PathBuf {
        use sequoia_openpgp::serialize::Serialize;
        let path = dir.join("keys.asc");
        let mut f = std::fs::File::create(&path).unwrap();
        cert.armored().serialize(&mut f).unwrap();
        path
    }

    #[test]
    fn clear_signed_digests_verify_with_the_right_keyring_only() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, signed_bytes) = signed(DIGESTS);
        let digests = dir.path().join("s.DIGESTS");
        std::fs::write(&digests, &signed_bytes).unwrap();
        let good = keyring(dir.path(), &cert);
        let text = digests_text(&digests, "s.DIGESTS", None, Some(&good)).unwrap();
        assert_eq!(parse_digests(&text), parse_digests(DIGESTS));
        // Without a keyring the armor is stripped and the same lines come out.
        assert_eq!(parse_digests(&digests_text(&digests, "s.DIGESTS", None, None).unwrap()), parse_digests(DIGESTS));

        let (other, _) = signed("x");
        let wrong = keyring(&dir.path().join(""), &other);
        std::fs::rename(&wrong, dir.path().join("wrong.asc")).unwrap();
        let err = digests_text(&digests, "s.DIGESTS", None, Some(&dir.path().join("wrong.asc"))).unwrap_err();
        assert!(matches!(err, StageError::BadSignature { .. }), "{err}");

        // A changed line breaks the signature.
        let tampered = String::from_utf8(signed_bytes).unwrap().replace("shab", "shac");
        std::fs::write(&digests, tampered).unwrap();
        let good = keyring(dir.path(), &cert);
        let err = digests_text(&digests, "s.DIGESTS", None, Some(&good)).unwrap_err();
        assert!(matches!(err, StageError::BadSignature { .. }), "{err}");

        // Unsigned DIGESTS with --keyring and no .asc: refused.
        std::fs::write(&digests, DIGESTS).unwrap();
        let err = digests_text(&digests, "s.DIGESTS", Some(&dir.path().join("none.asc")), Some(&good)).unwrap_err();
        assert!(matches!(err, StageError::Unsigned { .. }), "{err}");
    }

    #[test]
    fn detached_asc_next_to_an_unsigned_digests_verifies() {
        use sequoia_openpgp::serialize::stream::{Armorer, Message, Signer};
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = signed("unused");
        let keypair = signing_keypair(&cert);
        let mut sig = Vec::new();
        {
            let message = Armorer::new(Message::new(&mut sig))
                .kind(sequoia_openpgp::armor::Kind::Signature)
                .build()
                .unwrap();
            let mut signer = Signer::new(message, keypair).unwrap().detached().build().unwrap();
            signer.write_all(DIGESTS.as_bytes()).unwrap();
            signer.finalize().unwrap();
        }
        let digests = dir.path().join("s.DIGESTS");
        let asc = dir.path().join("s.DIGESTS.asc");
        std::fs::write(&digests, DIGESTS).unwrap();
        std::fs::write(&asc, &sig).unwrap();
        let ring = keyring(dir.path(), &cert);
        assert_eq!(digests_text(&digests, "s.DIGESTS", Some(&asc), Some(&ring)).unwrap(), DIGESTS);
        std::fs::write(&digests, DIGESTS.replace("shab", "shac")).unwrap();
        let err = digests_text(&digests, "s.DIGESTS", Some(&asc), Some(&ring)).unwrap_err();
        assert!(matches!(err, StageError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn file_names_of_urls_and_paths() {
        assert_eq!(file_name("http://h/a/b/stage3.tar.xz?x=1"), "stage3.tar.xz");
        assert_eq!(file_name("/tmp/s.tar.xz"), "s.tar.xz");
    }
}

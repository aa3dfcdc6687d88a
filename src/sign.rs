//! The binhost's OpenPGP signing key and signatures in the form Portage verifies with GnuPG:
//! armored detached signatures (`<member>.sig`) and clear-signed text (the GPKG `Manifest`),
//! SHA512 digests like Portage's `BINPKG_GPG_SIGNING_DIGEST`.
//!
//! The key is an ed25519 primary key that certifies and signs (OpenPGP v4, what GnuPG 2.2 reads),
//! no expiry, kept in `$DBH_HOME/keys/secret.asc` (armored TSK, mode 0600, written atomically) with
//! `public.asc` beside it, and its revocation certificate in `revocation.asc` (mode 0600).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::crypto::KeyPair;
use openpgp::parse::stream::{
    DetachedVerifierBuilder, MessageLayer, MessageStructure, VerificationHelper, VerifierBuilder,
};
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::stream::{Armorer, Message, Signer as StreamSigner};
use openpgp::serialize::SerializeInto;
use openpgp::types::{HashAlgorithm, KeyFlags};
use openpgp::anyhow;
use openpgp::{Cert, KeyHandle};

use crate::hint::Hint;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("there is no signing key in {dir}")]
    NoKey { dir: PathBuf },
    #[error("a signing key already exists in {dir}")]
    Exists { dir: PathBuf },
    #[error("cannot read the signing key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the signing key {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a usable OpenPGP key: {reason}")]
    BadKey { what: String, reason: String },
    #[error("cannot create the signing key: {0}")]
    Generate(String),
    #[error("OpenPGP signing with key {fingerprint} failed: {reason}")]
    Signing { fingerprint: String, reason: String },
    #[error("the signature does not verify: {0}")]
    BadSignature(String),
    #[error("the signature was made by a key that is not trusted here ({0})")]
    UnknownKey(String),
}

impl Hint for SignError {
    fn hint(&self) -> Option<String> {
        match self {
            SignError::NoKey { .. } => Some("run `dbh key generate`".into()),
            SignError::Exists { .. } => Some(
                "pass --force to replace it (clients must then import the new key from `dbh key export`)".into(),
            ),
            SignError::UnknownKey(_) => Some("import the binhost's public key (`dbh key export`)".into()),
            _ => None,
        }
    }
}

fn policy() -> &'static StandardPolicy<'static> {
    static P: StandardPolicy<'static> = StandardPolicy::new();
    &P
}

fn pgp_reason(e: impl std::fmt::Display) -> String {
    // anyhow chains print their causes with `{:#}`; plain Display is enough for sequoia's errors.
    e.to_string()
}

/// The key files in `$DBH_HOME/keys`.
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> KeyStore {
        KeyStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.join("secret.asc")
    }

    /// The key's revocation certificate (`gpg --import` it to revoke the key).
    pub fn revocation_path(&self) -> PathBuf {
        self.dir.join("revocation.asc")
    }

    pub fn public_path(&self) -> PathBuf {
        self.dir.join("public.asc")
    }

    pub fn exists(&self) -> bool {
        self.secret_path().is_file()
    }

    /// Creates an ed25519 signing key without expiry; refuses to replace one unless `force`.
    /// Returns the fingerprint (40 upper-case hex digits).
    pub fn generate(&self, uid: &str, force: bool) -> Result<String, SignError> {
        if self.exists() && !force {
            return Err(SignError::Exists { dir: self.dir.clone() });
        }
        let (cert, revocation) = CertBuilder::new()
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
            .set_validity_period(None)
            .add_userid(uid)
            .generate()
            .map_err(|e| SignError::Generate(pgp_reason(e)))?;
        let secret = cert.as_tsk().armored().to_vec().map_err(|e| SignError::Generate(pgp_reason(e)))?;
        let public = cert.armored().to_vec().map_err(|e| SignError::Generate(pgp_reason(e)))?;
        fs_err::create_dir_all(&self.dir).map_err(|source| SignError::Write { path: self.dir.clone(), source })?;
        // The secret key is the truth (`export` derives the public key from it): write it first.
        write_atomic(&self.secret_path(), &secret, 0o600)?;
        // Kept, not dropped: the only way to withdraw the key from clients if the secret is lost
        // or leaks. 0600 like the secret: anyone who reads it can revoke the binhost's key.
        write_atomic(&self.revocation_path(), &armored_revocation(&cert, revocation)?, 0o600)?;
        write_atomic(&self.public_path(), &public, 0o644)?;
        Ok(cert.fingerprint().to_hex())
    }

    fn load(&self) -> Result<Cert, SignError> {
        let path = self.secret_path();
        if !path.exists() {
            return Err(SignError::NoKey { dir: self.dir.clone() });
        }
        let bytes = fs_err::read(&path).map_err(|source| SignError::Read { path: path.clone(), source })?;
        Cert::from_bytes(&bytes)
            .map_err(|e| SignError::BadKey { what: path.display().to_string(), reason: pgp_reason(e) })
    }

    /// The key ready to sign.
    pub fn signer(&self) -> Result<Signer, SignError> {
        Signer::from_cert(self.load()?, &self.secret_path().display().to_string())
    }

    /// The public key, ASCII-armored (what clients import).
    pub fn public_armored(&self) -> Result<String, SignError> {
        let cert = self.load()?;
        let bytes = cert.armored().to_vec().map_err(|e| SignError::BadKey {
            what: self.secret_path().display().to_string(),
            reason: pgp_reason(e),
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn fingerprint(&self) -> Result<String, SignError> {
        Ok(self.load()?.fingerprint().to_hex())
    }
}

/// Writes a file by temp + fsync + rename in its directory, with `mode` from the start.
/// A revocation certificate as `gpg --gen-revoke` and `sq` write it: the bare key revocation
/// signature, armored as a public key block.
fn armored_revocation(cert: &Cert, revocation: openpgp::packet::Signature) -> Result<Vec<u8>, SignError> {
    use openpgp::serialize::Serialize;
    let comment = format!("Revocation certificate for {}", cert.fingerprint().to_hex());
    let fail = |e: &dyn std::fmt::Display| SignError::Generate(pgp_reason(e));
    let mut w = openpgp::armor::Writer::with_headers(Vec::new(), openpgp::armor::Kind::PublicKey, [("Comment", comment.as_str())])
        .map_err(|e| fail(&e))?;
    openpgp::Packet::Signature(revocation).serialize(&mut w).map_err(|e| fail(&e))?;
    w.finalize().map_err(|e| fail(&e))
}

/// The key files, atomically and durably, with exactly `mode` (0600 for the secret key).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), SignError> {
    crate::util::fs::write_atomic_mode(path, data, mode).map_err(|source| SignError::Write { path: path.to_owned(), source })
}

/// A secret key able to sign.
pub struct Signer {
    cert: Cert,
    keypair: KeyPair,
}

impl Signer {
    /// From a certificate with secret key material; `what` names it in errors.
    pub fn from_cert(cert: Cert, what: &str) -> Result<Signer, SignError> {
        let bad = |reason: String| SignError::BadKey { what: what.to_owned(), reason };
        let key = cert
            .keys()
            .with_policy(policy(), None)
            .secret()
            .alive()
            .revoked(false)
            .for_signing()
            .next()
            .ok_or_else(|| bad("it has no valid signing key with secret material".into()))?;
        let keypair = key.key().clone().into_keypair().map_err(|e| bad(pgp_reason(e)))?;
        Ok(Signer { cert, keypair })
    }

    /// A fresh key held only in memory (tests).
    pub fn generate_ephemeral(uid: &str) -> Result<Signer, SignError> {
        let (cert, _) = CertBuilder::new()
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
            .add_userid(uid)
            .generate()
            .map_err(|e| SignError::Generate(pgp_reason(e)))?;
        Signer::from_cert(cert, "generated key")
    }

    pub fn fingerprint(&self) -> String {
        self.cert.fingerprint().to_hex()
    }

    fn failed(&self, e: impl std::fmt::Display) -> SignError {
        SignError::Signing { fingerprint: self.fingerprint(), reason: pgp_reason(e) }
    }

    /// Starts an armored detached signature over data written to the returned stream; finish it
    /// with [`DetachedSigning::finish`]. Streams, so an image of any size is signed in one pass.
    pub fn detached(&self) -> Result<DetachedSigning<'_>, SignError> {
        DetachedSigning::new(self)
    }

    /// An armored detached signature (`-----BEGIN PGP SIGNATURE-----`), what `gpg --sign --armor
    /// --detach-sig` writes for a GPKG member.
    pub fn sign_detached_armored(&self, data: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut s = self.detached()?;
        s.write_all(data).map_err(|e| self.failed(e))?;
        s.finish()
    }

    /// A clear-signed message (`-----BEGIN PGP SIGNED MESSAGE-----`), what `gpg --clear-sign`
    /// writes for the Manifest.
    pub fn sign_cleartext(&self, text: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut out = Vec::new();
        {
            let message = Message::new(&mut out);
            let mut signer = StreamSigner::new(message, self.keypair.clone())
                .and_then(|s| s.cleartext().hash_algo(HashAlgorithm::SHA512))
                .and_then(|s| s.build())
                .map_err(|e| self.failed(e))?;
            signer.write_all(text).map_err(|e| self.failed(e))?;
            signer.finalize().map_err(|e| self.failed(e))?;
        }
        Ok(out)
    }

    /// A verifier that trusts exactly this key.
    pub fn verifier(&self) -> Verifier {
        Verifier { certs: vec![self.cert.clone().strip_secret_key_material()] }
    }
}

/// An armored detached signature in progress: write the data, then [`DetachedSigning::finish`].
pub struct DetachedSigning<'a> {
    signer: &'a Signer,
    message: Option<Message<'static>>,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// A `Write` that appends to shared bytes, so the signing stream can own its sink.
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> DetachedSigning<'a> {
    fn new(signer: &'a Signer) -> Result<Self, SignError> {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let message = Message::new(Shared(out.clone()));
        let message = Armorer::new(message)
            .kind(openpgp::armor::Kind::Signature)
            .build()
            .and_then(|m| StreamSigner::new(m, signer.keypair.clone()))
            .and_then(|s| s.detached().hash_algo(HashAlgorithm::SHA512))
            .and_then(|s| s.build())
            .map_err(|e| signer.failed(e))?;
        Ok(DetachedSigning { signer, message: Some(message), out })
    }

    /// Ends the data; returns the armored signature.
    pub fn finish(mut self) -> Result<Vec<u8>, SignError> {
        let message = self.message.take().expect("finish is called once");
        message.finalize().map_err(|e| self.signer.failed(e))?;
        let out = std::mem::take(&mut *self.out.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(out)
    }
}

impl Write for DetachedSigning<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.message.as_mut().expect("not finished").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.message.as_mut().expect("not finished").flush()
    }
}

/// The certificates whose signatures count as good.
#[derive(Clone)]
pub struct Verifier {
    certs: Vec<Cert>,
}

struct Helper<'a> {
    certs: &'a [Cert],
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, _ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.certs.to_vec())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        let mut problems = Vec::new();
        for layer in structure {
            if let MessageLayer::SignatureGroup { results } = layer {
                for r in results {
                    match r {
                        Ok(_) => return Ok(()),
                        Err(e) => problems.push(e.to_string()),
                    }
                }
            }
        }
        if problems.is_empty() {
            problems.push("no signature found".into());
        }
        Err(anyhow::anyhow!(problems.join("; ")))
    }
}

fn verify_error(e: anyhow::Error) -> SignError {
    let text = format!("{e:#}");
    if text.contains("Missing key") || text.contains("missing key") || text.contains("No key") {
        SignError::UnknownKey(text)
    } else {
        SignError::BadSignature(text)
    }
}

impl Verifier {
    /// From one or more armored (or binary) public keys.
    pub fn from_armored(data: &[u8]) -> Result<Verifier, SignError> {
        let bad = |e: anyhow::Error| SignError::BadKey { what: "the given public key".into(), reason: pgp_reason(e) };
        let certs: Vec<Cert> = openpgp::cert::CertParser::from_bytes(data)
            .map_err(bad)?
            .collect::<openpgp::Result<Vec<Cert>>>()
            .map_err(bad)?;
        if certs.is_empty() {
            return Err(SignError::BadKey { what: "the given public key".into(), reason: "it holds no certificate".into() });
        }
        Ok(Verifier { certs })
    }

    pub fn fingerprints(&self) -> Vec<String> {
        self.certs.iter().map(|c| c.fingerprint().to_hex()).collect()
    }

    /// Checks a detached signature (armored or binary) over `data`.
    pub fn verify_detached(&self, data: &[u8], sig: &[u8]) -> Result<(), SignError> {
        self.verify_detached_reader(data, sig)
    }

    /// Checks a detached signature over a stream (a whole image, read once).
    pub fn verify_detached_reader(&self, data: impl Read + Send + Sync, sig: &[u8]) -> Result<(), SignError> {
        let mut v = DetachedVerifierBuilder::from_bytes(sig)
            .map_err(|e| SignError::BadSignature(format!("{e:#}")))?
            .with_policy(policy(), None, Helper { certs: &self.certs })
            .map_err(verify_error)?;
        v.verify_reader(data).map_err(verify_error)
    }

    /// Checks a clear-signed message and returns the signed text (what the signature covers).
    pub fn verify_cleartext(&self, signed: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut v = VerifierBuilder::from_bytes(signed)
            .map_err(|e| SignError::BadSignature(format!("{e:#}")))?
            .with_policy(policy(), None, Helper { certs: &self.certs })
            .map_err(verify_error)?;
        let mut text = Vec::new();
        v.read_to_end(&mut text).map_err(|e| verify_error(anyhow::Error::from(e)))?;
        if !v.message_processed() {
            return Err(SignError::BadSignature("the signed message is incomplete".into()));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_and_cleartext_round_trip() {
        let s = Signer::generate_ephemeral("t <t@invalid>").unwrap();
        let v = s.verifier();
        let sig = s.sign_detached_armored(b"data").unwrap();
        assert!(sig.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
        v.verify_detached(b"data", &sig).unwrap();
        assert!(v.verify_detached(b"datA", &sig).is_err());
        let signed = s.sign_cleartext(b"DATA a 1\n- dash\n").unwrap();
        assert!(signed.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n"));
        assert_eq!(v.verify_cleartext(&signed).unwrap(), b"DATA a 1\n- dash\n");
        let tampered = String::from_utf8(signed).unwrap().replace("DATA a 1", "DATA a 2");
        assert!(v.verify_cleartext(tampered.as_bytes()).is_err());
        let other = Signer::generate_ephemeral("o <o@invalid>").unwrap();
        assert!(other.verifier().verify_detached(b"data", &sig).is_err());
    }

    #[test]
    fn keystore_generates_once_and_protects_the_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::new(dir.path().join("keys"));
        assert!(!ks.exists());
        let err = ks.signer().err().unwrap();
        assert_eq!(err.hint().as_deref(), Some("run `dbh key generate`"));
        let fpr = ks.generate("x <x@invalid>", false).unwrap();
        assert_eq!(fpr.len(), 40);
        assert_eq!(ks.fingerprint().unwrap(), fpr);
        let mode = std::fs::metadata(ks.secret_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(ks.generate("x", false), Err(SignError::Exists { .. })));
        let s = ks.signer().unwrap();
        let v = Verifier::from_armored(ks.public_armored().unwrap().as_bytes()).unwrap();
        v.verify_detached(b"x", &s.sign_detached_armored(b"x").unwrap()).unwrap();
        let fpr2 = ks.generate("y", true).unwrap();
        assert_ne!(fpr, fpr2);
    }
}

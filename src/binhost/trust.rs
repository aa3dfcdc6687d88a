//! The client's trust script (`GET /<target>/trust.sh`, `dbh binhost conf --trust-script`): a POSIX
//! sh program a Gentoo client runs as root to make Portage trust the binhost's signing key without
//! breaking Gentoo's own binhost trust.
//!
//! Gentoo's contract (app-portage/getuto, Portage's `PORTAGE_TRUST_HELPER`, run before every
//! `--getbinpkg`): `${ROOT}/etc/portage/gnupg` is created by getuto *only when it does not exist*,
//! with a local "Portage Local Trust Key" whose passphrase is in `gnupg/pass`; getuto imports
//! `${ROOT}/usr/share/openpgp-keys/gentoo-release.asc` and locally signs (lsign) those keys with it.
//! Validity comes from that local signature, not from ownertrust. Later runs only re-import the
//! release keys (and, with `GETUTO_EXTERNAL_REFRESH=1`, refresh from keyservers with timeouts), so a
//! key lsigned by the local key stays valid. A keyring created any other way first (the old
//! "import + ownertrust" steps) leaves the release keys out and Gentoo's binhost stops verifying.
//!
//! The script therefore:
//! 1. checks the embedded key against the fingerprint written into it (and against
//!    `DBH_FINGERPRINT` if the user passes one obtained out of band) in a scratch homedir, before
//!    touching anything;
//! 2. if the keyring does not exist: runs getuto when it is installed, else creates the keyring with
//!    getuto's exact steps (local trust key, `pass`, `mykeyid`, release keys lsigned if present);
//! 3. imports the binhost key and lsigns it with the local key (`--passphrase-file pass`,
//!    `--pinentry-mode loopback`) unless that local signature already exists (idempotent);
//! 4. checks the result: the key must be fully valid, the trustdb world-readable (Portage runs gpg
//!    as `nobody`).
//!
//! It uses no network: the key is in the script; getuto is run with `GETUTO_EXTERNAL_REFRESH`
//! defaulting to 0 (getuto's own default since 2025; when enabled getuto bounds it with `timeout`).

use crate::hint::Hint;
use crate::sign::Verifier;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("the binhost key for target `{target}` cannot go into a trust script: {reason}")]
    BadKey { target: String, reason: String },
    #[error("target name {target:?} cannot be written into a shell script")]
    BadTarget { target: String },
}

impl Hint for TrustError {
    fn hint(&self) -> Option<String> {
        match self {
            TrustError::BadKey { .. } => {
                Some("check `dbh key export`: it must print exactly one ASCII-armored public key".into())
            }
            TrustError::BadTarget { .. } => None,
        }
    }
}

/// What the script is written for.
#[derive(Debug, Clone)]
pub struct TrustInput<'a> {
    pub target: &'a str,
    /// The binhost's `sync-uri` (for the script's comments only; the script needs no network).
    pub sync_uri: Option<&'a str>,
    /// The binhost's public key, ASCII-armored (`dbh key export`).
    pub public_key: &'a str,
}

/// The heredoc terminator for the embedded key; a key containing it is refused.
const KEY_END: &str = "DBH_BINHOST_KEY_END";

/// What the script does, in the words the stanza, the HTML page and the script's header use.
pub fn summary(fingerprint: &str) -> Vec<String> {
    vec![
        "Runs as root on the client; ROOT=/path works on another root, as with getuto.".into(),
        "If ${ROOT}/etc/portage/gnupg does not exist: runs getuto when it is installed (Gentoo's keyring with the release keys), otherwise creates that keyring the way getuto does.".into(),
        format!("Imports the binhost key only if its fingerprint is {fingerprint}, and locally signs it with getuto's local trust key (gnupg/pass), so Portage trusts it and later getuto runs keep it trusted."),
        "Safe to run again; needs no network; a damaged key or a wrong fingerprint stops it with an error.".into(),
    ]
}

/// The single fingerprint of `public_key` (40 upper-case hex digits).
pub fn fingerprint(target: &str, public_key: &str) -> Result<String, TrustError> {
    let bad = |reason: String| TrustError::BadKey { target: target.to_owned(), reason };
    // The armor reader stops after the first block; a second one would be imported by gpg unchecked.
    let blocks = public_key.matches("-----BEGIN PGP").count();
    if blocks > 1 {
        return Err(bad(format!("it holds {blocks} armored blocks, expected one")));
    }
    let verifier = Verifier::from_armored(public_key.as_bytes()).map_err(|e| bad(e.to_string()))?;
    match verifier.fingerprints().as_slice() {
        [one] => Ok(one.to_uppercase()),
        many => Err(bad(format!("it holds {} keys, expected one", many.len()))),
    }
}

/// The POSIX sh trust script.
pub fn script(input: &TrustInput<'_>) -> Result<String, TrustError> {
    let target = input.target;
    if target.is_empty() || !target.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c)) {
        return Err(TrustError::BadTarget { target: target.to_owned() });
    }
    let key = input.public_key.trim();
    let bad = |reason: &str| TrustError::BadKey { target: target.to_owned(), reason: reason.to_owned() };
    if !key.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----") || !key.ends_with("-----END PGP PUBLIC KEY BLOCK-----")
    {
        return Err(bad("it is not an ASCII-armored public key block"));
    }
    if key.lines().any(|l| l.trim() == KEY_END) || key.contains('\'') {
        return Err(bad("it contains text that would end the script's here-document"));
    }
    let fpr = fingerprint(target, key)?;
    let mut header = String::new();
    header.push_str(&format!("# dbh trust script for the binhost of target `{target}`"));
    if let Some(uri) = input.sync_uri {
        if uri.contains(['\n', '\'']) {
            return Err(bad("the sync URI contains a newline or quote"));
        }
        header.push_str(&format!(" ({uri})"));
    }
    header.push_str(".\n#\n");
    for line in summary(&fpr) {
        header.push_str(&format!("# {line}\n"));
    }
    header.push_str(
        "#\n# Pass DBH_FINGERPRINT=<fingerprint from the binhost's operator> to check it against yours as well.\n\
         # GETUTO=/path/to/getuto picks the getuto program (default: `getuto` on PATH).\n",
    );
    Ok(format!(
        "#!/bin/sh\n{header}{body}",
        body = BODY.replace("@TARGET@", target).replace("@FPR@", &fpr).replace("@KEY@", key).replace("@KEY_END@", KEY_END)
    ))
}

/// The script after its header. `@…@` are filled in by [`script`]; everything else is literal sh.
const BODY: &str = r#"
set -eu

DBH_TARGET='@TARGET@'
DBH_FPR='@FPR@'

die() {
	printf 'dbh trust.sh (%s): error: %s\n' "$DBH_TARGET" "$*" >&2
	exit 1
}
say() {
	printf 'dbh trust.sh (%s): %s\n' "$DBH_TARGET" "$*"
}

[ "$(id -u)" = 0 ] || die "run this script as root: Portage's keyring belongs to root (getuto requires it too)"
command -v gpg >/dev/null 2>&1 || die "gpg is not installed (app-crypt/gnupg)"

ROOT_DIR=${ROOT:-}
ROOT_DIR=${ROOT_DIR%/}
GNUPGHOME="$ROOT_DIR/etc/portage/gnupg"
export GNUPGHOME
RELEASE_KEYS="$ROOT_DIR/usr/share/openpgp-keys/gentoo-release.asc"
GPG="gpg --batch --no-tty --quiet --no-permission-warning"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dbh-trust.XXXXXX") || die "cannot create a temporary directory"
cleanup() {
	GNUPGHOME="$SCRATCH/check" gpgconf --kill all >/dev/null 2>&1 || true
	rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

cat > "$SCRATCH/key.asc" <<'@KEY_END@'
@KEY@
@KEY_END@

# 1. The key must be intact and be the one this script was written for, before anything changes.
mkdir -m 0700 "$SCRATCH/check"
if ! GNUPGHOME="$SCRATCH/check" $GPG --import "$SCRATCH/key.asc" 2>"$SCRATCH/import.err"; then
	cat "$SCRATCH/import.err" >&2
	die "the binhost key in this script is damaged (gpg cannot import it); download trust.sh again from the binhost"
fi
found=$(GNUPGHOME="$SCRATCH/check" $GPG --with-colons --list-keys 2>/dev/null \
	| awk -F: '$1 == "pub" { want = 1; next } want && $1 == "fpr" { print $10; want = 0 }')
[ -n "$found" ] || die "the binhost key in this script holds no usable key (damaged?); download trust.sh again from the binhost"
[ "$(printf '%s\n' "$found" | wc -l)" -eq 1 ] || die "the binhost key in this script holds more than one key: $(echo $found)"
[ "$found" = "$DBH_FPR" ] || die "the binhost key in this script has fingerprint $found, not $DBH_FPR as written in it: the script was altered; do not trust it"
if [ -n "${DBH_FINGERPRINT:-}" ]; then
	expected=$(printf '%s' "$DBH_FINGERPRINT" | tr -d ' :' | tr 'abcdef' 'ABCDEF')
	[ "$expected" = "$DBH_FPR" ] || die "the binhost key has fingerprint $DBH_FPR, not $expected (DBH_FINGERPRINT): do not trust this binhost until its operator confirms the key"
fi
GNUPGHOME="$SCRATCH/check" gpgconf --kill all >/dev/null 2>&1 || true

# 2. Gentoo's keyring: getuto creates it only when it does not exist, so it must come first.
if [ ! -d "$GNUPGHOME" ]; then
	getuto_prog=${GETUTO:-getuto}
	if command -v "$getuto_prog" >/dev/null 2>&1; then
		say "running $getuto_prog to create $GNUPGHOME with Gentoo's release keys"
		GETUTO_EXTERNAL_REFRESH=${GETUTO_EXTERNAL_REFRESH:-0} "$getuto_prog" \
			|| die "$getuto_prog failed to create $GNUPGHOME (its output is above)"
		[ -d "$GNUPGHOME" ] || die "$getuto_prog ran but did not create $GNUPGHOME"
	else
		say "getuto is not installed: creating $GNUPGHOME the way getuto does"
		stage="$GNUPGHOME.dbh.tmp"
		rm -rf "$stage"
		mkdir -p "$stage"
		chmod u=rwx,go=rx "$stage"
		printf 'honor-http-proxy\nno-use-tor\nstandard-resolver\nresolver-timeout 90\nconnect-timeout 90\n' > "$stage/dirmngr.conf"
		printf 'disable-scdaemon\n' > "$stage/gpg-agent.conf"
		printf 'no-greeting\n' > "$stage/gpg.conf"
		pass=$(GNUPGHOME="$stage" $GPG --gen-random --armor 1 32) || die "gpg cannot make a passphrase"
		( umask 077
		  cat > "$SCRATCH/keyparams" <<EOF
%echo Generating Portage local OpenPGP trust key
Key-Type: RSA
Key-Length: 3072
Subkey-Type: RSA
Subkey-Length: 3072
Name-Real: Portage Local Trust Key
Name-Comment: local signing only
Name-Email: portage@localhost
Expire-Date: 0
Passphrase: $pass
%commit
%echo done
EOF
		  printf '%s\n' "$pass" > "$stage/pass" )
		GNUPGHOME="$stage" $GPG --generate-key "$SCRATCH/keyparams" || die "gpg cannot create the local trust key"
		rm -f "$SCRATCH/keyparams"
		GNUPGHOME="$stage" $GPG --list-secret-keys --with-colons \
			| awk -F: '$1 == "sec" { want = 1; next } want && $1 == "fpr" { print $10; want = 0 }' > "$stage/mykeyid"
		stage_key=$(cat "$stage/mykeyid")
		[ -n "$stage_key" ] || die "gpg made no local trust key in $stage"
		if [ -f "$RELEASE_KEYS" ]; then
			GNUPGHOME="$stage" $GPG --import "$RELEASE_KEYS" || die "cannot import $RELEASE_KEYS"
			for rel in $(GNUPGHOME="$stage" $GPG --list-keys --with-colons \
				| awk -F: '$1 == "pub" { want = 1; next } want && $1 == "fpr" { print $10; want = 0 }' \
				| grep -v "$stage_key"); do
				GNUPGHOME="$stage" $GPG --yes --passphrase-file "$stage/pass" --pinentry-mode loopback \
					-u "$stage_key" --quick-lsign-key "$rel" >/dev/null || die "cannot locally sign release key $rel"
			done
		fi
		GNUPGHOME="$stage" $GPG --check-trustdb 2>/dev/null
		chmod ugo+r "$stage/trustdb.gpg"
		GNUPGHOME="$stage" gpgconf --kill all >/dev/null 2>&1 || true
		mv "$stage" "$GNUPGHOME"
		touch "$GNUPGHOME/.getuto.last"
	fi
fi

# 3. The local trust key getuto made, and its passphrase.
[ -f "$GNUPGHOME/pass" ] || die "$GNUPGHOME has no pass file, so it was not made by getuto (old dbh steps?). Gentoo's release keys may be missing from it: move it away (mv $GNUPGHOME $GNUPGHOME.old) and run this script again"
mykey=""
# getuto's mykeyid lists the primary key's fingerprint first, then its subkey's.
[ -f "$GNUPGHOME/mykeyid" ] && mykey=$(head -n 1 "$GNUPGHOME/mykeyid")
if [ -z "$mykey" ]; then
	mykey=$($GPG --list-secret-keys --with-colons \
		| awk -F: '$1 == "sec" { want = 1; next } want && $1 == "fpr" { print $10; exit }')
fi
[ -n "$mykey" ] || die "$GNUPGHOME has no local trust key: move it away (mv $GNUPGHOME $GNUPGHOME.old) and run this script again"

$GPG --import "$SCRATCH/key.asc" 2>"$SCRATCH/import.err" || { cat "$SCRATCH/import.err" >&2; die "cannot import the binhost key into $GNUPGHOME"; }

mykey16=$(printf '%s' "$mykey" | awk '{ print substr($0, length($0) - 15) }')
if $GPG --with-colons --list-sigs "$DBH_FPR" 2>/dev/null \
	| awk -F: -v k="$mykey16" '$1 == "sig" && $5 == k && $11 ~ /l$/ { found = 1 } END { exit !found }'; then
	say "key $DBH_FPR is already locally signed by $mykey"
else
	$GPG --yes --passphrase-file "$GNUPGHOME/pass" --pinentry-mode loopback -u "$mykey" \
		--quick-lsign-key "$DBH_FPR" >"$SCRATCH/sign.err" 2>&1 \
		|| { cat "$SCRATCH/sign.err" >&2; die "cannot locally sign the binhost key with $mykey (wrong $GNUPGHOME/pass?)"; }
	say "locally signed key $DBH_FPR with the local trust key $mykey"
fi

# 4. Portage needs GOODSIG plus TRUST_FULLY/ULTIMATE, and reads the keyring as `nobody`.
$GPG --check-trustdb 2>/dev/null || true
chmod ugo+r "$GNUPGHOME/trustdb.gpg"
[ -f "$GNUPGHOME/pubring.kbx" ] && chmod ugo+r "$GNUPGHOME/pubring.kbx"
validity=$($GPG --with-colons --list-keys "$DBH_FPR" 2>/dev/null | awk -F: '$1 == "pub" { print $2; exit }')
gpgconf --kill all >/dev/null 2>&1 || true
case "$validity" in
	f|u) say "Portage now trusts binpkgs signed by $DBH_FPR (keyring $GNUPGHOME)" ;;
	*) die "key $DBH_FPR has validity '$validity' in $GNUPGHOME, not full: is the local trust key ultimately trusted? (gpg --homedir $GNUPGHOME --list-secret-keys)" ;;
esac
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::KeyStore;

    fn key(dir: &std::path::Path) -> (String, String) {
        let store = KeyStore::new(dir);
        let fpr = store.generate("dbh test <dbh@example.org>", false).unwrap();
        (store.public_armored().unwrap(), fpr)
    }

    #[test]
    fn the_script_embeds_the_key_and_its_fingerprint() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, fpr) = key(tmp.path());
        let text = script(&TrustInput { target: "arm64", sync_uri: Some("http://h/arm64/"), public_key: &key }).unwrap();
        assert!(text.starts_with("#!/bin/sh\n# dbh trust script for the binhost of target `arm64` (http://h/arm64/)."));
        assert!(text.contains(&format!("DBH_FPR='{}'\n", fpr.to_uppercase())));
        assert!(text.contains(key.trim()));
        assert!(!text.contains("@KEY@"));
        assert!(!text.contains("@FPR@") && !text.contains("@TARGET@") && !text.contains("@KEY_END@"));
        // POSIX sh must accept it.
        let st = std::process::Command::new("sh").arg("-n").arg("-c").arg(&text).status().unwrap();
        assert!(st.success());
    }

    #[test]
    fn bad_inputs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _) = key(&tmp.path().join("a"));
        assert!(matches!(
            script(&TrustInput { target: "a'b", sync_uri: None, public_key: &key }),
            Err(TrustError::BadTarget { .. })
        ));
        assert!(matches!(
            script(&TrustInput { target: "arm64", sync_uri: None, public_key: "not a key" }),
            Err(TrustError::BadKey { .. })
        ));
        let two = format!("{key}\n{}", self::key(&tmp.path().join("b")).0);
        assert!(matches!(fingerprint("arm64", &two), Err(TrustError::BadKey { .. })));
    }
}

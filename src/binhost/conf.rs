//! `dbh binhost conf`: the `binrepos.conf` stanza a client needs for a target's binhost, and, as
//! comments, how to make Portage trust the signing key (what `getuto` does on Gentoo systems).

use super::BinhostError;

/// What the stanza needs to know.
#[derive(Debug, Clone)]
pub struct ConfInput<'a> {
    pub target: &'a str,
    /// The server's base URL (the target's path is appended).
    pub url: &'a str,
    pub priority: i64,
    /// `None` for an unsigned binhost (`verify-signature = false`).
    pub fingerprint: Option<&'a str>,
}

/// `URL/<target>/` with exactly one slash between the parts.
pub fn sync_uri(url: &str, target: &str) -> Result<String, BinhostError> {
    let trimmed = url.trim();
    let scheme_ok = ["http://", "https://"].iter().any(|s| {
        trimmed.len() > s.len() && trimmed[..s.len()].eq_ignore_ascii_case(s)
    });
    if !scheme_ok || trimmed.contains(char::is_whitespace) {
        return Err(BinhostError::BadUrl { url: url.to_owned() });
    }
    Ok(format!("{}/{}/", trimmed.trim_end_matches('/'), target))
}

/// The stanza, ready for `/etc/portage/binrepos.conf/dbh-<target>.conf`.
pub fn render(input: &ConfInput<'_>) -> Result<String, BinhostError> {
    let uri = sync_uri(input.url, input.target)?;
    let name = format!("dbh-{}", input.target);
    let mut out = String::new();
    out.push_str(&format!(
        "# dbh binhost for target `{t}`: save as /etc/portage/binrepos.conf/{name}.conf\n",
        t = input.target
    ));
    match input.fingerprint {
        Some(fpr) => {
            out.push_str(&format!(
                "#\n\
                 # Packages are signed with the OpenPGP key {fpr}.\n\
                 # Portage accepts them only when that key is in /etc/portage/gnupg with full or\n\
                 # ultimate trust. The key: `dbh key export` on the binhost, or {uri}key.asc\n\
                 # As root on the client:\n\
                 #   wget -O /tmp/dbh-{t}.asc {uri}key.asc\n\
                 #   gpg --show-keys --with-fingerprint /tmp/dbh-{t}.asc   # must show {fpr}\n\
                 #   install -d -m 0755 /etc/portage/gnupg\n\
                 #   gpg --homedir /etc/portage/gnupg --batch --import /tmp/dbh-{t}.asc\n\
                 #   echo {fpr}:6: | gpg --homedir /etc/portage/gnupg --batch --import-ownertrust\n\
                 #   gpg --homedir /etc/portage/gnupg --batch --check-trustdb\n\
                 #   chmod -R go+rX /etc/portage/gnupg   # Portage verifies as user nobody\n\
                 # Or, where app-portage/getuto manages /etc/portage/gnupg, import the key there\n\
                 # and locally sign it with getuto's key instead of setting ownertrust:\n\
                 #   gpg --homedir /etc/portage/gnupg --batch --import /tmp/dbh-{t}.asc\n\
                 #   gpg --homedir /etc/portage/gnupg --batch --yes --quick-lsign-key {fpr}\n\
                 #\n",
                t = input.target
            ));
        }
        None => out.push_str(
            "#\n# This binhost is published UNSIGNED: Portage verifies nothing but the index digests.\n#\n",
        ),
    }
    out.push_str(&format!(
        "[{name}]\nsync-uri = {uri}\npriority = {}\nverify-signature = {}\n",
        input.priority,
        input.fingerprint.is_some()
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes_are_normalised() {
        for url in ["http://h:8080", "http://h:8080/", "http://h:8080///"] {
            assert_eq!(sync_uri(url, "arm64").unwrap(), "http://h:8080/arm64/");
        }
        assert_eq!(sync_uri("https://h/base/", "amd64").unwrap(), "https://h/base/amd64/");
        assert!(sync_uri("h:8080", "amd64").is_err());
        assert!(sync_uri("http://", "amd64").is_err());
    }

    #[test]
    fn signed_and_unsigned_stanzas() {
        let fpr = "0123456789ABCDEF0123456789ABCDEF01234567";
        let text = render(&ConfInput { target: "arm64", url: "http://h:8080/", priority: 10, fingerprint: Some(fpr) })
            .unwrap();
        assert!(text.ends_with("[dbh-arm64]\nsync-uri = http://h:8080/arm64/\npriority = 10\nverify-signature = true\n"));
        assert!(text.contains(&format!("echo {fpr}:6: | gpg --homedir /etc/portage/gnupg")));
        assert!(text.contains("http://h:8080/arm64/key.asc"));
        // Every line but the stanza is a comment, so the output can be saved as is.
        assert!(text.lines().filter(|l| !l.starts_with('#')).all(|l| l.starts_with('[') || l.contains(" = ")));
        insta::assert_snapshot!("conf_signed", text);
        let text = render(&ConfInput { target: "arm64", url: "http://h", priority: 3, fingerprint: None }).unwrap();
        insta::assert_snapshot!("conf_unsigned", text);
        assert!(text.contains("verify-signature = false\n") && text.contains("priority = 3\n"));
    }
}

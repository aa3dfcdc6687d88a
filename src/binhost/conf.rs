//! `dbh binhost conf`: the `binrepos.conf` stanza a client needs for a target's binhost, and, as
//! comments, how to make Portage trust the signing key: the trust script ([`super::trust`]), which
//! leaves `/etc/portage/gnupg` to getuto.

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
                 # Portage accepts them only when its keyring, /etc/portage/gnupg, trusts that key.\n\
                 # Do not create that directory by hand: getuto (Portage's trust helper) sets it up\n\
                 # with Gentoo's release keys only when it does not exist. Run the trust script, as root:\n\
                 #   wget -O /tmp/dbh-{t}-trust.sh {uri}trust.sh\n\
                 #   DBH_FINGERPRINT={fpr} sh /tmp/dbh-{t}-trust.sh\n\
                 # (on the binhost: dbh binhost conf --target {t} --url URL --trust-script). It:\n",
                t = input.target
            ));
            for line in super::trust::summary(fpr) {
                out.push_str(&format!("#   {line}\n"));
            }
            out.push_str(&format!(
                "# The configuration the packages were built with (make.conf, package.use, …): {uri}portage/\n#\n"
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
        // The stanza never tells anyone to create /etc/portage/gnupg (getuto must do that).
        assert!(!text.contains("import-ownertrust") && !text.contains("install -d"));
        assert!(text.contains("http://h:8080/arm64/trust.sh") && text.contains(&format!("DBH_FINGERPRINT={fpr} sh")));
        assert!(text.contains("http://h:8080/arm64/portage/"));
        // Every line but the stanza is a comment, so the output can be saved as is.
        assert!(text.lines().filter(|l| !l.starts_with('#')).all(|l| l.starts_with('[') || l.contains(" = ")));
        insta::assert_snapshot!("conf_signed", text);
        let text = render(&ConfInput { target: "arm64", url: "http://h", priority: 3, fingerprint: None }).unwrap();
        insta::assert_snapshot!("conf_unsigned", text);
        assert!(text.contains("verify-signature = false\n") && text.contains("priority = 3\n"));
    }
}

//! The bits of Portage's package-name and dependency grammar the index needs: `pkgsplit` (to tell a
//! version from a BUILD_ID in file names) and `use_reduce` + `paren_enclose` (Portage evaluates
//! USE conditionals of `*DEPEND`, `LICENSE`, `PROPERTIES`, `RESTRICT` against the package's USE
//! before writing them to the index, `_eval_use_flags`). Ported from `portage/versions.py` and
//! `portage/dep/__init__.py` for the cases a binary package can contain.

/// Keys whose USE conditionals Portage evaluates for the index (`_pkgindex_use_evaluated_keys`).
pub const USE_EVALUATED_KEYS: &[&str] =
    &["BDEPEND", "DEPEND", "IDEPEND", "LICENSE", "RDEPEND", "PDEPEND", "PROPERTIES", "RESTRICT"];

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Portage's `_category_re`: `^\w[-.+\w]*$`.
pub fn valid_category(cat: &str) -> bool {
    let mut chars = cat.chars();
    chars.next().is_some_and(is_word) && chars.all(|c| is_word(c) || "-.+".contains(c))
}

/// Length of the longest prefix of `s` matching `_v` (a version without revision), if any.
fn version_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if i == 0 {
        return None;
    }
    while i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
        i += 1;
        i += b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    }
    if i < b.len() && b[i].is_ascii_lowercase() {
        i += 1;
    }
    'suffix: while i < b.len() && b[i] == b'_' {
        for suffix in ["pre", "p", "beta", "alpha", "rc"] {
            // `p` must not swallow the start of `pre`: try longer names first where they overlap.
            let rest = &s[i + 1..];
            if rest.starts_with(suffix) && !(suffix == "p" && rest.starts_with("pre")) {
                i += 1 + suffix.len();
                i += b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                continue 'suffix;
            }
        }
        break;
    }
    Some(i)
}

/// Does `s` match `_vr` completely (version with optional `-rN`)?
fn is_version_rev(s: &str) -> bool {
    match version_len(s) {
        Some(n) if n == s.len() => true,
        Some(n) => s[n..]
            .strip_prefix("-r")
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|c| c.is_ascii_digit())),
        None => false,
    }
}

/// Portage's `_pkgsplit`: `foo-1.0-r1` → (`foo`, `1.0`, `r1`); `None` if it is no PF.
pub fn pkgsplit(pf: &str) -> Option<(&str, &str, &str)> {
    // `_pkg` is lazy, so the first hyphen after which a version follows ends the name.
    for (i, _) in pf.match_indices('-') {
        let (pn, rest) = (&pf[..i], &pf[i + 1..]);
        if !is_version_rev(rest) {
            continue;
        }
        let mut chars = pn.chars();
        if !(chars.next().is_some_and(is_word) && chars.all(|c| is_word(c) || c == '+' || c == '-')) {
            return None;
        }
        // `pn_inval`: a name may not itself end in `-<version>`.
        if pn.match_indices('-').any(|(j, _)| is_version_rev(&pn[j + 1..])) {
            return None;
        }
        let n = version_len(rest).expect("checked above");
        let rev = rest[n..].strip_prefix("-").unwrap_or("");
        return Some((pn, &rest[..n], rev));
    }
    None
}

/// Portage's `_parse_build_id`: the trailing `-N` of a binpkg file name, or 0 when there is
/// none. BUILD_IDs are u64 everywhere in dbh, at most [`crate::binpkg::MAX_BUILD_ID`] (a larger
/// suffix is not a BUILD_ID: 0).
pub fn parse_build_id(file_name: &str) -> u64 {
    let stem = file_name
        .strip_suffix(".gpkg.tar")
        .or_else(|| file_name.strip_suffix(".xpak"))
        .or_else(|| file_name.strip_suffix(".tbz2"));
    let Some(stem) = stem else { return 0 };
    match stem.rsplit_once('-') {
        Some((pf, id)) if pkgsplit(pf).is_some() && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
            id.parse().ok().filter(|n| *n <= crate::binpkg::MAX_BUILD_ID).unwrap_or(0)
        }
        _ => 0,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Tok(String),
    List(Vec<Node>),
}

fn is_tok(n: Option<&Node>, f: impl Fn(&str) -> bool) -> bool {
    matches!(n, Some(Node::Tok(t)) if f(t))
}

/// Evaluates `flag? ( … )`, `!flag? ( … )` and atom USE conditionals (`dep[flag?]`) against `use`,
/// removes redundant parentheses the way Portage does, and renders the result (`use_reduce` with
/// Portage's defaults, then `paren_enclose`). `Err` describes a malformed string.
pub fn use_reduce(depstr: &str, use_flags: &[&str], atoms: bool) -> Result<String, String> {
    let active = |cond: &str| -> Result<bool, String> {
        let (flag, negated) = match cond.strip_prefix('!') {
            Some(f) => (&f[..f.len() - 1], true),
            None => (&cond[..cond.len() - 1], false),
        };
        if flag.is_empty() || !flag.chars().all(|c| c.is_ascii_alphanumeric() || "+_@-".contains(c)) {
            return Err(format!("invalid use flag '{flag}' in conditional '{cond}'"));
        }
        Ok(use_flags.contains(&flag) != negated)
    };
    let tokens: Vec<&str> = depstr.split_whitespace().collect();
    let mut stack: Vec<Vec<Node>> = vec![Vec::new()];
    let mut level = 0usize;
    let mut need_bracket = false;
    for (pos, &token) in tokens.iter().enumerate() {
        match token {
            "(" => {
                if tokens.get(pos + 1) == Some(&")") {
                    return Err(format!("expected: dependency string, got: ')', token {}", pos + 1));
                }
                need_bracket = false;
                stack.push(Vec::new());
                level += 1;
            }
            ")" => {
                if need_bracket {
                    return Err(format!("expected: '(', got: ')', token {}", pos + 1));
                }
                if level == 0 {
                    return Err(format!("no matching '(' for ')', token {}", pos + 1));
                }
                level -= 1;
                let mut l = stack.pop().expect("level > 0");
                let is_single = l.len() == 1 || (l.len() == 2 && is_tok(l.first(), |t| t == "||"));
                let mut ignore = false;
                if let Some(Node::Tok(last)) = stack[level].last() {
                    if last == "||" && l.is_empty() {
                        stack[level].pop();
                    } else if last.ends_with('?') {
                        ignore = !active(last)?;
                        stack[level].pop();
                    }
                }
                if l.is_empty() || ignore {
                    continue;
                }
                let ends_any = |stack: &Vec<Vec<Node>>, k: Option<usize>| {
                    k.is_some_and(|k| is_tok(stack[k].last(), |t| t == "||"))
                };
                let above = level.checked_sub(1);
                let special_append = |stack: &mut Vec<Vec<Node>>, mut l: Vec<Node>| {
                    if is_single {
                        if is_tok(l.first(), |t| t == "||") && ends_any(stack, above) {
                            if let Some(Node::List(inner)) = l.pop() {
                                stack[level].extend(inner);
                            }
                        } else if l.len() == 1 && matches!(l[0], Node::List(_)) {
                            let Some(Node::List(inner)) = l.pop() else { unreachable!() };
                            // last_any_of_operator_level(level - 1)
                            let mut in_any_of = false;
                            let mut k = above;
                            while let Some(kk) = k {
                                if let Some(Node::Tok(t)) = stack[kk].last() {
                                    if t == "||" {
                                        in_any_of = true;
                                        break;
                                    }
                                    if !t.ends_with('?') {
                                        break;
                                    }
                                }
                                k = kk.checked_sub(1);
                            }
                            if in_any_of {
                                stack[level].push(Node::List(inner));
                            } else {
                                stack[level].extend(inner);
                            }
                        } else {
                            stack[level].extend(l);
                        }
                    } else {
                        stack[level].push(Node::List(l));
                    }
                };
                if !ends_any(&stack, above) && !ends_any(&stack, Some(level)) {
                    stack[level].append(&mut l);
                } else if stack[level].is_empty() {
                    special_append(&mut stack, l);
                } else if is_single && ends_any(&stack, Some(level)) {
                    stack[level].pop();
                    special_append(&mut stack, l);
                } else if ends_any(&stack, Some(level)) && ends_any(&stack, above) {
                    stack[level].pop();
                    stack[level].append(&mut l);
                } else {
                    special_append(&mut stack, l);
                }
            }
            "||" => {
                if need_bracket {
                    return Err(format!("expected: '(', got: '||', token {}", pos + 1));
                }
                need_bracket = true;
                stack[level].push(Node::Tok(token.to_owned()));
            }
            _ => {
                if need_bracket {
                    return Err(format!("expected: '(', got: '{token}', token {}", pos + 1));
                }
                if token.ends_with('?') {
                    need_bracket = true;
                    stack[level].push(Node::Tok(token.to_owned()));
                } else {
                    if token.starts_with(['(', ')']) || token.ends_with(['(', ')']) {
                        return Err(format!("missing whitespace around parenthesis at '{token}', token {}", pos + 1));
                    }
                    let token = if atoms { evaluate_atom(token, use_flags) } else { token.to_owned() };
                    stack[level].push(Node::Tok(token));
                }
            }
        }
    }
    if level != 0 {
        return Err("Missing ')' at end of string".into());
    }
    if need_bracket {
        return Err("Missing '(' at end of string".into());
    }
    let mut out = String::new();
    enclose(&stack[0], &mut out);
    Ok(out)
}

fn enclose(nodes: &[Node], out: &mut String) {
    for (i, node) in nodes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match node {
            Node::Tok(t) => out.push_str(t),
            Node::List(inner) => {
                out.push_str("( ");
                enclose(inner, out);
                out.push_str(" )");
            }
        }
    }
}

/// `Atom.evaluate_conditionals`: `foo[bar?,!baz=]` with the package's USE.
fn evaluate_atom(atom: &str, use_flags: &[&str]) -> String {
    let Some(open) = atom.find('[') else { return atom.to_owned() };
    let Some(inner) = atom[open + 1..].strip_suffix(']') else { return atom.to_owned() };
    if !inner.contains(['?', '=']) {
        return atom.to_owned();
    }
    let mut tokens = Vec::new();
    for t in inner.split(',') {
        let (neg, rest) = t.strip_prefix('!').map_or((false, t), |r| (true, r));
        let (flag, op) = match rest.as_bytes().last() {
            Some(b'?') => (&rest[..rest.len() - 1], '?'),
            Some(b'=') => (&rest[..rest.len() - 1], '='),
            _ => {
                tokens.push(t.to_owned());
                continue;
            }
        };
        // The name without a `(+)`/`(-)` default decides; the default stays on the result.
        let name = flag.split_once('(').map_or(flag, |(n, _)| n);
        let on = use_flags.contains(&name);
        match (op, neg, on) {
            ('?', false, true) | ('=', false, true) | ('=', true, false) => tokens.push(flag.to_owned()),
            ('?', true, false) | ('=', false, false) | ('=', true, true) => tokens.push(format!("-{flag}")),
            _ => {}
        }
    }
    if tokens.is_empty() {
        atom[..open].to_owned()
    } else {
        format!("{}[{}]", &atom[..open], tokens.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkgsplit_like_portage() {
        assert_eq!(pkgsplit("hello-1.0"), Some(("hello", "1.0", "")));
        assert_eq!(pkgsplit("foo-bar-1.2.3_rc1_p2-r10"), Some(("foo-bar", "1.2.3_rc1_p2", "r10")));
        assert_eq!(pkgsplit("gtk+-3.24a"), Some(("gtk+", "3.24a", "")));
        assert_eq!(pkgsplit("hello"), None);
        assert_eq!(pkgsplit("foo-1-2"), None);
        assert_eq!(pkgsplit("x-1.0_pre3"), Some(("x", "1.0_pre3", "")));
    }

    #[test]
    fn build_ids_in_file_names() {
        assert_eq!(parse_build_id("hello-1.0-1.gpkg.tar"), 1);
        assert_eq!(parse_build_id("hello-1.0.gpkg.tar"), 0);
        assert_eq!(parse_build_id("hello-1.0-r1.gpkg.tar"), 0);
        assert_eq!(parse_build_id("hello-1.0-r1-17.xpak"), 17);
        assert_eq!(parse_build_id("hello-1.0.tbz2"), 0);
        assert_eq!(parse_build_id("hello-1.0-9223372036854775807.gpkg.tar"), 9_223_372_036_854_775_807);
        assert_eq!(parse_build_id("hello-1.0-9223372036854775808.gpkg.tar"), 0);
        assert_eq!(parse_build_id("hello-1.0-+5.gpkg.tar"), 0);
    }

    #[test]
    fn use_reduce_like_portage() {
        let u = ["a", "b"];
        let cases = [
            ("x/y", "x/y"),
            ("a? ( x/y ) !a? ( x/z )", "x/y"),
            ("c? ( x/y ) !c? ( x/z )", "x/z"),
            ("|| ( x/a x/b )", "|| ( x/a x/b )"),
            ("|| ( x/a )", "x/a"),
            ("( ( x/a x/b ) )", "x/a x/b"),
            ("|| ( a? ( x/a x/b ) x/c )", "|| ( ( x/a x/b ) x/c )"),
            ("|| ( c? ( x/a ) x/c )", "x/c"),
            ("|| ( x/a || ( x/b x/c ) )", "|| ( x/a x/b x/c )"),
            ("x/a[a?,!b?,c=,!c=,d]", "x/a[a,-c,c,d]"),
            ("x/a[c?]", "x/a"),
            ("  MIT   a? ( BSD ) ", "MIT BSD"),
            // The following outputs come from real Portage 3.0.83 (use_reduce + paren_enclose).
            ("a? ( || ( x/a x/b ) ) x/c", "|| ( x/a x/b ) x/c"),
            ("|| ( ( x/a ) x/b )", "|| ( x/a x/b )"),
            ("|| ( ( x/a x/b ) ( x/c ) )", "|| ( ( x/a x/b ) x/c )"),
            ("a? ( b? ( x/a ) )", "x/a"),
        ];
        for (input, want) in cases {
            assert_eq!(use_reduce(input, &u, true).unwrap(), want, "{input}");
        }
        for bad in ["( x/y", "x/y )", "a? x/y", "|| x/y", "( )", "a?"] {
            assert!(use_reduce(bad, &u, true).is_err(), "{bad}");
        }
    }
}

//! Binary search over the text of a published index, without parsing it.
//!
//! A generation dbh publishes has its stanzas sorted by (CPV, BUILD_ID) — `Index::render`
//! writes `packages_sorted()`, and [`super::generations::State::Published`] says the file on
//! disk is such a generation. On that text `add` finds where a new stanza goes and the largest
//! BUILD_ID of a CPV, and `rm` finds the stanzas of a pattern, by bisecting byte offsets: each
//! probe reads one stanza's `CPV:`/`BUILD_ID:` lines, so a lookup in a 10 000-entry index reads
//! a few dozen stanzas instead of the whole text.
//!
//! Stanzas are separated by one blank line, as dbh renders them. Anything else — a stanza
//! without `CPV:`, an unparsable BUILD_ID, a run of blank lines — makes a function return
//! `None`, and the caller takes its full-text path: these functions never guess.

/// A stanza's sort key: its CPV and BUILD_ID (`None` sorts first, as in `packages_sorted`).
pub type Key<'a> = (&'a str, Option<u64>);

/// The end of the stanza starting at `start`: the offset just past its blank line (or the end
/// of the text).
fn end_of(text: &str, start: usize) -> usize {
    memchr::memmem::find(&text.as_bytes()[start..], b"\n\n").map_or(text.len(), |i| start + i + 2)
}

/// The key of the stanza starting at `start`.
pub fn key(text: &str, start: usize) -> Option<Key<'_>> {
    let stanza = &text[start..end_of(text, start)];
    if stanza.starts_with('\n') {
        return None;
    }
    let (mut cpv, mut id) = (None, None);
    for line in stanza.lines() {
        if let Some(v) = line.strip_prefix("CPV: ") {
            cpv = Some(v);
        } else if let Some(v) = line.strip_prefix("BUILD_ID: ") {
            id = Some(v.parse::<u64>().ok()?);
        }
    }
    Some((cpv?, id))
}

/// The first stanza start at or after `pos` (`pos` > `body_at`), or the end of the text.
fn start_at_or_after(text: &str, pos: usize) -> usize {
    // A stanza starts right after "\n\n": search from two bytes back so that `pos` itself counts.
    memchr::memmem::find(&text.as_bytes()[pos - 2..], b"\n\n").map_or(text.len(), |i| pos - 2 + i + 2)
}

/// The first stanza of the body (which starts at `body_at`, a stanza start) whose key does not
/// satisfy `below` — the body's stanzas must be sorted so that `below` holds for a prefix of
/// them. Returns the end of the text when `below` holds for all; `None` on a stanza without a
/// readable key.
pub fn partition(text: &str, body_at: usize, below: impl Fn(Key<'_>) -> bool) -> Option<usize> {
    // Invariant: `lo` is a stanza start (or the end) and every stanza before it is below;
    // `hi` is a stanza start (or the end) and no stanza from it on is.
    let (mut lo, mut hi) = (body_at.min(text.len()), text.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let probe = if mid > lo { start_at_or_after(text, mid) } else { lo };
        // No stanza starts in [mid, hi): the one at `lo` is the only candidate left.
        let probe = if probe >= hi { lo } else { probe };
        if below(key(text, probe)?) {
            lo = end_of(text, probe);
        } else {
            hi = probe;
        }
    }
    Some(lo)
}

/// The (start, end) of every stanza whose CPV starts with `prefix`, in order.
pub fn with_cpv_prefix(text: &str, body_at: usize, prefix: &str) -> Option<Vec<(usize, usize)>> {
    let mut at = partition(text, body_at, |(cpv, _)| cpv < prefix)?;
    let mut out = Vec::new();
    while at < text.len() {
        let (cpv, _) = key(text, at)?;
        if !cpv.starts_with(prefix) {
            break;
        }
        let end = end_of(text, at);
        out.push((at, end));
        at = end;
    }
    Some(out)
}

/// The largest BUILD_ID of `cpv`'s stanzas (0 when it has none).
pub fn max_build_id(text: &str, body_at: usize, cpv: &str) -> Option<u64> {
    // Sorted by BUILD_ID within a CPV: the last stanza of the CPV has the largest.
    let end = partition(text, body_at, |(c, _)| c <= cpv)?;
    if end == body_at.min(text.len()) {
        return Some(0);
    }
    let start = partition(text, body_at, |(c, _)| c < cpv)?;
    if start == end {
        return Some(0);
    }
    // The last stanza before `end`: walk from `start` (a CPV has few instances).
    let mut at = start;
    let mut max = 0;
    while at < end {
        max = max.max(key(text, at)?.1.unwrap_or(0));
        at = end_of(text, at);
    }
    Some(max)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// A header and `n` random stanzas sorted as dbh renders them; returns the text, the
    /// body's offset and the keys in order.
    pub(crate) fn sorted_text(rng: &mut Rng, n: usize) -> (String, usize, Vec<(String, Option<u64>)>) {
        let mut keys: Vec<(String, Option<u64>)> = (0..n)
            .map(|_| {
                let cpv = format!("cat-{}/pkg{}-{}", rng.below(3), rng.below(6), rng.below(4));
                let id = if rng.below(5) == 0 { None } else { Some(rng.below(4)) };
                (cpv, id)
            })
            .collect();
        keys.sort();
        let mut text = String::from("ARCH: arm64\nTIMESTAMP: 1\n\n");
        let body_at = text.len();
        for (cpv, id) in &keys {
            // Portage's key order: BUILD_ID before CPV.
            if let Some(id) = id {
                text.push_str(&format!("BUILD_ID: {id}\n"));
            }
            text.push_str(&format!("CPV: {cpv}\nPATH: {cpv}.gpkg.tar\n\n"));
        }
        (text, body_at, keys)
    }

    fn starts(text: &str, body_at: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = body_at;
        while at < text.len() {
            out.push(at);
            at = end_of(text, at);
        }
        out
    }

    #[test]
    fn partition_equals_a_linear_scan() {
        let mut rng = Rng(7);
        for round in 0..300 {
            let (text, body_at, keys) = sorted_text(&mut rng, round % 40);
            let starts = starts(&text, body_at);
            assert_eq!(starts.len(), keys.len());
            for _ in 0..10 {
                let probe = (format!("cat-{}/pkg{}-{}", rng.below(3), rng.below(6), rng.below(4)), Some(rng.below(5)));
                let want = keys.iter().position(|(c, i)| (c.as_str(), *i) > (probe.0.as_str(), probe.1));
                let want = want.map_or(text.len(), |i| starts[i]);
                let got = partition(&text, body_at, |k| k <= (probe.0.as_str(), probe.1)).unwrap();
                assert_eq!(got, want, "insertion point of {probe:?} in\n{text}");

                let cpv = probe.0.as_str();
                let want_max = keys.iter().filter(|(c, _)| c == cpv).filter_map(|(_, i)| *i).max().unwrap_or(0);
                assert_eq!(max_build_id(&text, body_at, cpv), Some(want_max), "max BUILD_ID of {cpv} in\n{text}");

                let prefix = &cpv[..rng.index(cpv.len() + 1)];
                let want: Vec<usize> = keys.iter().enumerate().filter(|(_, (c, _))| c.starts_with(prefix)).map(|(i, _)| starts[i]).collect();
                let got: Vec<usize> = with_cpv_prefix(&text, body_at, prefix).unwrap().into_iter().map(|(s, _)| s).collect();
                assert_eq!(got, want, "stanzas with prefix {prefix:?}");
            }
        }
    }

    #[test]
    fn a_stanza_without_a_key_is_not_guessed() {
        let text = "TIMESTAMP: 1\n\nCPV: a/b-1\n\nPATH: x\n\nCPV: c/d-1\n\n";
        let body_at = text.find("\n\n").unwrap() + 2;
        // Whichever probe lands on the stanza without CPV gives up, never a wrong offset.
        for cpv in ["a/a-1", "a/b-1", "b/b-1", "c/d-1", "z/z-1"] {
            let got = partition(text, body_at, |k| k.0 < cpv);
            assert!(got.is_none() || text[got.unwrap()..].starts_with("CPV: ") || got == Some(text.len()), "{cpv}: {got:?}");
        }
        let blank_run = "TIMESTAMP: 1\n\nCPV: a/b-1\n\n\nCPV: c/d-1\n\n";
        assert_eq!(key(blank_run, blank_run.find("\n\n\n").unwrap() + 2), None);
        assert_eq!(key("BUILD_ID: x\nCPV: a/b-1\n\n", 0), None);
    }
}

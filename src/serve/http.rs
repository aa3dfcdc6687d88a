//! The HTTP/1.1 wire format the server needs, and no more: request heads (GET/HEAD, no bodies),
//! `Range` and conditional headers, request-target decoding that refuses anything that could
//! leave the binhost root, and response heads. Kept free of IO so it is unit-tested directly.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a request head cannot be served; each maps to one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Malformed request line or header.
    Bad(&'static str),
    /// Head larger than the cap.
    TooLarge,
    /// Not HTTP/1.0 or HTTP/1.1.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

/// The parts of a request head the server acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub method_text: String,
    /// The raw request target, for the access log.
    pub target: String,
    pub http11: bool,
    pub keep_alive: bool,
    pub host: Option<String>,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub if_modified_since: Option<String>,
    pub if_none_match: Option<String>,
    /// The request announces a body (Content-Length > 0 or Transfer-Encoding); GET/HEAD never
    /// need one, so such a connection is answered and closed instead of reading the body.
    pub has_body: bool,
}

/// Finds the end of a head (`\r\n\r\n`, or a bare `\n\n` from lenient clients); returns the
/// length of the head including the terminator.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Parses a complete head (as delimited by [`head_end`]).
pub fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Bad("request head is not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().ok_or(HeadError::Bad("empty request"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Bad("malformed request line"));
    };
    // A bare CR, NUL or other control byte in the request line is never valid (RFC 9112 §3).
    if line.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(HeadError::Bad("control character in the request line"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
        return Err(HeadError::Bad("malformed method"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => return Err(HeadError::Version),
        _ => return Err(HeadError::Bad("malformed request line")),
    };
    let mut req = Request {
        method: match method {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        },
        method_text: method.to_string(),
        target: target.to_string(),
        http11,
        keep_alive: http11,
        host: None,
        range: None,
        if_range: None,
        if_modified_since: None,
        if_none_match: None,
        has_body: false,
    };
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut content_length: Option<u64> = None;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            return Err(HeadError::Bad("obsolete header folding"));
        }
        let (name, value) = line.split_once(':').ok_or(HeadError::Bad("header without colon"))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(HeadError::Bad("malformed header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        // RFC 9110 §5.5: NUL, CR and LF are never valid in a field value; other controls
        // (except tab) are refused too, so nothing downstream ever sees them.
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(HeadError::Bad("control character in a header value"));
        }
        let set = |slot: &mut Option<String>| -> Result<(), HeadError> {
            if slot.is_some() {
                return Err(HeadError::Bad("repeated header"));
            }
            *slot = Some(value.to_string());
            Ok(())
        };
        if name.eq_ignore_ascii_case("host") {
            set(&mut req.host)?;
        } else if name.eq_ignore_ascii_case("range") {
            set(&mut req.range)?;
        } else if name.eq_ignore_ascii_case("if-range") {
            set(&mut req.if_range)?;
        } else if name.eq_ignore_ascii_case("if-modified-since") {
            set(&mut req.if_modified_since)?;
        } else if name.eq_ignore_ascii_case("if-none-match") {
            // Several If-None-Match lines form one list.
            req.if_none_match = Some(match req.if_none_match.take() {
                Some(prev) => format!("{prev}, {value}"),
                None => value.to_string(),
            });
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                connection_close |= token.eq_ignore_ascii_case("close");
                connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9112 §6.3: differing Content-Length values (in one field or several) are an
            // unrecoverable framing error; a request smuggler relies on servers picking one.
            for part in value.split(',').map(|p| p.trim_matches([' ', '\t'])) {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HeadError::Bad("malformed Content-Length"));
                }
                let n: u64 = part.parse().map_err(|_| HeadError::Bad("malformed Content-Length"))?;
                match content_length {
                    Some(prev) if prev != n => return Err(HeadError::Bad("differing Content-Length values")),
                    _ => content_length = Some(n),
                }
                req.has_body |= n > 0;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            req.has_body = true;
        }
    }
    if http11 && req.host.is_none() {
        return Err(HeadError::Bad("HTTP/1.1 request without Host"));
    }
    req.keep_alive = if http11 { !connection_close } else { connection_keep_alive && !connection_close };
    Ok(req)
}

/// Why a request target is refused: `BadRequest` for targets no honest client sends (encoded
/// slashes, NUL, backslashes, `..`), `NotFound` for hidden names (dotfiles, partial files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    BadRequest,
    NotFound,
}

/// Decodes an origin-form request target into path segments, refusing everything that could
/// name a file outside the served directory or a file that is being written.
///
/// Refused: targets not starting with `/`, `%2f`/`%5c` (encoded separators), NUL and other
/// control bytes (raw or encoded), backslashes, `.` and `..` segments (raw or encoded), empty
/// segments (`//`), non-UTF-8. Hidden (404): segments starting with `.`, names ending `.partial`
/// or `.tmp`. The query string is ignored. A trailing `/` yields a final empty segment so that
/// `/t/` and `/t` can be told apart.
pub fn decode_target(target: &str) -> Result<Vec<String>, PathError> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let rest = path.strip_prefix('/').ok_or(PathError::BadRequest)?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::with_capacity(raw.len());
    let last = raw.len() - 1;
    for (i, seg) in raw.iter().enumerate() {
        let decoded = percent_decode(seg)?;
        if decoded.is_empty() {
            if i == last {
                out.push(String::new());
                continue;
            }
            return Err(PathError::BadRequest);
        }
        if decoded == "." || decoded == ".." {
            return Err(PathError::BadRequest);
        }
        if decoded.starts_with('.') || decoded.ends_with(".partial") || decoded.ends_with(".tmp") {
            return Err(PathError::NotFound);
        }
        out.push(decoded);
    }
    Ok(out)
}

fn percent_decode(seg: &str) -> Result<String, PathError> {
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let b = if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadRequest)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadRequest)?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadRequest)?;
            i += 3;
            if v == b'/' {
                return Err(PathError::BadRequest);
            }
            v
        } else {
            i += 1;
            b
        };
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return Err(PathError::BadRequest);
        }
        out.push(b);
    }
    String::from_utf8(out).map_err(|_| PathError::BadRequest)
}

/// One satisfiable byte range, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The outcome of a `Range` header against a representation of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ranges {
    /// No usable Range header (absent, malformed, not bytes, too many parts): send everything.
    Full,
    /// At least one part is satisfiable; the unsatisfiable ones are dropped (RFC 9110 §14.2).
    Partial(Vec<ByteRange>),
    /// Syntactically valid, but no part overlaps the representation: 416.
    Unsatisfiable,
}

/// More parts than this and the header is ignored (a full 200 is always a correct answer), which
/// keeps a hostile `bytes=0-0,0-0,…` from amplifying a small file into a huge response.
pub const MAX_RANGES: usize = 64;

pub fn parse_ranges(header: &str, size: u64) -> Ranges {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ranges::Full;
    };
    let mut out = Vec::new();
    let mut parts = 0;
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        parts += 1;
        if parts > MAX_RANGES {
            return Ranges::Full;
        }
        let Some((a, b)) = part.split_once('-') else {
            return Ranges::Full;
        };
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                None
            } else {
                s.parse().ok()
            }
        };
        let range = if a.is_empty() {
            // Suffix: the last N bytes.
            let Some(n) = num(b) else { return Ranges::Full };
            if n == 0 || size == 0 {
                continue;
            }
            ByteRange { start: size.saturating_sub(n), end: size }
        } else {
            let Some(start) = num(a) else { return Ranges::Full };
            let end = if b.is_empty() {
                size
            } else {
                let Some(last) = num(b) else { return Ranges::Full };
                if last < start {
                    return Ranges::Full;
                }
                last.saturating_add(1).min(size)
            };
            if start >= size {
                continue;
            }
            ByteRange { start, end }
        };
        out.push(range);
    }
    if parts == 0 {
        return Ranges::Full;
    }
    if out.is_empty() {
        return Ranges::Unsatisfiable;
    }
    // Overlapping parts that add up to more than the file would let a client amplify one file
    // into many copies; the whole file (200) is a correct and cheaper answer.
    // Checked: parts near u64::MAX must not wrap around to a small sum and pass the check (a
    // sum that does not fit u64 exceeds any size).
    if out.len() > 1 && out.iter().try_fold(0u64, |sum, r| sum.checked_add(r.len())).is_none_or(|total| total > size) {
        return Ranges::Full;
    }
    Ranges::Partial(out)
}

/// `If-None-Match` against a strong ETag (weak comparison, as RFC 9110 §13.1.2 prescribes).
pub fn none_match(header: &str, etag: &str) -> bool {
    let header = header.trim();
    if header == "*" {
        return true;
    }
    let bare = etag.trim_start_matches("W/");
    header.split(',').map(str::trim).any(|t| t.trim_start_matches("W/") == bare)
}

/// `If-Modified-Since`: true when the resource has not changed since the given date.
/// Unparseable dates are ignored (the full response is sent), as RFC 9110 requires.
pub fn not_modified_since(header: &str, last_modified: SystemTime) -> bool {
    match httpdate::parse_http_date(header.trim()) {
        Ok(since) => whole_seconds(last_modified) <= since,
        Err(_) => false,
    }
}

/// `If-Range`: the range applies only when the validator still matches. A strong ETag must match
/// exactly; a date must equal Last-Modified.
pub fn if_range_matches(header: &str, etag: &str, last_modified: SystemTime) -> bool {
    let header = header.trim();
    if header.starts_with('"') {
        header == etag
    } else {
        httpdate::parse_http_date(header).is_ok_and(|d| d == whole_seconds(last_modified))
    }
}

pub fn whole_seconds(t: SystemTime) -> SystemTime {
    time_from_secs(crate::util::time::secs_of(t))
}

/// The last second an HTTP date can name (9999-12-31T23:59:59Z): `httpdate` panics beyond it,
/// and a file's mtime or an index TIMESTAMP can be anything.
pub const MAX_HTTP_SECS: u64 = 253_402_300_799;

/// `secs` after the epoch as a time an HTTP date can show (clamped to [`MAX_HTTP_SECS`]).
pub fn time_from_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.min(MAX_HTTP_SECS))
}

/// An HTTP date for any time: before the epoch shows as the epoch, after year 9999 as the
/// last second of 9999. Never panics.
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(time_from_secs(crate::util::time::secs_of(t)))
}

/// Calls `f` with the `Date` header value, formatted at most once per second per thread (no
/// allocation per response).
pub fn with_now_date<R>(f: impl FnOnce(&str) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = crate::util::time::secs_of(now);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, http_date(now));
        }
        f(&c.1)
    })
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Builds a response head. `headers` are written as given; Date, Server, Connection and (unless
/// `length` is None) Content-Length are added here.
pub fn response_head(status: u16, keep_alive: bool, length: Option<u64>, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    head_with_lines(status, keep_alive, &header_lines(headers, length), &mut out);
    out
}

/// `Name: value\r\n` per header, then `Content-Length` unless `length` is None: the part of a
/// head that depends only on the file, which the open-file cache renders once per file.
pub fn header_lines(headers: &[(&str, &str)], length: Option<u64>) -> Vec<u8> {
    let mut s = String::with_capacity(256);
    for (k, v) in headers {
        let _ = write!(s, "{k}: {v}\r\n");
    }
    if let Some(len) = length {
        let _ = write!(s, "Content-Length: {len}\r\n");
    }
    s.into_bytes()
}

/// Appends a whole head to `out`: status line, Server, Date, the pre-rendered `lines`
/// ([`header_lines`]) and Connection — the same bytes [`response_head`] gives.
pub fn head_with_lines(status: u16, keep_alive: bool, lines: &[u8], out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(out, "HTTP/1.1 {status} {}\r\nServer: dbh/{}\r\nDate: ", reason(status), env!("CARGO_PKG_VERSION"));
    with_now_date(|d| out.extend_from_slice(d.as_bytes()));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(lines);
    out.extend_from_slice(if keep_alive { b"Connection: keep-alive\r\n\r\n" } else { b"Connection: close\r\n\r\n" });
}

/// A `Host` header value safe to paste into a URL and a config file: host name, IPv4, or a
/// bracketed IPv6 address, with an optional port.
pub fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_ranges("bytes=0-9", 100), Ranges::Partial(vec![r(0, 10)]));
        assert_eq!(parse_ranges("bytes=90-", 100), Ranges::Partial(vec![r(90, 100)]));
        assert_eq!(parse_ranges("bytes=-10", 100), Ranges::Partial(vec![r(90, 100)]));
        assert_eq!(parse_ranges("bytes=-1000", 100), Ranges::Partial(vec![r(0, 100)]));
        assert_eq!(parse_ranges("bytes=95-200", 100), Ranges::Partial(vec![r(95, 100)]));
        assert_eq!(parse_ranges("bytes=0-0, 5-9", 100), Ranges::Partial(vec![r(0, 1), r(5, 10)]));
        assert_eq!(parse_ranges("bytes=100-", 100), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("bytes=200-300,-0", 100), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("bytes=200-300,0-1", 100), Ranges::Partial(vec![r(0, 2)]));
        assert_eq!(parse_ranges("bytes=5-1", 100), Ranges::Full);
        assert_eq!(parse_ranges("items=0-1", 100), Ranges::Full);
        assert_eq!(parse_ranges("bytes=a-b", 100), Ranges::Full);
        assert_eq!(parse_ranges("bytes=", 100), Ranges::Full);
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse_ranges(&many, 100), Ranges::Full);
        assert_eq!(parse_ranges("bytes=0-,0-", 100), Ranges::Full);
    }

    #[test]
    fn targets() {
        assert_eq!(decode_target("/"), Ok(vec![]));
        assert_eq!(decode_target("/amd64/"), Ok(vec!["amd64".into(), "".into()]));
        assert_eq!(decode_target("/amd64/Packages?x=1"), Ok(vec!["amd64".into(), "Packages".into()]));
        assert_eq!(decode_target("/a/b%2Dc"), Ok(vec!["a".into(), "b-c".into()]));
        for bad in [
            "amd64/Packages",
            "/../etc/passwd",
            "/a/%2e%2e/x",
            "/a/%2E%2E/x",
            "/a/.%2e/x",
            "/a%2f..%2fx",
            "/a/b%5cc",
            "/a/b\\c",
            "/a/b%00c",
            "/a//b",
            "/a/./b",
            "/a/%",
            "/a/%zz",
            "/a/%ff",
            "http://h/a",
        ] {
            assert_eq!(decode_target(bad), Err(PathError::BadRequest), "{bad}");
        }
        for hidden in ["/a/.Packages.x", "/a/Packages.partial", "/a/x.tmp", "/.git/config", "/a/%2eenv"] {
            assert_eq!(decode_target(hidden), Err(PathError::NotFound), "{hidden}");
        }
    }

    #[test]
    fn heads() {
        let h = b"GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nConnection: close\r\n\r\nGET";
        let end = head_end(h).unwrap();
        assert_eq!(&h[end..], b"GET");
        let req = parse_head(&h[..end]).unwrap();
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.range.as_deref(), Some("bytes=0-1"));
        assert!(!req.keep_alive);
        let req = parse_head(b"HEAD / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!req.keep_alive);
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Err(HeadError::Bad("HTTP/1.1 request without Host")));
        assert_eq!(parse_head(b"GET / HTTP/2.0\r\n\r\n"), Err(HeadError::Version));
        assert!(parse_head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n").unwrap().has_body);
    }

    #[test]
    fn differing_content_lengths_and_control_bytes_are_refused() {
        let cl2 = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(parse_head(cl2), Err(HeadError::Bad("differing Content-Length values")));
        let list = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\n";
        assert_eq!(parse_head(list), Err(HeadError::Bad("differing Content-Length values")));
        // The same value twice is one length (RFC 9112 §6.3 lets a recipient accept it).
        let same = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n";
        assert!(!parse_head(same).unwrap().has_body);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"),
            Err(HeadError::Bad("malformed Content-Length"))
        );
        for v in ["a\0b", "a\x01b", "a\x7fb"] {
            let h = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Y: {v}\r\n\r\n");
            assert_eq!(parse_head(h.as_bytes()), Err(HeadError::Bad("control character in a header value")), "{v:?}");
        }
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-Y: a\tb\r\n\r\n").is_ok());
    }

    #[test]
    fn dates_never_panic_and_clamp_to_year_9999() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let last = "Fri, 31 Dec 9999 23:59:59 GMT";
        for secs in [253_402_300_799, 253_402_300_800, i64::MAX as u64, u64::MAX] {
            assert_eq!(http_date(time_from_secs(secs)), last, "{secs}");
        }
        let far = UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2);
        assert_eq!(http_date(far), last);
        assert_eq!(whole_seconds(far), time_from_secs(MAX_HTTP_SECS));
        assert!(!not_modified_since("Fri, 31 Dec 9999 23:59:58 GMT", far));
    }

    /// Seeded random heads, targets and Range headers (mutations of real ones and noise): no
    /// panic, and the invariants the server relies on hold for whatever is accepted.
    #[test]
    fn random_network_input_never_panics() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let seeds: [&[u8]; 4] = [
            b"GET /amd64/Packages HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9,-5\r\nIf-None-Match: \"a\"\r\n\r\n",
            b"HEAD /a/%2e%2E/b%00?x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1,1\r\n\r\n",
            b"GET /a/b HTTP/1.1\nHost: [::1]:80\nTransfer-Encoding: chunked\n\n",
            b"bytes=-0,0-,5-1,99999999999999999999-1,1-18446744073709551615",
        ];
        let alphabet = b"GET /%.:-,=\r\n\t\0\xff0123456789abcdefHTPbytes";
        for round in 0..20_000u32 {
            let seed = seeds[round as usize % seeds.len()];
            let mut input = seed.to_vec();
            for _ in 0..(next() % 8) {
                let pos = (next() % (input.len() as u64 + 1)) as usize;
                let b = alphabet[(next() % alphabet.len() as u64) as usize];
                match next() % 3 {
                    0 if pos < input.len() => input[pos] = b,
                    1 => input.insert(pos, b),
                    _ if pos < input.len() => {
                        input.remove(pos);
                    }
                    _ => {}
                }
            }
            let size = next() % 200;
            if let Some(end) = head_end(&input)
                && let Ok(req) = parse_head(&input[..end])
            {
                assert!(!req.target.contains(['\r', '\n']));
                if let Ok(segs) = decode_target(&req.target) {
                    for s in segs {
                        assert!(s != "." && s != ".." && !s.contains(['/', '\\', '\0']), "{s:?}");
                    }
                }
            }
            let text = String::from_utf8_lossy(&input);
            if let Ok(segs) = decode_target(&text) {
                assert!(segs.iter().all(|s| s != ".." && !s.contains('/')));
            }
            if let Ranges::Partial(parts) = parse_ranges(&text, size) {
                assert!(parts.iter().all(|p| p.start < p.end && p.end <= size), "{text:?} {size}: {parts:?}");
                assert!(parts.len() <= MAX_RANGES);
            }
            let _ = http_date(time_from_secs(next()));
        }
    }

    #[test]
    fn conditionals() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_533_596_700);
        let date = http_date(whole_seconds(t));
        assert!(not_modified_since(&date, t));
        assert!(!not_modified_since(&http_date(UNIX_EPOCH + Duration::from_secs(1_795_533_595)), t));
        assert!(!not_modified_since("garbage", t));
        assert!(none_match("\"x\", \"abc\"", "\"abc\""));
        assert!(none_match("W/\"abc\"", "\"abc\""));
        assert!(!none_match("\"abd\"", "\"abc\""));
        assert!(if_range_matches("\"abc\"", "\"abc\"", t));
        assert!(if_range_matches(&date, "\"abc\"", t));
        assert!(!if_range_matches("W/\"abc\"", "\"abc\"", t));
    }

    use crate::testutil::Rng;

    /// Sizes and offsets from the edges where arithmetic breaks, and anywhere between.
    fn edgy(rng: &mut Rng, size: u64) -> u64 {
        match rng.below(9) {
            0 => 0,
            1 => 1,
            2 => size.saturating_sub(1),
            3 => size,
            4 => size.saturating_add(1),
            5 => u64::MAX,
            6 => u64::MAX - 1,
            7 => i64::MAX as u64,
            _ => rng.below(size.saturating_add(2)),
        }
    }

    /// Range parsing against a model in u128 (no overflow possible there), for sizes and bounds
    /// up to u64::MAX, single parts and up to MAX_RANGES + 6 parts.
    #[test]
    fn property_ranges_match_a_u128_model_and_never_overflow() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..50_000 {
            let size = match rng.below(4) {
                0 => rng.below(100),
                1 => u64::MAX - rng.below(3),
                2 => i64::MAX as u64,
                _ => rng.next(),
            };
            let n = if rng.below(3) == 0 { 1 } else { 1 + rng.below(MAX_RANGES as u64 + 6) as usize };
            let mut specs = Vec::new();
            // The model: None for an unsatisfiable part, Some((start, end)) in u128.
            let mut model: Vec<Option<(u128, u128)>> = Vec::new();
            let mut syntactically_full = false;
            for _ in 0..n {
                match rng.below(3) {
                    0 => {
                        let k = edgy(&mut rng, size);
                        specs.push(format!("-{k}"));
                        model.push((k > 0 && size > 0).then(|| ((size - k.min(size)) as u128, size as u128)));
                    }
                    1 => {
                        let a = edgy(&mut rng, size);
                        specs.push(format!("{a}-"));
                        model.push((a < size).then_some((a as u128, size as u128)));
                    }
                    _ => {
                        let (a, b) = (edgy(&mut rng, size), edgy(&mut rng, size));
                        specs.push(format!("{a}-{b}"));
                        if b < a {
                            syntactically_full = true;
                        }
                        model.push((a < size && b >= a).then(|| (a as u128, (b as u128 + 1).min(size as u128))));
                    }
                }
            }
            let header = format!("bytes={}", specs.join(","));
            let got = parse_ranges(&header, size);
            let want_parts: Vec<(u128, u128)> = model.iter().flatten().copied().collect();
            let total: u128 = want_parts.iter().map(|(a, b)| b - a).sum();
            let want = if syntactically_full || n > MAX_RANGES {
                Ranges::Full
            } else if want_parts.is_empty() {
                Ranges::Unsatisfiable
            } else if want_parts.len() > 1 && total > size as u128 {
                Ranges::Full
            } else {
                Ranges::Partial(want_parts.iter().map(|&(a, b)| r(a as u64, b as u64)).collect())
            };
            assert_eq!(got, want, "{header} against {size} bytes");
        }
        // The sums the issue names: one part spanning everything, and many whose total wraps u64.
        assert_eq!(parse_ranges("bytes=0-18446744073709551615", 10), Ranges::Partial(vec![r(0, 10)]));
        assert_eq!(parse_ranges("bytes=0-18446744073709551615", u64::MAX), Ranges::Partial(vec![r(0, u64::MAX)]));
        let wrap = format!("bytes={}", ["0-18446744073709551614"; 5].join(","));
        assert_eq!(parse_ranges(&wrap, u64::MAX), Ranges::Full);
        let wrap = format!("bytes={}", ["1-"; 3].join(","));
        assert_eq!(parse_ranges(&wrap, 1 << 63), Ranges::Full);
        assert_eq!(parse_ranges("bytes=18446744073709551616-", 10), Ranges::Full, "beyond u64 is malformed");
    }

    /// Heads built from random header sets (names in random case, legal values) parse back to
    /// what was put in; the same heads with one byte flipped never panic the parser.
    #[test]
    fn property_heads_round_trip() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let value = |rng: &mut Rng| -> String {
            let alphabet = b"abcXYZ0129 -_.,;:=\"/*\t";
            let len = rng.below(20) as usize;
            let v: String = (0..len).map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char).collect();
            let v = v.trim_matches([' ', '\t']).to_string();
            if v.is_empty() { "v".into() } else { v }
        };
        let case = |rng: &mut Rng, name: &str| -> String {
            name.chars().map(|c| if rng.below(2) == 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect()
        };
        for _ in 0..20_000 {
            let method = ["GET", "HEAD", "OPTIONS", "M-SEARCH"][rng.below(4) as usize];
            let http11 = rng.below(2) == 0;
            let target = format!("/t/p{}?q={}", rng.below(1000), rng.below(10));
            let mut head = format!("{method} {target} HTTP/1.{}\r\n", u8::from(http11));
            let mut fields: Vec<(&str, String)> = Vec::new();
            let host = format!("h{}:{}", rng.below(10), rng.below(65536));
            if http11 || rng.below(2) == 0 {
                fields.push(("host", host.clone()));
            }
            for name in ["range", "if-range", "if-modified-since", "if-none-match", "x-other"] {
                if rng.below(2) == 0 {
                    fields.push((name, value(&mut rng)));
                }
            }
            let close = rng.below(3) == 0;
            if close {
                fields.push(("connection", "close".into()));
            }
            for (name, v) in &fields {
                head.push_str(&format!("{}:{}{v}\r\n", case(&mut rng, name), [" ", "", "\t"][rng.below(3) as usize]));
            }
            head.push_str("\r\n");
            let req = parse_head(head.as_bytes()).unwrap_or_else(|e| panic!("{head:?}: {e:?}"));
            let field = |n: &str| fields.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
            assert_eq!(req.method_text, method);
            assert_eq!(req.target, target);
            assert_eq!(req.http11, http11);
            assert_eq!(req.host, field("host"));
            assert_eq!(req.range, field("range"));
            assert_eq!(req.if_range, field("if-range"));
            assert_eq!(req.if_modified_since, field("if-modified-since"));
            assert_eq!(req.if_none_match, field("if-none-match"));
            assert_eq!(req.keep_alive, http11 && !close);
            assert!(!req.has_body);
            assert_eq!(head_end(head.as_bytes()), Some(head.len()));
            let mut bytes = head.into_bytes();
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] = rng.next() as u8;
            if let Some(end) = head_end(&bytes) {
                let _ = parse_head(&bytes[..end]);
            }
        }
    }

    /// Path decoding: any segment made of safe bytes, percent-encoded at random, decodes to
    /// itself; whatever is accepted never holds a separator, NUL, backslash or dot segment.
    #[test]
    fn property_path_decoding() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let safe = b"abcxyzABC019-_.+~@";
        let hostile = b"/\\\0.%\x01\x7f\xff ";
        for _ in 0..20_000 {
            let n = 1 + rng.below(4) as usize;
            let mut segs = Vec::new();
            let mut target = String::new();
            for _ in 0..n {
                let len = 1 + rng.below(12) as usize;
                let mut seg: String = (0..len).map(|_| safe[rng.below(safe.len() as u64) as usize] as char).collect();
                if seg.starts_with('.') || seg.ends_with(".tmp") || seg.ends_with(".partial") {
                    seg.insert(0, 'x');
                }
                target.push('/');
                for b in seg.bytes() {
                    if rng.below(4) == 0 {
                        target.push_str(&if rng.below(2) == 0 { format!("%{b:02X}") } else { format!("%{b:02x}") });
                    } else {
                        target.push(b as char);
                    }
                }
                segs.push(seg);
            }
            assert_eq!(decode_target(&target).as_ref(), Ok(&segs), "{target}");
            // One hostile byte, raw or encoded, somewhere.
            let b = hostile[rng.below(hostile.len() as u64) as usize];
            let at = 1 + rng.below(target.len() as u64 - 1) as usize;
            let mut bad = target.clone().into_bytes();
            let piece = if rng.below(2) == 0 { vec![b] } else { format!("%{b:02x}").into_bytes() };
            bad.splice(at..at, piece);
            let Ok(bad) = String::from_utf8(bad) else { continue };
            if let Ok(out) = decode_target(&bad) {
                for s in &out {
                    assert!(s != "." && s != ".." && !s.contains(['/', '\\', '\0']), "{bad:?} -> {s:?}");
                    assert!(!s.bytes().any(|c| c < 0x20 || c == 0x7f), "{bad:?} -> {s:?}");
                }
            }
        }
    }
}

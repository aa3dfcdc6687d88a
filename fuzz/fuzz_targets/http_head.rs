//! Fuzzes what `dbh serve` reads from the network: the request head parser, request-target
//! decoding and `Range` parsing. Nothing may panic; decoded paths never hold `..`, `.` or a
//! separator, and every satisfiable range lies inside the representation.
#![no_main]

use dbh::serve::http::{self, Ranges};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let size = data.first().map_or(0, |b| u64::from(*b) * 97);
    if let Some(end) = http::head_end(data) {
        if let Ok(req) = http::parse_head(&data[..end]) {
            if let Ok(segments) = http::decode_target(&req.target) {
                for s in &segments {
                    assert!(s != "." && s != ".." && !s.contains('/') && !s.contains('\0'));
                }
            }
            if let Some(r) = &req.range
                && let Ranges::Partial(parts) = http::parse_ranges(r, size)
            {
                assert!(parts.iter().all(|p| p.start < p.end && p.end <= size));
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    let _ = http::decode_target(&text);
    if let Ranges::Partial(parts) = http::parse_ranges(&text, size) {
        assert!(parts.iter().all(|p| p.start < p.end && p.end <= size));
    }
    let _ = http::http_date(http::time_from_secs(size.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
});

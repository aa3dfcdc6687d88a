//! GPKG reader and verifier on arbitrary bytes: errors are fine, panics and hangs are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dbh::binpkg::read_gpkg_bytes(data);
    let _ = dbh::binpkg::verify_gpkg_bytes(data);
});

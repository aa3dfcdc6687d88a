//! Fuzzes the GPKG image walk `binhost add` runs before signing (member names, link targets,
//! member kinds): no input may panic it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dbh::binpkg::check_image_bytes(data);
});

//! Fuzzes the `Packages` index parser: no input may panic it, and whatever it accepts must render
//! to an index that parses back to the same rendering (what `dbh binhost index` relies on when it
//! rewrites an existing index).
#![no_main]

use dbh::binhost::Index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = Index::parse(data) {
        let text = index.render();
        let again = Index::parse(text.as_bytes()).expect("a rendered index parses");
        assert_eq!(again.render(), text);
    }
});

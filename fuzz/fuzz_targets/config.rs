//! `dr::validate::parse` (`Config::parse` and every engine's checks) on
//! arbitrary text: an `Err` at worst, never a panic; an accepted config
//! displays its error locations without panicking either.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match dr::validate::parse(text, Path::new("fuzz.toml")) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

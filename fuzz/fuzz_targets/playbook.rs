//! The playbook loader (`Playbook::parse`) on arbitrary text: an `Err` at
//! worst, never a panic.
#![no_main]

use std::path::Path;

use dr::playbook::Playbook;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Playbook::parse(text, Path::new("fuzz.toml")) {
        Ok(p) => {
            let _ = format!("{p:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

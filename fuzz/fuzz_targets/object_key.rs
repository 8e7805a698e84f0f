//! Object keys read from a store listing: never a panic, and a key that
//! parses is the canonical name of what it parses to (Display gives the
//! same string back), so two names never mean one object.
#![no_main]

use dr::repo::layout::{BackupId, ObjectKey, WalSegmentName, WalSuffix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(k) = s.parse::<ObjectKey>() {
        assert_eq!(k.to_string(), s, "a key that is not its canonical name");
    }
    if let Ok(id) = s.parse::<BackupId>() {
        assert_eq!(id.to_string(), s, "a backup id that is not canonical");
    }
    if let Ok(n) = s.parse::<WalSegmentName>() {
        assert_eq!(n.to_string(), s, "a WAL name that is not canonical");
    }
    if let Some(x) = WalSuffix::parse(s) {
        assert_eq!(x.to_string(), s, "a WAL suffix that is not canonical");
    }
    if let Ok(l) = s.parse::<dr::postgres::Lsn>() {
        let back: dr::postgres::Lsn = l.to_string().parse().expect("an LSN reads back");
        assert_eq!(back, l);
    }
});

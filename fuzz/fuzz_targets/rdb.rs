//! The RDB stream checker: never a panic, the same verdict whatever the
//! split, and a payload it accepts ends with the EOF opcode and a CRC-64
//! that matches (or is zero: checksums turned off).
#![no_main]

use dr::redis::rdb::{RdbCheck, crc64};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn check(data: &[u8], cuts: &[usize]) -> Result<dr::redis::rdb::RdbSummary, String> {
    let mut at = cuts.to_vec();
    at.push(0);
    at.push(data.len());
    at.sort_unstable();
    let mut c = RdbCheck::new();
    for w in at.windows(2) {
        c.update(&data[w[0]..w[1]]).map_err(|e| e.to_string())?;
    }
    c.finish().map_err(|e| e.to_string())
}

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = common::split(data, 3) else {
        return;
    };
    // Mode 1: a payload made valid (EOF opcode and its real CRC appended),
    // so the fuzzer explores the accepting side too.
    let owned;
    let body = if head[0] & 1 == 1 {
        let mut v = body.to_vec();
        v.push(0xff);
        let crc = crc64(0, &v);
        v.extend_from_slice(&crc.to_le_bytes());
        owned = v;
        &owned[..]
    } else {
        body
    };
    let whole = check(body, &[]);
    let pieces = check(body, &common::cuts(body.len(), head[1], head[2]));
    assert_eq!(
        format!("{whole:?}"),
        format!("{pieces:?}"),
        "the split changed the verdict"
    );
    if let Ok(s) = whole {
        let n = body.len();
        assert_eq!(s.size, n as u64);
        assert!(n >= 18 && body.starts_with(b"REDIS"));
        assert_eq!(body[n - 9], 0xff, "accepted without the EOF opcode");
        let stored = u64::from_le_bytes(body[n - 8..].try_into().expect("8 bytes"));
        assert!(
            stored == 0 || stored == crc64(0, &body[..n - 8]),
            "accepted with a wrong CRC"
        );
        assert_eq!(s.checksummed, stored != 0);
    }
});

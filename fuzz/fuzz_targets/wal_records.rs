//! The WAL record reader that finds a segment's last commit: never a
//! panic on any segment, and a commit it reports lies inside the segment.
#![no_main]

use std::sync::Mutex;

use dr::postgres::WAL_SEGMENT_SIZE;
use dr::postgres::wal_records::last_commit;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// One zeroed segment, reused: the input is copied to its front.
static SEGMENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = common::split(data, 5) else {
        return;
    };
    // A segment number as a segment name gives it: log * 256 + seg.
    let log = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let segno = u64::from(log) * 256 + u64::from(head[4]);
    // Short input is not a segment.
    assert!(last_commit(body, segno).is_none());
    let mut seg = SEGMENT.lock().unwrap_or_else(|e| e.into_inner());
    if seg.is_empty() {
        seg.resize(WAL_SEGMENT_SIZE as usize, 0);
    }
    let n = body.len().min(seg.len());
    seg[..n].copy_from_slice(&body[..n]);
    if let Some(c) = last_commit(&seg, segno) {
        let base = segno * WAL_SEGMENT_SIZE;
        assert!(
            c.lsn.0 >= base && c.lsn.0 < base + WAL_SEGMENT_SIZE,
            "a commit outside the segment"
        );
        assert_eq!(c.lsn.0 % 8, 0, "a record start that is not aligned");
    }
    seg[..n].fill(0);
});

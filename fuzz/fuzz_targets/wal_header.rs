//! The WAL page header check run before a file is archived under a segment
//! name: never a panic, and what it accepts really is that segment of that
//! cluster (full size, WAL magic, the name's timeline and address, the
//! system identifier).
#![no_main]

use std::sync::Mutex;

use dr::postgres::WAL_SEGMENT_SIZE;
use dr::postgres::wal_header::{LongPageHeader, check_segment};
use dr::repo::layout::{TimelineId, WalSegmentName};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// One zeroed segment, reused: the input is copied to its front.
static SEGMENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fuzz_target!(|data: &[u8]| {
    let Some((head, page)) = common::split(data, 17) else {
        return;
    };
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let name = WalSegmentName {
        timeline: TimelineId(word(0)),
        log: word(4),
        seg: word(8),
    };
    let system_id = u64::from(word(12)) | u64::from(head[16]) << 32;
    let _ = LongPageHeader::parse(page);
    // The short input itself: never a whole segment.
    assert!(check_segment(&name, system_id, page).is_err());
    let mut seg = SEGMENT.lock().unwrap_or_else(|e| e.into_inner());
    if seg.is_empty() {
        seg.resize(WAL_SEGMENT_SIZE as usize, 0);
    }
    let n = page.len().min(seg.len());
    seg[..n].copy_from_slice(&page[..n]);
    let r = check_segment(&name, system_id, &seg);
    if r.is_ok() {
        let h = LongPageHeader::parse(&seg).expect("accepted without a header");
        assert_eq!(h.magic & 0xff00, 0xd100);
        // A new timeline's first segment is a copy of its parent's.
        assert!(
            h.timeline >= 1 && h.timeline <= name.timeline.0,
            "accepted a newer timeline"
        );
        assert_eq!(h.system_id, system_id, "accepted another cluster");
        assert!(
            u64::from(name.seg) < (1 << 32) / WAL_SEGMENT_SIZE,
            "impossible segment number accepted"
        );
        let addr = (u64::from(name.log) << 32) | (u64::from(name.seg) * WAL_SEGMENT_SIZE);
        assert_eq!(h.page_addr, addr, "accepted another segment's address");
    }
    seg[..n].fill(0);
});

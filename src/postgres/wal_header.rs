//! The long page header at the start of every WAL segment, checked before a
//! file is archived under a segment name. Archiving is write-once: a file that
//! is not the segment it is named after would block the real one forever.

use super::WAL_SEGMENT_SIZE;
use crate::repo::layout::WalSegmentName;

/// `XLP_LONG_HEADER`: the first page of a segment carries the long header.
const XLP_LONG_HEADER: u16 = 0x0002;
/// Size of `XLogLongPageHeaderData` on every supported platform.
const LONG_HEADER_LEN: usize = 40;

/// What the first page of a segment says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    /// `xlp_magic`: the WAL format version (0xD110 for PostgreSQL 15).
    pub magic: u16,
    /// `xlp_info` flags.
    pub info: u16,
    /// `xlp_tli`: timeline of the page.
    pub timeline: u32,
    /// `xlp_pageaddr`: WAL address of the page.
    pub page_addr: u64,
    /// `xlp_sysid`: database system identifier.
    pub system_id: u64,
    /// `xlp_seg_size`: segment size in bytes.
    pub seg_size: u32,
    /// `xlp_xlog_blcksz`: WAL block size in bytes.
    pub block_size: u32,
}

impl LongPageHeader {
    /// Parses the header from the first bytes of a segment (little-endian, as
    /// PostgreSQL writes it on the platforms dr runs on).
    pub fn parse(data: &[u8]) -> Option<LongPageHeader> {
        let b = data.get(..LONG_HEADER_LEN)?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Some(LongPageHeader {
            magic: u16_at(0),
            info: u16_at(2),
            timeline: u32_at(4),
            page_addr: u64_at(8),
            // 16: xlp_rem_len (u32) and 4 bytes of padding.
            system_id: u64_at(24),
            seg_size: u32_at(32),
            block_size: u32_at(36),
        })
    }
}

crate::message_error!(
    /// Bytes that are not the WAL segment they claim to be; says which check failed.
    InvalidSegment
);

/// Checks that `data` is the WAL segment `name` of the cluster `system_id`:
/// full size, a long page header with a WAL magic, the segment's own timeline
/// and address, and the cluster's system identifier. The error says which
/// check failed, in words an operator can act on.
pub fn check_segment(
    name: &WalSegmentName,
    system_id: u64,
    data: &[u8],
) -> Result<(), InvalidSegment> {
    if data.len() as u64 != WAL_SEGMENT_SIZE {
        return Err(format!(
            "is {} bytes, but a WAL segment is {WAL_SEGMENT_SIZE} bytes",
            data.len()
        )
        .into());
    }
    let h = LongPageHeader::parse(data).ok_or("has no WAL page header")?;
    // Every release so far uses 0xD1xx; the low byte changes per major version.
    if h.magic & 0xff00 != 0xd100 {
        return Err(format!(
            "does not start with a WAL page header (magic {:#06x})",
            h.magic
        )
        .into());
    }
    if h.info & XLP_LONG_HEADER == 0 {
        return Err("its first page lacks the long header a segment starts with".into());
    }
    if u64::from(h.seg_size) != WAL_SEGMENT_SIZE {
        return Err(format!(
            "has segment size {} in its header, expected {WAL_SEGMENT_SIZE}",
            h.seg_size
        )
        .into());
    }
    // The first segment of a new timeline starts as a copy of its parent's
    // segment, page headers included: an older timeline is fine, a newer or
    // zero one is not.
    if h.timeline == 0 || h.timeline > name.timeline.0 {
        return Err(format!(
            "belongs to timeline {} but its name says timeline {}",
            h.timeline, name.timeline.0
        )
        .into());
    }
    let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
    if u64::from(name.seg) >= per_log {
        return Err(format!(
            "is named as segment {:#x} of a log, but a log has only {per_log}",
            name.seg
        )
        .into());
    }
    let want = (u64::from(name.log) * per_log + u64::from(name.seg)) * WAL_SEGMENT_SIZE;
    if h.page_addr != want {
        return Err(format!(
            "starts at WAL address {} but its name says {}",
            super::Lsn(h.page_addr),
            super::Lsn(want)
        )
        .into());
    }
    if h.system_id != system_id {
        return Err(format!(
            "belongs to database system {} but this cluster is {system_id}",
            h.system_id
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(name: &str, system_id: u64) -> (WalSegmentName, Vec<u8>) {
        let n: WalSegmentName = name.parse().expect("name");
        let mut d = vec![0u8; WAL_SEGMENT_SIZE as usize];
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let addr = (u64::from(n.log) * per_log + u64::from(n.seg)) * WAL_SEGMENT_SIZE;
        d[0..2].copy_from_slice(&0xd110u16.to_le_bytes());
        d[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        d[4..8].copy_from_slice(&n.timeline.0.to_le_bytes());
        d[8..16].copy_from_slice(&addr.to_le_bytes());
        d[24..32].copy_from_slice(&system_id.to_le_bytes());
        d[32..36].copy_from_slice(&(WAL_SEGMENT_SIZE as u32).to_le_bytes());
        d[36..40].copy_from_slice(&8192u32.to_le_bytes());
        (n, d)
    }

    #[test]
    fn a_real_shaped_segment_passes() {
        let (n, d) = segment("0000000300000001000000A2", 42);
        assert_eq!(check_segment(&n, 42, &d), Ok(()));
    }

    #[test]
    fn a_new_timeline_may_start_with_its_parents_pages() {
        let (n, mut d) = segment("000000040000000000000004", 42);
        d[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(check_segment(&n, 42, &d), Ok(()));
    }

    #[test]
    fn each_mismatch_is_named() {
        let (n, d) = segment("000000010000000000000005", 42);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (d[..8].to_vec(), "bytes"),
            (
                {
                    let mut x = d.clone();
                    x[0] = 0;
                    x[1] = 0;
                    x
                },
                "magic",
            ),
            (
                {
                    let mut x = d.clone();
                    x[2] = 0;
                    x
                },
                "long header",
            ),
            (
                {
                    let mut x = d.clone();
                    x[4] = 2;
                    x
                },
                "timeline 2 but",
            ),
            (
                {
                    let mut x = d.clone();
                    x[10] ^= 1;
                    x
                },
                "WAL address",
            ),
        ];
        for (data, needle) in cases {
            let e = check_segment(&n, 42, &data).expect_err(needle);
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
        let e = check_segment(&n, 43, &d).expect_err("system");
        assert!(e.contains("database system 42"), "{e}");
        let (other, _) = segment("000000010000000000000006", 42);
        assert!(check_segment(&other, 42, &d).is_err());
    }
}

/// The check against segments made to measure: every real-shaped segment
/// of any name and cluster passes; a change to any checked header field
/// fails unless the format allows it (an older timeline); a name with an
/// impossible segment number is refused, never a panic.
#[cfg(test)]
mod props {
    use super::*;
    use crate::repo::layout::TimelineId;
    use proptest::prelude::*;

    fn made(name: &WalSegmentName, system_id: u64) -> Vec<u8> {
        let mut d = vec![0u8; WAL_SEGMENT_SIZE as usize];
        let addr = (u64::from(name.log) << 32) | (u64::from(name.seg) * WAL_SEGMENT_SIZE);
        d[0..2].copy_from_slice(&0xd110u16.to_le_bytes());
        d[2..4].copy_from_slice(&(XLP_LONG_HEADER | 0x0004).to_le_bytes());
        d[4..8].copy_from_slice(&name.timeline.0.to_le_bytes());
        d[8..16].copy_from_slice(&addr.to_le_bytes());
        d[24..32].copy_from_slice(&system_id.to_le_bytes());
        d[32..36].copy_from_slice(&(WAL_SEGMENT_SIZE as u32).to_le_bytes());
        d[36..40].copy_from_slice(&8192u32.to_le_bytes());
        d
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn made_segments_pass_and_damaged_headers_fail(
            tli in 1u32..,
            log in any::<u32>(),
            seg in 0u32..256,
            system_id in any::<u64>(),
            byte in prop::sample::select(vec![1usize, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35]),
            bit in 0u8..8,
            bad_seg in 256u32..,
        ) {
            let name = WalSegmentName { timeline: TimelineId(tli), log, seg };
            let mut d = made(&name, system_id);
            prop_assert_eq!(check_segment(&name, system_id, &d), Ok(()));
            prop_assert_eq!(&name.to_string().parse::<WalSegmentName>(), &Ok(name));
            if byte == 2 {
                d[2] &= !(XLP_LONG_HEADER as u8);
            } else {
                d[byte] ^= 1 << bit;
            }
            let r = check_segment(&name, system_id, &d);
            if (4..8).contains(&byte) {
                let t = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                prop_assert_eq!(r.is_ok(), t != 0 && t <= tli, "timeline {} in {}", t, name);
            } else {
                prop_assert!(r.is_err(), "byte {} bit {} accepted", byte, bit);
            }
            // Another cluster, a truncated file, an impossible name.
            prop_assert!(check_segment(&name, system_id ^ 1, &made(&name, system_id)).is_err());
            prop_assert!(check_segment(&name, system_id, &d[..d.len() - 1]).is_err());
            let impossible = WalSegmentName { seg: bad_seg, ..name };
            prop_assert!(check_segment(&impossible, system_id, &made(&name, system_id)).is_err());
            prop_assert!(impossible.to_string().parse::<WalSegmentName>().is_err());
        }
    }
}

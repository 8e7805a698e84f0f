//! Just enough of the WAL record format to find commit times: recovery to a
//! time stops at the first commit or abort after it, so the newest point a
//! time target can reach is the last commit in the archived WAL, not the
//! moment its segment was archived. PostgreSQL 15 layout (8 KiB WAL pages).

use chrono::{DateTime, Utc};

use super::WAL_SEGMENT_SIZE;

const PAGE: usize = 8192;
const SHORT_HEADER: usize = 24;
const LONG_HEADER: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;
const RECORD_HEADER: usize = 24;
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET: i64 = 946_684_800;

/// Reads a segment's bytes as the record stream, skipping page headers.
struct Stream<'a> {
    data: &'a [u8],
    base: u64,
}

impl Stream<'_> {
    fn header_len(&self, page_start: usize) -> Option<usize> {
        let h = self.data.get(page_start..page_start + 16)?;
        let magic = u16::from_le_bytes([h[0], h[1]]);
        let info = u16::from_le_bytes([h[2], h[3]]);
        let addr = u64::from_le_bytes(h[8..16].try_into().ok()?);
        // A page of another address is left over from a recycled file.
        if magic & 0xff00 != 0xd100 || addr != self.base + page_start as u64 {
            return None;
        }
        Some(if info & XLP_LONG_HEADER != 0 {
            LONG_HEADER
        } else {
            SHORT_HEADER
        })
    }

    /// Where record data continues at or after `pos`: past a page header
    /// when `pos` is at a page start.
    fn skip_header(&self, pos: usize) -> Option<usize> {
        if pos.is_multiple_of(PAGE) {
            Some(pos + self.header_len(pos)?)
        } else {
            Some(pos)
        }
    }

    /// Copies `n` record bytes from `pos`; returns them and the position after.
    fn read(&self, mut pos: usize, n: usize) -> Option<(Vec<u8>, usize)> {
        // `n` comes from the segment: never reserve more than it holds.
        let mut out = Vec::with_capacity(n.min(self.data.len()));
        while out.len() < n {
            pos = self.skip_header(pos)?;
            let page_end = (pos / PAGE + 1) * PAGE;
            let take = (n - out.len()).min(page_end - pos);
            out.extend_from_slice(self.data.get(pos..pos + take)?);
            pos += take;
        }
        Some((out, pos))
    }
}

/// The last commit or abort record that starts and ends in this segment
/// (`data`, the whole segment; `segno` its number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCommit {
    /// Its commit (or abort) time.
    pub time: DateTime<Utc>,
    /// Where the record starts: `recovery_target_lsn` with the default
    /// `recovery_target_inclusive` stops right after it.
    pub lsn: super::Lsn,
}

/// The newest commit or abort among the records that start and end in this
/// segment; `None` when it holds none. Stops quietly at the end of the WAL
/// written into it.
pub fn last_commit(data: &[u8], segno: u64) -> Option<LastCommit> {
    if (data.len() as u64) < WAL_SEGMENT_SIZE {
        return None;
    }
    let s = Stream {
        data,
        base: segno * WAL_SEGMENT_SIZE,
    };
    let first = s.header_len(0)?;
    // A record continued from the previous segment is skipped whole.
    let rem = u32::from_le_bytes(data.get(16..20)?.try_into().ok()?) as usize;
    let mut pos = first;
    if rem > 0 {
        let (_, after) = s.read(first, rem)?;
        pos = after;
    }
    let mut newest = None;
    loop {
        pos = pos.next_multiple_of(8);
        if pos + 4 > data.len() {
            break;
        }
        let Some(start) = s.skip_header(pos) else {
            break;
        };
        let Some((head, _)) = s.read(start, RECORD_HEADER) else {
            break;
        };
        let tot_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if !(RECORD_HEADER..=1 << 30).contains(&tot_len) {
            break; // zeroes: the end of what was written
        }
        let Some((rec, after)) = s.read(start, tot_len) else {
            break; // continues into the next segment
        };
        let (info, rmid) = (rec[16], rec[17]);
        if rmid == RM_XACT_ID
            && matches!(info & XLOG_XACT_OPMASK, 0x00 | 0x20 | 0x30 | 0x40)
            && let Some(time) = xact_time(&rec)
            && newest.is_none_or(|n: LastCommit| time >= n.time)
        {
            newest = Some(LastCommit {
                time,
                lsn: super::Lsn(s.base + start as u64),
            });
        }
        pos = after;
    }
    newest
}

/// The `xact_time` at the start of a commit or abort record's main data.
fn xact_time(rec: &[u8]) -> Option<DateTime<Utc>> {
    let main_len = main_data_len(rec)?;
    let main = rec.get(rec.len().checked_sub(main_len)?..)?;
    let us = i64::from_le_bytes(main.get(..8)?.try_into().ok()?);
    let secs = us.div_euclid(1_000_000) + PG_EPOCH_OFFSET;
    let nanos = (us.rem_euclid(1_000_000) * 1000) as u32;
    DateTime::from_timestamp(secs, nanos)
}

/// Walks the block headers after the record header to the main data length.
fn main_data_len(rec: &[u8]) -> Option<usize> {
    let mut p = RECORD_HEADER;
    loop {
        let id = *rec.get(p)?;
        p += 1;
        match id {
            255 => return rec.get(p).map(|l| *l as usize),
            254 => {
                return Some(u32::from_le_bytes(rec.get(p..p + 4)?.try_into().ok()?) as usize);
            }
            253 => p += 2,
            252 => p += 4,
            0..=32 => {
                let fork_flags = *rec.get(p)?;
                p += 3; // fork_flags, data_length
                if fork_flags & 0x10 != 0 {
                    let bimg_info = *rec.get(p + 4)?;
                    p += 5; // length, hole_offset, bimg_info
                    if bimg_info & 0x01 != 0 && bimg_info & (0x04 | 0x08 | 0x10) != 0 {
                        p += 2; // hole_length of a compressed image
                    }
                }
                if fork_flags & 0x80 == 0 {
                    p += 12; // RelFileNode
                }
                p += 4; // BlockNumber
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment with one page header and the given records laid out the way
    /// PostgreSQL lays them out (8-byte aligned, page headers skipped).
    fn segment(segno: u64, records: &[Vec<u8>]) -> Vec<u8> {
        let mut d = vec![0u8; WAL_SEGMENT_SIZE as usize];
        let base = segno * WAL_SEGMENT_SIZE;
        for page in (0..d.len()).step_by(PAGE) {
            d[page..page + 2].copy_from_slice(&0xd110u16.to_le_bytes());
            let info: u16 = if page == 0 { XLP_LONG_HEADER } else { 0 };
            d[page + 2..page + 4].copy_from_slice(&info.to_le_bytes());
            d[page + 8..page + 16].copy_from_slice(&(base + page as u64).to_le_bytes());
        }
        let mut pos = LONG_HEADER;
        for r in records {
            let mut written = 0;
            while written < r.len() {
                if pos.is_multiple_of(PAGE) {
                    pos += SHORT_HEADER;
                }
                let room = (pos / PAGE + 1) * PAGE - pos;
                let take = room.min(r.len() - written);
                d[pos..pos + take].copy_from_slice(&r[written..written + take]);
                written += take;
                pos += take;
            }
            pos = pos.next_multiple_of(8);
        }
        d
    }

    fn record(rmid: u8, info: u8, main: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER];
        r[16] = info;
        r[17] = rmid;
        r.push(255);
        r.push(main.len() as u8);
        r.extend_from_slice(main);
        let len = r.len() as u32;
        r[0..4].copy_from_slice(&len.to_le_bytes());
        r
    }

    fn commit(at: DateTime<Utc>) -> Vec<u8> {
        let us = (at.timestamp() - PG_EPOCH_OFFSET) * 1_000_000
            + i64::from(at.timestamp_subsec_micros());
        let mut main = us.to_le_bytes().to_vec();
        main.extend_from_slice(&[0; 8]);
        record(RM_XACT_ID, 0x00, &main)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Damaged WAL never panics the parsers, and a commit is only ever
        /// reported inside the segment.
        #[test]
        fn damaged_segments_never_panic(
            edits in proptest::collection::vec((0usize..(WAL_SEGMENT_SIZE as usize), proptest::prelude::any::<u8>()), 1..64),
            cut in proptest::option::of(0usize..(WAL_SEGMENT_SIZE as usize)),
        ) {
            let t = DateTime::from_timestamp(1_800_000_000, 0).expect("t");
            let filler = record(10, 0, &[9u8; 120]);
            let mut recs = vec![commit(t)];
            recs.extend(std::iter::repeat_n(filler, 300));
            recs.push(commit(t));
            let mut seg = segment(7, &recs);
            // Edits land near the records most of the time.
            for (at, b) in edits {
                let i = at % (PAGE * 6);
                seg[i] = b;
            }
            if let Some(c) = cut {
                seg.truncate(c);
            }
            if let Some(c) = last_commit(&seg, 7) {
                let lsn = c.lsn.0;
                proptest::prop_assert!((7 * WAL_SEGMENT_SIZE..8 * WAL_SEGMENT_SIZE).contains(&lsn));
            }
            let name: crate::repo::layout::WalSegmentName = "000000010000000000000007".parse().expect("name");
            let _ = super::super::wal_header::check_segment(&name, 1, &seg);
        }
    }

    #[test]
    fn a_huge_continuation_length_reserves_nothing_huge() {
        // xlp_rem_len of 4 GiB in a damaged first page: skipped, not
        // allocated (libFuzzer's malloc limit would report it).
        let mut seg = segment(3, &[commit(DateTime::from_timestamp(1, 0).expect("t"))]);
        seg[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(last_commit(&seg, 3), None);
    }

    #[test]
    fn finds_the_newest_commit_across_page_boundaries() {
        let t1 = DateTime::from_timestamp(1_800_000_000, 123_000).expect("t");
        let t2 = DateTime::from_timestamp(1_800_000_005, 456_000).expect("t");
        let filler = record(10, 0, &[7u8; 200]);
        let mut recs = vec![commit(t1)];
        // Enough records to cross into later pages, then the newest commit.
        recs.extend(std::iter::repeat_n(filler, 100));
        recs.push(commit(t2));
        recs.push(record(0, 0x40, &[0u8; 16])); // not a commit
        let seg = segment(3, &recs);
        let last = last_commit(&seg, 3).expect("a commit");
        assert_eq!(last.time, t2);
        assert!(last.lsn.0 > 3 * WAL_SEGMENT_SIZE + PAGE as u64, "{last:?}");
        // Another address in the page headers: not this segment's WAL.
        assert_eq!(last_commit(&seg, 4), None);
        assert_eq!(last_commit(&segment(3, &[]), 3), None);
        assert_eq!(last_commit(&seg[..100], 3), None);
    }
}

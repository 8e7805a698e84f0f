//! PostgreSQL data-page checksums (the algorithm of `pg_checksum_page`), used
//! to report corrupt pages while a base backup reads them.

/// PostgreSQL's page size.
pub const PAGE_SIZE: usize = 8192;
/// Pages per 1 GiB relation segment file.
pub const PAGES_PER_SEGMENT: u64 = 131_072;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// Seeds of the 32 parallel FNV-1a lanes; part of the on-disk format.
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline]
fn mix(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// The checksum PostgreSQL stores in `pd_checksum` for `page` at block `blkno`.
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    // Words first, so the 32-lane loop below is plain arithmetic the compiler
    // can vectorise; pd_checksum (bytes 8..10, low half of word 2) counts as 0.
    let mut words = [0u32; PAGE_SIZE / 4];
    for (w, b) in words.iter_mut().zip(page.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    words[2] &= 0xffff_0000;
    let mut sums = BASE_OFFSETS;
    for row in words.chunks_exact(N_SUMS) {
        for (sum, w) in sums.iter_mut().zip(row) {
            *sum = mix(*sum, *w);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            *sum = mix(*sum, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    ((folded % 65535) + 1) as u16
}

/// What checking one page found.
#[derive(Debug, PartialEq, Eq)]
pub enum PageCheck {
    /// Checksum matches (or the page is new and all zero).
    Ok,
    /// Changed after the backup started (or a partial page of a file being
    /// extended): WAL replay rewrites it, so a torn read is expected and harmless.
    ChangedSinceStart,
    /// Checksum mismatch on a page the backup relies on.
    Bad,
}

/// Checks one page read from a relation file; `start_lsn` is the backup's start.
pub fn check_page(page: &[u8], blkno: u32, start_lsn: u64) -> PageCheck {
    if page.len() != PAGE_SIZE {
        return PageCheck::ChangedSinceStart;
    }
    let upper = u16::from_le_bytes([page[14], page[15]]);
    if upper == 0 {
        // A new page: valid only if entirely zero.
        return if page.iter().all(|b| *b == 0) {
            PageCheck::Ok
        } else {
            PageCheck::Bad
        };
    }
    let hi = u32::from_le_bytes([page[0], page[1], page[2], page[3]]) as u64;
    let lo = u32::from_le_bytes([page[4], page[5], page[6], page[7]]) as u64;
    if (hi << 32 | lo) >= start_lsn {
        return PageCheck::ChangedSinceStart;
    }
    let stored = u16::from_le_bytes([page[8], page[9]]);
    if stored == page_checksum(page, blkno) {
        PageCheck::Ok
    } else {
        PageCheck::Bad
    }
}

/// For a file under `base/` or `global/` named like a relation segment
/// (`<relfilenode>[_fsm|_vm|_init][.<segno>]`), the segment number.
pub fn relation_segment(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    if !(path.starts_with("base/") || path.starts_with("global/")) {
        return None;
    }
    let (stem, seg) = match name.split_once('.') {
        Some((s, n)) => (s, n.parse::<u64>().ok()?),
        None => (name, 0),
    };
    let node = stem
        .strip_suffix("_fsm")
        .or_else(|| stem.strip_suffix("_vm"))
        .or_else(|| stem.strip_suffix("_init"))
        .unwrap_or(stem);
    (!node.is_empty() && node.bytes().all(|b| b.is_ascii_digit())).then_some(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_names() {
        assert_eq!(relation_segment("base/5/16384"), Some(0));
        assert_eq!(relation_segment("base/5/16384.3"), Some(3));
        assert_eq!(relation_segment("base/5/16384_vm"), Some(0));
        assert_eq!(relation_segment("global/pg_control"), None);
        assert_eq!(relation_segment("base/5/PG_VERSION"), None);
        assert_eq!(relation_segment("pg_xact/0000"), None);
    }

    #[test]
    fn zero_page_is_ok_and_garbage_is_bad() {
        let zero = vec![0u8; PAGE_SIZE];
        assert_eq!(check_page(&zero, 0, 1), PageCheck::Ok);
        let mut page = vec![7u8; PAGE_SIZE];
        page[0..8].copy_from_slice(&[0; 8]); // LSN 0: older than any backup
        assert_eq!(check_page(&page, 0, 1), PageCheck::Bad);
        let sum = page_checksum(&page, 0);
        page[8..10].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(check_page(&page, 0, 1), PageCheck::Ok);
        assert_eq!(
            check_page(&page, 1, 1),
            PageCheck::Bad,
            "block number is mixed in"
        );
    }
}

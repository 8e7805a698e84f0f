//! The name of a backup summary: what the catalog needs of one PostgreSQL
//! backup (timeline, LSNs, segments, times), carried in the key of an empty
//! object written once, right after the manifest. Listing the summaries of a
//! cluster is one request per thousand backups; reading every manifest is one
//! per backup. None of it is secret: no name or value from inside the
//! database, only ids, positions and times.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::{BackupId, ParseKeyError, WalSegmentName, hex8, perr};

/// What a summary key says of its backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// Backup id.
    pub backup: BackupId,
    /// Timeline the backup was taken on.
    pub timeline: u32,
    /// `pg_backup_start` LSN.
    pub start_lsn: u64,
    /// `pg_backup_stop` LSN.
    pub stop_lsn: u64,
    /// First WAL segment the backup needs.
    pub start_segment: WalSegmentName,
    /// Segment holding the stop LSN (replay must reach it).
    pub stop_segment: WalSegmentName,
    /// When the backup started.
    pub start_time: DateTime<Utc>,
    /// When it ended: the earliest point a restore of it reaches.
    pub stop_time: DateTime<Utc>,
    /// What `dr list pg` shows of its size; `None` in summaries written
    /// before sizes were part of the name (the listing reads the manifest).
    pub sizes: Option<BackupSizes>,
}

/// A backup's sizes as its manifest records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSizes {
    /// Plaintext bytes of every file.
    pub size: u64,
    /// Stored (compressed, encrypted) bytes.
    pub stored_size: u64,
    /// Files in the backup.
    pub files: u64,
}

impl BackupSummary {
    /// The summary without its sizes: what restore planning compares with
    /// the manifest (the older name form carries no sizes).
    pub fn without_sizes(mut self) -> BackupSummary {
        self.sizes = None;
        self
    }
}

impl fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Nanoseconds, so times round-trip exactly as the manifest has them.
        let ns = |t: &DateTime<Utc>| t.timestamp_nanos_opt().unwrap_or(0).max(0);
        write!(
            f,
            "{}.{:08X}.{:016X}.{:016X}.{}.{}.{}.{}",
            self.backup,
            self.timeline,
            self.start_lsn,
            self.stop_lsn,
            self.start_segment,
            self.stop_segment,
            ns(&self.start_time),
            ns(&self.stop_time)
        )?;
        match &self.sizes {
            Some(z) => write!(f, ".{}.{}.{}", z.size, z.stored_size, z.files),
            None => Ok(()),
        }
    }
}

fn hex16(s: &str) -> Option<u64> {
    if s.len() != 16
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Decimal digits as Display writes them: no sign, no leading zero.
fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Unix nanoseconds as Display writes them (no sign, no leading zero).
pub(super) fn nanos(s: &str) -> Option<DateTime<Utc>> {
    Some(DateTime::from_timestamp_nanos(decimal(s)?.try_into().ok()?))
}

impl FromStr for BackupSummary {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        // Eight fields, or eleven with the sizes appended.
        let (head, sizes) = match parts.as_slice() {
            [h @ .., a, b, c] if parts.len() == 11 => (h, Some((*a, *b, *c))),
            h => (h, None),
        };
        let [id, tli, start, stop, sseg, eseg, st, et] = head else {
            return perr("backup summary", s);
        };
        let parsed = (|| {
            Some(BackupSummary {
                backup: id.parse().ok()?,
                timeline: hex8(tli)?,
                start_lsn: hex16(start)?,
                stop_lsn: hex16(stop)?,
                start_segment: sseg.parse().ok()?,
                stop_segment: eseg.parse().ok()?,
                start_time: nanos(st)?,
                stop_time: nanos(et)?,
                sizes: match sizes {
                    Some((a, b, c)) => Some(BackupSizes {
                        size: decimal(a)?,
                        stored_size: decimal(b)?,
                        files: decimal(c)?,
                    }),
                    None => None,
                },
            })
        })();
        match parsed {
            Some(p) if p.to_string() == s => Ok(p),
            _ => perr("backup summary", s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_round_trip_and_refuse_near_misses() {
        let s = BackupSummary {
            backup: "20261125T184412Z-a1b2c3".parse().unwrap(),
            timeline: 2,
            start_lsn: 0x1_2800_0028,
            stop_lsn: 0x1_2A00_0100,
            start_segment: "000000020000000100000028".parse().unwrap(),
            stop_segment: "00000002000000010000002A".parse().unwrap(),
            start_time: DateTime::from_timestamp_nanos(1_764_096_252_123_456_789),
            stop_time: DateTime::from_timestamp_nanos(1_764_096_300_000_000_001),
            sizes: None,
        };
        let text = s.to_string();
        assert_eq!(text.parse::<BackupSummary>().unwrap(), s);
        let sized = BackupSummary {
            sizes: Some(BackupSizes {
                size: 1 << 40,
                stored_size: 0,
                files: 1234,
            }),
            ..s.clone()
        };
        let long = sized.to_string();
        assert!(long.ends_with(".1099511627776.0.1234"), "{long}");
        assert_eq!(long.parse::<BackupSummary>().unwrap(), sized);
        for bad in [
            format!("{text}.1.2"),
            format!("{text}.01.2.3"),
            format!("{text}.1.2.-3"),
            format!("{long}.4"),
        ] {
            assert!(bad.parse::<BackupSummary>().is_err(), "{bad:?} accepted");
        }
        for bad in [
            text.replace(".00000002.", ".2."),
            text.replace("1764096300000000001", "01764096300000000001"),
            format!("{text}.x"),
            text.to_lowercase(),
            "x".to_string(),
        ] {
            assert!(bad.parse::<BackupSummary>().is_err(), "{bad:?} accepted");
        }
    }
}

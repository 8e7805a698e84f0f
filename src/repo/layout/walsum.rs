//! The name of a WAL prefix summary: an empty object written once, after
//! every segment of a 4 GiB prefix (`wal/<tli>/<log>/`, segments 00..FF) is
//! archived, next to that prefix. A listing of the timeline's directory then
//! returns it with the prefixes themselves, and the catalog takes "segments
//! 00..FF exist" from one key instead of 256. It names the first and last
//! segments' hashes and archive times, which are all a listing reads of a
//! complete prefix (window ends and gap edges lie on its boundaries). None
//! of it is secret: positions, plaintext hashes of WAL and times.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::summary::nanos;
use super::{ParseKeyError, hex8, is_hash, perr};

/// What a prefix summary says of one complete WAL prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPrefixSummary {
    /// The prefix: the high 32 bits of its segments' LSNs.
    pub log: u32,
    /// BLAKE3 (as in the WAL key) of segment 00.
    pub first_hash: String,
    /// BLAKE3 of segment FF.
    pub last_hash: String,
    /// When segment 00 was archived, as the store listed it.
    pub first_time: DateTime<Utc>,
    /// When segment FF was archived.
    pub last_time: DateTime<Utc>,
}

/// The word that marks a summary of a prefix holding all 256 segments.
const FULL: &str = "full";

impl fmt::Display for WalPrefixSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = |t: &DateTime<Utc>| t.timestamp_nanos_opt().unwrap_or(0).max(0);
        write!(
            f,
            "{:08X}.{FULL}.{}.{}.{}.{}",
            self.log,
            self.first_hash,
            self.last_hash,
            ns(&self.first_time),
            ns(&self.last_time)
        )
    }
}

impl FromStr for WalPrefixSummary {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        let [log, word, a, b, ta, tb] = parts.as_slice() else {
            return perr("WAL prefix summary", s);
        };
        let parsed = (|| {
            if *word != FULL || !is_hash(a) || !is_hash(b) {
                return None;
            }
            Some(WalPrefixSummary {
                log: hex8(log)?,
                first_hash: a.to_string(),
                last_hash: b.to_string(),
                first_time: nanos(ta)?,
                last_time: nanos(tb)?,
            })
        })();
        match parsed {
            Some(p) if p.to_string() == s => Ok(p),
            _ => perr("WAL prefix summary", s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_summary_names_round_trip_and_refuse_near_misses() {
        let s = WalPrefixSummary {
            log: 0x1A,
            first_hash: "a".repeat(64),
            last_hash: "0123456789abcdef".repeat(4),
            first_time: DateTime::from_timestamp_nanos(1_764_096_252_123_456_789),
            last_time: DateTime::from_timestamp_nanos(1_764_096_300_000_000_001),
        };
        let text = s.to_string();
        assert!(text.starts_with("0000001A.full."), "{text}");
        assert_eq!(text.parse::<WalPrefixSummary>().unwrap(), s);
        for bad in [
            text.replace(".full.", ".part."),
            text.replace("0000001A", "1A"),
            text.to_uppercase(),
            format!("{text}.1"),
            text.replace("1764096300000000001", "01764096300000000001"),
        ] {
            assert!(bad.parse::<WalPrefixSummary>().is_err(), "{bad:?} accepted");
        }
    }
}

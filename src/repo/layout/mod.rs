//! Typed object keys. Every key the repository uses is built by `Display` and
//! recognised by `FromStr`, and the two round-trip. Keys carry no secrets: no
//! table, database or Redis key names, only ids, LSNs and timestamps.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Utc};

/// Error parsing a key or id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {what}: {input:?}")]
pub struct ParseKeyError {
    /// What was expected.
    pub what: &'static str,
    /// The input.
    pub input: String,
}

fn perr<T>(what: &'static str, input: &str) -> Result<T, ParseKeyError> {
    Err(ParseKeyError {
        what,
        input: input.to_string(),
    })
}

/// A backup or snapshot id: `YYYYMMDDTHHMMSSZ-xxxxxx`, sortable by time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupId {
    time: NaiveDateTime,
    suffix: String,
}

impl BackupId {
    /// A new id for `time` with a random suffix.
    pub fn new(time: DateTime<Utc>) -> BackupId {
        BackupId {
            time: time.naive_utc().with_nanosecond_zero(),
            suffix: format!("{:06x}", rand::random::<u32>() & 0xff_ffff),
        }
    }

    /// The time the id was made (second precision, UTC).
    pub fn time(&self) -> DateTime<Utc> {
        self.time.and_utc()
    }
}

trait NanoZero {
    fn with_nanosecond_zero(self) -> Self;
}

impl NanoZero for NaiveDateTime {
    fn with_nanosecond_zero(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.time.format("%Y%m%dT%H%M%SZ"), self.suffix)
    }
}

impl FromStr for BackupId {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((t, suffix)) = s.split_once('-') else {
            return perr("backup id", s);
        };
        // Exactly the digits Display writes: chrono alone also takes
        // spaces, signs and short years, which display as another id.
        let shape = t.len() == 16
            && t.bytes().enumerate().all(|(i, b)| match i {
                8 => b == b'T',
                15 => b == b'Z',
                _ => b.is_ascii_digit(),
            });
        if !shape {
            return perr("backup id", s);
        }
        let Ok(time) = NaiveDateTime::parse_from_str(t, "%Y%m%dT%H%M%SZ") else {
            return perr("backup id", s);
        };
        if suffix.len() != 6
            || !suffix
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return perr("backup id", s);
        }
        Ok(BackupId {
            time,
            suffix: suffix.to_string(),
        })
    }
}

/// A PostgreSQL timeline id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

impl FromStr for TimelineId {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex8(s).map(TimelineId).ok_or_else(|| ParseKeyError {
            what: "timeline id",
            input: s.to_string(),
        })
    }
}

/// A WAL segment file name `TTTTTTTTXXXXXXXXYYYYYYYY` (timeline, log, segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegmentName {
    /// Timeline.
    pub timeline: TimelineId,
    /// High 32 bits of the segment's LSN range ("log").
    pub log: u32,
    /// Segment number within `log`.
    pub seg: u32,
}

impl fmt::Display for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

impl FromStr for WalSegmentName {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 24
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        {
            return perr("WAL segment name", s);
        }
        let part = |r: std::ops::Range<usize>| u32::from_str_radix(&s[r], 16);
        match (part(0..8), part(8..16), part(16..24)) {
            // With 16 MiB segments, 256 make up one "log" of 4 GiB: a higher
            // segment number names no WAL position at all.
            (Ok(t), Ok(log), Ok(seg)) if seg <= MAX_SEG => Ok(WalSegmentName {
                timeline: TimelineId(t),
                log,
                seg,
            }),
            _ => perr("WAL segment name", s),
        }
    }
}

/// The highest segment number within a log: 4 GiB of 16 MiB segments.
pub const MAX_SEG: u32 = 0xFF;

/// The kind of file archived under a segment name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalSuffix {
    /// A complete segment.
    None,
    /// `.partial`: the last, incomplete segment of a timeline at promotion.
    Partial,
    /// `.XXXXXXXX.backup`: a backup history file (start offset in the segment).
    Backup(u32),
    /// `.stream.SSSSSSSS.EEEEEEEE`: bytes `[start, end)` of a segment as the
    /// streamer received them, written before the segment is complete.
    Stream {
        /// Offset of the first byte in the segment.
        start: u32,
        /// Offset after the last byte.
        end: u32,
    },
    /// `.journal.SSSSSSSS`: the synchronous streamer's append-only journal
    /// of a segment from offset `start`, on a filesystem region only. Its
    /// end is in its content, and the 64 hex digits after `-` are the
    /// journal's random id, not a content hash (the content grows).
    Journal {
        /// Offset in the segment of the first byte journaled.
        start: u32,
    },
}

impl fmt::Display for WalSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalSuffix::None => Ok(()),
            WalSuffix::Partial => f.write_str(".partial"),
            WalSuffix::Backup(off) => write!(f, ".{off:08X}.backup"),
            WalSuffix::Stream { start, end } => write!(f, ".stream.{start:08X}.{end:08X}"),
            WalSuffix::Journal { start } => write!(f, ".journal.{start:08X}"),
        }
    }
}

impl WalSuffix {
    /// Parses the part of a file name after the 24-digit segment name.
    pub fn parse(s: &str) -> Option<WalSuffix> {
        match s {
            "" => Some(WalSuffix::None),
            ".partial" => Some(WalSuffix::Partial),
            _ => {
                if let Some(range) = s.strip_prefix(".stream.") {
                    let (a, b) = range.split_once('.')?;
                    let (start, end) = (hex8(a)?, hex8(b)?);
                    return (start < end).then_some(WalSuffix::Stream { start, end });
                }
                if let Some(start) = s.strip_prefix(".journal.") {
                    return hex8(start).map(|start| WalSuffix::Journal { start });
                }
                let off = s.strip_prefix('.')?.strip_suffix(".backup")?;
                hex8(off).map(WalSuffix::Backup)
            }
        }
    }
}

/// Eight upper-case hex digits, as PostgreSQL writes them.
fn hex8(s: &str) -> Option<u32> {
    if s.len() != 8
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A name safe to use as a key component (config names: clusters, instances).
fn check_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An id filed under `<yyyy>/<mm>/`, if the directories match its time.
fn dated_id(id: &str, y: &str, m: &str) -> Option<BackupId> {
    let id: BackupId = id.parse().ok()?;
    (id.time().format("%Y").to_string() == y && id.time().format("%m").to_string() == m)
        .then_some(id)
}

/// Every kind of object the repository holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectKey {
    /// `dr-repo.json`, the plaintext repository descriptor.
    RepoInfo,
    /// `pg/<cluster>/<system-id>/backups/<id>/manifest`
    PgManifest {
        /// Cluster name from the config.
        cluster: String,
        /// PostgreSQL system identifier.
        system_id: u64,
        /// Backup id.
        backup: BackupId,
    },
    /// `pg/<cluster>/<system-id>/summaries/<summary>`: an empty object whose
    /// name says what the catalog needs of a backup, written once after its
    /// manifest (see [`BackupSummary`]).
    PgSummary {
        /// Cluster name.
        cluster: String,
        /// System identifier.
        system_id: u64,
        /// What the name says.
        summary: BackupSummary,
    },
    /// `pg/<cluster>/<system-id>/backups/<id>/started`: written once when the
    /// backup starts, so `dr expire` can tell a running backup's data (no
    /// manifest yet) from an orphan by the object's age alone.
    PgStarted {
        /// Cluster name.
        cluster: String,
        /// System identifier.
        system_id: u64,
        /// Backup id.
        backup: BackupId,
    },
    /// `pg/<cluster>/<system-id>/backups/<id>/data/<n>` (a block or a pack of small files).
    PgData {
        /// Cluster name.
        cluster: String,
        /// System identifier.
        system_id: u64,
        /// Backup that first stored it.
        backup: BackupId,
        /// Object number within the backup.
        n: u32,
    },
    /// `pg/<cluster>/<system-id>/wal/<timeline>/<log>/<segment>[suffix]-<blake3>`:
    /// a WAL segment, `.partial` segment or `.backup` history file. The plaintext
    /// hash in the name makes `wal-push` idempotent without decrypting anything.
    Wal {
        /// Cluster name.
        cluster: String,
        /// System identifier.
        system_id: u64,
        /// The segment.
        segment: WalSegmentName,
        /// Which file of that segment.
        suffix: WalSuffix,
        /// BLAKE3 of the plaintext, 64 hex digits (a journal's random id).
        hash: String,
    },
    /// `pg/<cluster>/<system-id>/wal/<timeline>/<summary>`: an empty object
    /// saying every segment of one 4 GiB prefix of the timeline is archived
    /// (see [`WalPrefixSummary`]). A hint: readers that list the prefix
    /// trust the listing.
    WalPrefixSummary {
        /// Cluster name.
        cluster: String,
        /// System identifier.
        system_id: u64,
        /// Timeline of the prefix.
        timeline: TimelineId,
        /// What the name says.
        summary: WalPrefixSummary,
    },
    /// `pg/<cluster>/<system-id>/wal/<timeline>.history-<blake3>`
    TimelineHistory {
        /// Cluster name.
        cluster: String,
        /// System identifier.
        system_id: u64,
        /// The timeline the history file describes.
        timeline: TimelineId,
        /// BLAKE3 of the plaintext, 64 hex digits.
        hash: String,
    },
    /// `redis/<instance>/snapshots/<id>/manifest`
    RedisManifest {
        /// Instance name.
        instance: String,
        /// Snapshot id.
        snapshot: BackupId,
    },
    /// `redis/<instance>/snapshots/<id>/started`: the running marker of a
    /// snapshot, as for PostgreSQL backups.
    RedisStarted {
        /// Instance name.
        instance: String,
        /// Snapshot id.
        snapshot: BackupId,
    },
    /// `redis/<instance>/snapshots/<id>/rdb`
    RedisRdb {
        /// Instance name.
        instance: String,
        /// Snapshot id.
        snapshot: BackupId,
    },
    /// `rabbitmq/<instance>/snapshots/<id>/manifest`
    RabbitManifest {
        /// Broker name.
        instance: String,
        /// Snapshot id.
        snapshot: BackupId,
    },
    /// `rabbitmq/<instance>/snapshots/<id>/started`: the running marker.
    RabbitStarted {
        /// Broker name.
        instance: String,
        /// Snapshot id.
        snapshot: BackupId,
    },
    /// `rabbitmq/<instance>/snapshots/<id>/definitions`: the export (JSON),
    /// password hashes included, so only ever stored encrypted.
    RabbitDefinitions {
        /// Broker name.
        instance: String,
        /// Snapshot id.
        snapshot: BackupId,
    },
    /// `audit/<yyyy>/<mm>/<id>`: one encrypted audit record.
    Audit {
        /// Record id (time-sortable).
        id: BackupId,
    },
    /// `reports/verify/<yyyy>/<mm>/<id>`: one encrypted scratch-restore report.
    VerifyReport {
        /// Report id (time-sortable).
        id: BackupId,
    },
    /// `reports/drill/<yyyy>/<mm>/<id>`: one encrypted drill report.
    DrillReport {
        /// Report id (time-sortable).
        id: BackupId,
    },
    /// `selftest/<id>`: a temporary object written by `dr repo selftest`.
    Selftest {
        /// Test id.
        id: BackupId,
    },
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::RepoInfo => f.write_str("dr-repo.json"),
            ObjectKey::PgManifest {
                cluster,
                system_id,
                backup,
            } => write!(f, "pg/{cluster}/{system_id}/backups/{backup}/manifest"),
            ObjectKey::PgStarted {
                cluster,
                system_id,
                backup,
            } => write!(f, "pg/{cluster}/{system_id}/backups/{backup}/started"),
            ObjectKey::PgSummary {
                cluster,
                system_id,
                summary,
            } => write!(f, "pg/{cluster}/{system_id}/summaries/{summary}"),
            ObjectKey::PgData {
                cluster,
                system_id,
                backup,
                n,
            } => write!(f, "pg/{cluster}/{system_id}/backups/{backup}/data/{n:08x}"),
            ObjectKey::Wal {
                cluster,
                system_id,
                segment,
                suffix,
                hash,
            } => write!(
                f,
                "pg/{cluster}/{system_id}/wal/{}/{:08X}/{segment}{suffix}-{hash}",
                segment.timeline, segment.log
            ),
            ObjectKey::TimelineHistory {
                cluster,
                system_id,
                timeline,
                hash,
            } => write!(f, "pg/{cluster}/{system_id}/wal/{timeline}.history-{hash}"),
            ObjectKey::WalPrefixSummary {
                cluster,
                system_id,
                timeline,
                summary,
            } => write!(f, "pg/{cluster}/{system_id}/wal/{timeline}/{summary}"),
            ObjectKey::RedisManifest { instance, snapshot } => {
                write!(f, "redis/{instance}/snapshots/{snapshot}/manifest")
            }
            ObjectKey::RedisStarted { instance, snapshot } => {
                write!(f, "redis/{instance}/snapshots/{snapshot}/started")
            }
            ObjectKey::RedisRdb { instance, snapshot } => {
                write!(f, "redis/{instance}/snapshots/{snapshot}/rdb")
            }
            ObjectKey::RabbitManifest { instance, snapshot } => {
                write!(f, "rabbitmq/{instance}/snapshots/{snapshot}/manifest")
            }
            ObjectKey::RabbitStarted { instance, snapshot } => {
                write!(f, "rabbitmq/{instance}/snapshots/{snapshot}/started")
            }
            ObjectKey::RabbitDefinitions { instance, snapshot } => {
                write!(f, "rabbitmq/{instance}/snapshots/{snapshot}/definitions")
            }
            ObjectKey::Audit { id } => {
                write!(f, "audit/{}/{id}", id.time().format("%Y/%m"))
            }
            ObjectKey::VerifyReport { id } => {
                write!(f, "reports/verify/{}/{id}", id.time().format("%Y/%m"))
            }
            ObjectKey::DrillReport { id } => {
                write!(f, "reports/drill/{}/{id}", id.time().format("%Y/%m"))
            }
            ObjectKey::Selftest { id } => write!(f, "selftest/{id}"),
        }
    }
}

impl FromStr for ObjectKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || perr("object key", s);
        let not_key = || ParseKeyError {
            what: "object key",
            input: s.to_string(),
        };
        let name = |x: &str| -> Result<String, ParseKeyError> {
            if check_name(x) {
                Ok(x.to_string())
            } else {
                perr("object key", s)
            }
        };
        let sysid = |x: &str| -> Result<u64, ParseKeyError> {
            if (x.starts_with('0') && x != "0") || !x.bytes().all(|b| b.is_ascii_digit()) {
                return perr("object key", s);
            }
            x.parse().or_else(|_| perr("object key", s))
        };
        match parts.as_slice() {
            ["dr-repo.json"] => Ok(ObjectKey::RepoInfo),
            ["pg", c, sid, "backups", b, "manifest"] => Ok(ObjectKey::PgManifest {
                cluster: name(c)?,
                system_id: sysid(sid)?,
                backup: b.parse()?,
            }),
            ["pg", c, sid, "summaries", summary] => Ok(ObjectKey::PgSummary {
                cluster: name(c)?,
                system_id: sysid(sid)?,
                summary: summary.parse()?,
            }),
            ["pg", c, sid, "backups", b, "started"] => Ok(ObjectKey::PgStarted {
                cluster: name(c)?,
                system_id: sysid(sid)?,
                backup: b.parse()?,
            }),
            ["pg", c, sid, "backups", b, "data", n] => {
                // As Display writes it: eight lower-case hex digits.
                if n.len() != 8
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return bad();
                }
                Ok(ObjectKey::PgData {
                    cluster: name(c)?,
                    system_id: sysid(sid)?,
                    backup: b.parse()?,
                    n: u32::from_str_radix(n, 16).or_else(|_| perr("object key", s))?,
                })
            }
            ["pg", c, sid, "wal", tli, log, file] => {
                let Some((fname, hash)) = file.rsplit_once('-') else {
                    return bad();
                };
                if fname.len() < 24 || !is_hash(hash) || !fname.is_char_boundary(24) {
                    return bad();
                }
                let segment: WalSegmentName = fname[..24].parse()?;
                let Some(suffix) = WalSuffix::parse(&fname[24..]) else {
                    return bad();
                };
                let tli: TimelineId = tli.parse()?;
                if segment.timeline != tli || format!("{:08X}", segment.log) != *log {
                    return bad();
                }
                Ok(ObjectKey::Wal {
                    cluster: name(c)?,
                    system_id: sysid(sid)?,
                    segment,
                    suffix,
                    hash: hash.to_string(),
                })
            }
            ["pg", c, sid, "wal", tli, summary] => Ok(ObjectKey::WalPrefixSummary {
                cluster: name(c)?,
                system_id: sysid(sid)?,
                timeline: tli.parse()?,
                summary: summary.parse()?,
            }),
            ["pg", c, sid, "wal", hist] => {
                let Some((t, hash)) = hist.split_once(".history-") else {
                    return bad();
                };
                if !is_hash(hash) {
                    return bad();
                }
                Ok(ObjectKey::TimelineHistory {
                    cluster: name(c)?,
                    system_id: sysid(sid)?,
                    timeline: t.parse()?,
                    hash: hash.to_string(),
                })
            }
            ["redis", i, "snapshots", id, "manifest"] => Ok(ObjectKey::RedisManifest {
                instance: name(i)?,
                snapshot: id.parse()?,
            }),
            ["redis", i, "snapshots", id, "started"] => Ok(ObjectKey::RedisStarted {
                instance: name(i)?,
                snapshot: id.parse()?,
            }),
            ["redis", i, "snapshots", id, "rdb"] => Ok(ObjectKey::RedisRdb {
                instance: name(i)?,
                snapshot: id.parse()?,
            }),
            ["rabbitmq", i, "snapshots", id, "manifest"] => Ok(ObjectKey::RabbitManifest {
                instance: name(i)?,
                snapshot: id.parse()?,
            }),
            ["rabbitmq", i, "snapshots", id, "started"] => Ok(ObjectKey::RabbitStarted {
                instance: name(i)?,
                snapshot: id.parse()?,
            }),
            ["rabbitmq", i, "snapshots", id, "definitions"] => Ok(ObjectKey::RabbitDefinitions {
                instance: name(i)?,
                snapshot: id.parse()?,
            }),
            ["audit", y, m, id] => Ok(ObjectKey::Audit {
                id: dated_id(id, y, m).ok_or_else(not_key)?,
            }),
            ["reports", "verify", y, m, id] => Ok(ObjectKey::VerifyReport {
                id: dated_id(id, y, m).ok_or_else(not_key)?,
            }),
            ["reports", "drill", y, m, id] => Ok(ObjectKey::DrillReport {
                id: dated_id(id, y, m).ok_or_else(not_key)?,
            }),
            ["selftest", id] => Ok(ObjectKey::Selftest { id: id.parse()? }),
            _ => bad(),
        }
    }
}

mod summary;
pub use summary::{BackupSizes, BackupSummary};
mod walsum;
pub use walsum::WalPrefixSummary;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;

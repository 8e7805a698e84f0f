//! What the object keys alone say about a source, for hosts that hold only
//! the public keys: backups and snapshots by id (ids carry their time), their
//! object counts and stored bytes, and archived WAL as contiguous ranges per
//! timeline. Everything else (LSNs, sizes before compression, key counts,
//! recoverable windows) is inside encrypted manifests.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repo::layout::{BackupId, ObjectKey, WalSegmentName, WalSuffix};
use crate::repo::{RepoError, Repository};

/// Why a key listing is all a host without the identity gets.
pub const NEEDS_IDENTITY: &str = "listed from object names only: manifests are encrypted, so \
     LSNs, sizes, key counts and recoverable windows need the private key (set [repository] \
     identity_file on a host that restores)";

/// One backup or snapshot as its keys show it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredBackup {
    /// Backup or snapshot id.
    pub id: String,
    /// When the id was made (the start, to the second).
    pub time: DateTime<Utc>,
    /// PostgreSQL system identifier (from the key path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_id: Option<u64>,
    /// True once its manifest is stored; false for a running (or abandoned)
    /// backup.
    pub complete: bool,
    /// Objects stored under its id (manifest, marker and data).
    pub objects: u64,
    /// Bytes stored under its id (compressed and encrypted).
    pub stored_bytes: u64,
}

/// A run of consecutive archived segments on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalRange {
    /// Timeline.
    pub timeline: u32,
    /// First segment of the run.
    pub first: String,
    /// Last segment of the run.
    pub last: String,
    /// Segments in the run.
    pub segments: u64,
}

/// A PostgreSQL cluster as its keys show it.
#[derive(Debug, Clone, Serialize)]
pub struct PgInventory {
    /// Backups, oldest first.
    pub backups: Vec<StoredBackup>,
    /// Archived WAL: more than one range on a timeline means a gap.
    pub wal: Vec<WalRange>,
    /// Complete segments archived.
    pub wal_segments: u64,
    /// Timelines with a history file.
    pub histories: Vec<u32>,
}

/// A Redis instance as its keys show it.
#[derive(Debug, Clone, Serialize)]
pub struct RedisInventory {
    /// Snapshots, oldest first.
    pub snapshots: Vec<StoredBackup>,
}

/// Adds one object to the backup `id` (made at `time`).
fn add(
    by_id: &mut BTreeMap<String, StoredBackup>,
    id: &BackupId,
    system_id: Option<u64>,
    size: u64,
    manifest: bool,
) {
    let b = by_id.entry(id.to_string()).or_insert_with(|| StoredBackup {
        id: id.to_string(),
        time: id.time(),
        system_id,
        complete: false,
        objects: 0,
        stored_bytes: 0,
    });
    b.objects += 1;
    b.stored_bytes += size;
    b.complete |= manifest;
}

/// Oldest first; ids sort by time, ties by their random suffix.
fn in_order(by_id: BTreeMap<String, StoredBackup>) -> Vec<StoredBackup> {
    let mut v: Vec<StoredBackup> = by_id.into_values().collect();
    v.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    v
}

/// Lists `cluster` without decrypting anything.
pub async fn pg(repo: &Repository, cluster: &str) -> Result<PgInventory, RepoError> {
    let (_, objects) = repo.regions.list(&format!("pg/{cluster}/")).await?;
    let mut by_id = BTreeMap::new();
    let mut segments = Vec::new();
    let mut histories = Vec::new();
    for o in &objects {
        match o.key.parse::<ObjectKey>() {
            Ok(ObjectKey::PgManifest {
                system_id, backup, ..
            }) => add(&mut by_id, &backup, Some(system_id), o.size, true),
            Ok(
                ObjectKey::PgStarted {
                    system_id, backup, ..
                }
                | ObjectKey::PgData {
                    system_id, backup, ..
                },
            ) => add(&mut by_id, &backup, Some(system_id), o.size, false),
            Ok(ObjectKey::Wal {
                segment,
                suffix: WalSuffix::None,
                ..
            }) => segments.push(segment),
            Ok(ObjectKey::TimelineHistory { timeline, .. }) => histories.push(timeline.0),
            _ => {}
        }
    }
    segments.sort();
    segments.dedup();
    histories.sort_unstable();
    histories.dedup();
    Ok(PgInventory {
        backups: in_order(by_id),
        wal_segments: segments.len() as u64,
        wal: wal_ranges(&segments),
        histories,
    })
}

/// Lists `instance` without decrypting anything.
pub async fn redis(repo: &Repository, instance: &str) -> Result<RedisInventory, RepoError> {
    let (_, objects) = repo
        .regions
        .list(&format!("redis/{instance}/snapshots/"))
        .await?;
    let mut by_id = BTreeMap::new();
    for o in &objects {
        match o.key.parse::<ObjectKey>() {
            Ok(ObjectKey::RedisManifest { snapshot, .. }) => {
                add(&mut by_id, &snapshot, None, o.size, true)
            }
            Ok(ObjectKey::RedisRdb { snapshot, .. } | ObjectKey::RedisStarted { snapshot, .. }) => {
                add(&mut by_id, &snapshot, None, o.size, false)
            }
            _ => {}
        }
    }
    Ok(RedisInventory {
        snapshots: in_order(by_id),
    })
}

/// Consecutive runs of sorted, distinct segments, per timeline.
fn wal_ranges(sorted: &[WalSegmentName]) -> Vec<WalRange> {
    let per_log = 0x1_0000_0000u64 / crate::postgres::WAL_SEGMENT_SIZE;
    let segno = |s: &WalSegmentName| u64::from(s.log) * per_log + u64::from(s.seg);
    let mut out: Vec<WalRange> = Vec::new();
    let mut prev: Option<&WalSegmentName> = None;
    for s in sorted {
        let follows = prev.is_some_and(|p| p.timeline == s.timeline && segno(p) + 1 == segno(s));
        match out.last_mut() {
            Some(r) if follows => {
                r.last = s.to_string();
                r.segments += 1;
            }
            _ => out.push(WalRange {
                timeline: s.timeline.0,
                first: s.to_string(),
                last: s.to_string(),
                segments: 1,
            }),
        }
        prev = Some(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> WalSegmentName {
        s.parse().expect("segment name")
    }

    #[test]
    fn wal_ranges_split_at_gaps_log_boundaries_and_timelines() {
        let segs: Vec<WalSegmentName> = [
            "0000000100000000000000FE",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000010000000100000002",
            "000000020000000100000002",
        ]
        .iter()
        .map(|s| seg(s))
        .collect();
        let r = wal_ranges(&segs);
        let short: Vec<(u32, &str, &str, u64)> = r
            .iter()
            .map(|r| (r.timeline, r.first.as_str(), r.last.as_str(), r.segments))
            .collect();
        assert_eq!(
            short,
            vec![
                (1, "0000000100000000000000FE", "000000010000000100000000", 3),
                (1, "000000010000000100000002", "000000010000000100000002", 1),
                (2, "000000020000000100000002", "000000020000000100000002", 1),
            ]
        );
    }
}

//! A PostgreSQL repository with a long history, written straight through the
//! library in seconds: `backups` backups and `segments` WAL segments on
//! timeline 1, one segment a minute. Every object is real (encoded as dr
//! encodes it, named as dr names it) and small: all segments but every 32nd
//! and the newest are the same all-zero segment, so one encoding serves them
//! all. Those others hold one commit record at their minute, so windows end
//! where a restore can reach, as with real WAL.

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;

use dr::postgres::Lsn;
use dr::postgres::manifest::{MANIFEST_VERSION, PgManifest};
use dr::repo::Repository;
use dr::repo::layout::{BackupId, ObjectKey, TimelineId, WalSegmentName, WalSuffix};

/// Bytes in a WAL segment.
const SEGMENT: u64 = 16 << 20;
/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const PG_EPOCH: i64 = 946_684_800;

/// The shape of the generated history.
#[derive(Debug, Clone)]
pub struct History {
    /// Cluster name.
    pub cluster: String,
    /// System identifier.
    pub system_id: u64,
    /// Time of segment 0.
    pub base: DateTime<Utc>,
    /// Segments 1..=segments are archived.
    pub segments: u64,
    /// Backups, spread evenly over the segments.
    pub backups: u64,
    /// Backups written without a summary (as before summaries existed).
    pub without_summary: Vec<u64>,
    /// A promotion inside segment `n`: timeline 2 branches off there and
    /// holds every later segment (timeline 1 ends with segment `n`).
    pub branch: Option<u64>,
    /// Backups whose summary is of the older form, without sizes.
    pub old_summary: Vec<u64>,
    /// Segments never archived (a gap).
    pub missing: Vec<u64>,
}

impl History {
    /// A history ending now-ish with `segments` segments and `backups` backups.
    pub fn new(cluster: &str, segments: u64, backups: u64) -> History {
        History {
            cluster: cluster.to_string(),
            system_id: 7_400_000_000_000_000_001,
            base: DateTime::from_timestamp(1_700_000_000, 0).expect("base time"),
            segments,
            backups,
            without_summary: Vec::new(),
            branch: None,
            old_summary: Vec::new(),
            missing: Vec::new(),
        }
    }

    /// When segment `n` was written (its commit time).
    pub fn time_of(&self, n: u64) -> DateTime<Utc> {
        self.base + Duration::minutes(n as i64)
    }

    /// First segment of backup `k` (its stop segment is the next one).
    pub fn backup_start(&self, k: u64) -> u64 {
        1 + k * (self.segments - 3) / self.backups.max(1)
    }

    /// Where timeline 2 branches off, if it does.
    pub fn switch_lsn(&self) -> Option<u64> {
        self.branch.map(|n| n * SEGMENT + 0x1000)
    }

    /// The timeline segment `n` of a backup lies on.
    pub fn timeline_of(&self, n: u64) -> u32 {
        if self.branch.is_some_and(|b| n > b) {
            2
        } else {
            1
        }
    }

    fn name(tli: u32, n: u64) -> WalSegmentName {
        WalSegmentName {
            timeline: TimelineId(tli),
            log: (n / 256) as u32,
            seg: (n % 256) as u32,
        }
    }

    /// Whether segment `n` holds a commit record.
    fn commits(&self, n: u64) -> bool {
        n % 32 == 31 || n == self.segments
    }
}

/// A 16 MiB segment whose first page holds one commit at `at` (zeros after
/// it end the WAL written into the segment, as in a real one).
fn commit_segment(n: u64, at: DateTime<Utc>) -> Vec<u8> {
    let mut d = vec![0u8; SEGMENT as usize];
    d[0..2].copy_from_slice(&0xd110u16.to_le_bytes());
    d[2..4].copy_from_slice(&2u16.to_le_bytes()); // long header
    d[8..16].copy_from_slice(&(n * SEGMENT).to_le_bytes());
    let us = (at.timestamp() - PG_EPOCH) * 1_000_000 + i64::from(at.timestamp_subsec_micros());
    let mut rec = vec![0u8; 24];
    rec[16] = 0x00; // XLOG_XACT_COMMIT
    rec[17] = 1; // RM_XACT_ID
    rec.extend_from_slice(&[255, 16]);
    rec.extend_from_slice(&us.to_le_bytes());
    rec.extend_from_slice(&[0; 8]);
    let len = rec.len() as u32;
    rec[0..4].copy_from_slice(&len.to_le_bytes());
    d[40..40 + rec.len()].copy_from_slice(&rec);
    d
}

/// Writes the history into `repo`, `parallel` objects at a time.
pub async fn write(repo: &Repository, h: &History, parallel: usize) {
    let zero = Bytes::from(vec![0u8; SEGMENT as usize]);
    let (zero_stored, zero_enc) = repo
        .wal_codec
        .encode_bytes(zero, None)
        .await
        .expect("encode a segment");
    // Timeline 2 begins with its own copy of the switch segment.
    let placed = (1..=h.segments)
        .filter(|n| !h.missing.contains(n))
        .flat_map(|n| match h.branch {
            Some(b) if n == b => vec![(1, n), (2, n)],
            Some(b) if n > b => vec![(2, n)],
            _ => vec![(1, n)],
        });
    let prefixes: std::collections::BTreeSet<(u32, u32)> = placed
        .clone()
        .map(|(tli, n)| (tli, (n / 256) as u32))
        .collect();
    let wal = futures::stream::iter(placed).map(|(tli, n)| {
        let zero_stored = zero_stored.clone();
        let zero_hash = zero_enc.plain_hash.clone();
        async move {
            let (stored, hash) = if h.commits(n) {
                let data = Bytes::from(commit_segment(n, h.time_of(n)));
                let (s, e) = repo
                    .wal_codec
                    .encode_bytes(data, None)
                    .await
                    .expect("encode a segment");
                (s, e.plain_hash)
            } else {
                (zero_stored, zero_hash)
            };
            let key = ObjectKey::Wal {
                cluster: h.cluster.clone(),
                system_id: h.system_id,
                segment: History::name(tli, n),
                suffix: WalSuffix::None,
                hash,
            };
            repo.regions
                .put_bytes(&key.to_string(), stored)
                .await
                .expect("put a segment");
        }
    });
    wal.buffer_unordered(parallel).collect::<Vec<()>>().await;
    // As the archiver does after storing each prefix's last segment.
    futures::stream::iter(prefixes)
        .map(|(tli, log)| async move {
            dr::postgres::wal::prefix::summarise_prefix(repo, &h.cluster, h.system_id, tli, log)
                .await
                .expect("summarise a WAL prefix");
        })
        .buffer_unordered(parallel)
        .collect::<Vec<()>>()
        .await;
    if let Some(lsn) = h.switch_lsn() {
        let text = format!(
            "1\t{:X}/{:X}\tno recovery target specified\n",
            lsn >> 32,
            lsn & 0xffff_ffff
        );
        let (stored, enc) = repo
            .wal_codec
            .encode_bytes(Bytes::from(text), None)
            .await
            .expect("encode a history file");
        let key = ObjectKey::TimelineHistory {
            cluster: h.cluster.clone(),
            system_id: h.system_id,
            timeline: TimelineId(2),
            hash: enc.plain_hash,
        };
        repo.regions
            .put_bytes(&key.to_string(), stored)
            .await
            .expect("put a history file");
    }
    let backups = futures::stream::iter(0..h.backups).map(|k| async move {
        let m = manifest(h, k);
        let key = ObjectKey::PgManifest {
            cluster: h.cluster.clone(),
            system_id: h.system_id,
            backup: m.backup_id().expect("backup id"),
        };
        let body = Bytes::from(serde_json::to_vec(&m).expect("manifest JSON"));
        repo.put_buffer(&key, body, None)
            .await
            .expect("put a manifest");
        if h.old_summary.contains(&k) {
            let mut key = m.summary_key().expect("summary key");
            if let ObjectKey::PgSummary { summary, .. } = &mut key {
                summary.sizes = None;
            }
            repo.regions
                .put_bytes(&key.to_string(), Bytes::new())
                .await
                .expect("put an old summary");
        } else if !h.without_summary.contains(&k) {
            dr::postgres::backup::write_summary(repo, &m).await;
        }
    });
    backups
        .buffer_unordered(parallel)
        .collect::<Vec<()>>()
        .await;
}

/// The manifest of backup `k`: no files (nothing to restore), everything
/// the catalog reads.
pub fn manifest(h: &History, k: u64) -> PgManifest {
    let s = h.backup_start(k);
    let tli = h.timeline_of(s);
    let start_time = h.time_of(s);
    let stop_time = h.time_of(s + 1) - Duration::seconds(10);
    let id = format!(
        "{}-{:06x}",
        start_time.format("%Y%m%dT%H%M%SZ"),
        k & 0xff_ffff
    );
    debug_assert!(id.parse::<BackupId>().is_ok());
    PgManifest {
        kind: "dr-pg-backup".into(),
        version: MANIFEST_VERSION,
        cluster: h.cluster.clone(),
        system_id: h.system_id,
        id,
        server_version: 150000,
        start_time,
        stop_time,
        start_lsn: Lsn(s * SEGMENT + 0x28),
        stop_lsn: Lsn((s + 1) * SEGMENT + 0x100),
        timeline: tli,
        start_segment: History::name(tli, s).to_string(),
        stop_segment: History::name(tli, s + 1).to_string(),
        wal_segment_size: SEGMENT,
        backup_label: format!("START WAL LOCATION: {s}\n"),
        tablespace_map: String::new(),
        dirs: Vec::new(),
        files: Vec::new(),
        objects: Vec::new(),
        size: 1000 * (k + 1),
        stored_size: 700 * (k + 1),
        duration_seconds: 1.0,
        checksum_failures: Vec::new(),
        tablespaces: Vec::new(),
        server_manifest: None,
    }
}

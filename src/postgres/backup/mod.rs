//! Base backups. Local mode (`local.rs`) reads PGDATA between
//! `pg_backup_start` and `pg_backup_stop` on the database host; remote mode
//! (`remote.rs`) runs `BASE_BACKUP` over the replication protocol and parses
//! the tar stream. Both feed the same block/pack pipeline (`pack.rs`) and end
//! here: wait until the WAL the backup needs is in the repository, then write
//! the manifest, which alone makes the backup exist.

mod local;
mod pack;
mod remote;
mod tar;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::manifest::{DataObject, DirEntry, FileEntry, MANIFEST_VERSION, PgManifest, Tablespace};
use super::{Lsn, PgError};
use crate::config::{BackupMode, PgConfig, WalMode};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

pub(crate) use local::check_data_dir;
pub(crate) use pack::PageChecks;
pub(crate) use remote::replication_hint;
pub use tar::{TarEntry, read_archive};

/// Paths under PGDATA whose contents are not backed up (PostgreSQL docs,
/// "Making a Base Backup Using the Low Level API"); the directories themselves
/// are recreated on restore.
const SKIP_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
    // `dr restore --start`'s socket and trust rules belong to that run only.
    crate::postgres::restore::SOCKET_DIR,
];
/// Files never backed up.
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "recovery.signal",
    "standby.signal",
    "current_logfiles",
];

/// Summary of a finished backup.
#[derive(Debug, Serialize)]
pub struct BackupReport {
    /// Backup id.
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// `"local"` or `"remote"`.
    pub mode: &'static str,
    /// Plaintext bytes.
    pub size: u64,
    /// Stored bytes.
    pub stored_size: u64,
    /// Files copied.
    pub files: usize,
    /// Data objects written.
    pub objects: usize,
    /// Seconds.
    pub duration_seconds: f64,
    /// Start and stop WAL positions.
    pub start_lsn: String,
    /// Stop position.
    pub stop_lsn: String,
    /// Timeline.
    pub timeline: u32,
    /// Regions holding the manifest.
    pub regions: Vec<String>,
    /// Backup whose unchanged blocks were referenced, if any.
    pub incremental_of: Option<String>,
    /// Bytes referenced from earlier backups instead of stored again.
    pub reused_bytes: u64,
    /// Pages whose checksum failed (path, block), if verification ran.
    pub checksum_failures: Vec<(String, u64)>,
    /// Whether page checksums were verified.
    pub checksums_verified: bool,
}

/// Takes a base backup of `cluster`, locally or over the replication
/// protocol as `mode` says: block-incremental against the previous backup
/// where there is one, unless `full` asks to store every block again.
pub async fn backup(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    full: bool,
    progress: Arc<Progress>,
) -> Result<BackupReport, PgError> {
    let t0 = Instant::now();
    let taken = match cfg.mode {
        BackupMode::Local => local::take(repo, cluster, cfg, full, progress).await?,
        BackupMode::Remote => remote::take(repo, cluster, cfg, full, progress).await?,
    };
    record(repo, cluster, cfg, t0, taken).await
}

/// Server settings both modes check before starting.
struct ServerFacts {
    version: u32,
    archive_mode: String,
    wal_segment_size: u64,
}

/// Refuses servers and settings the backup could not be restored from.
fn check_server(f: &ServerFacts, cfg: &PgConfig) -> Result<(), PgError> {
    if f.version < 150000 {
        return Err(PgError::Other(format!(
            "server version {} is not supported; dr needs PostgreSQL 15 or newer",
            f.version
        )));
    }
    if f.archive_mode == "off" && cfg.wal != WalMode::Stream {
        return Err(PgError::Other(
            "archive_mode is off, so the WAL this backup needs would never be archived; set \
             archive_mode = on and archive_command = 'dr wal-push %p' and restart PostgreSQL, \
             or set wal = \"stream\" and run dr wal-stream"
                .into(),
        ));
    }
    if f.wal_segment_size != super::WAL_SEGMENT_SIZE {
        return Err(PgError::Other(format!(
            "wal_segment_size is {} bytes; this version of dr supports the default 16 MiB",
            f.wal_segment_size
        )));
    }
    Ok(())
}

/// What a mode hands over once the server has ended backup mode.
struct Taken {
    id: BackupId,
    system_id: u64,
    server_version: u32,
    start_time: DateTime<Utc>,
    stop_time: DateTime<Utc>,
    start_lsn: Lsn,
    stop_lsn: Lsn,
    timeline: u32,
    start_segment: String,
    stop_segment: String,
    backup_label: String,
    tablespace_map: String,
    tablespaces: Vec<Tablespace>,
    dirs: Vec<DirEntry>,
    files: Vec<FileEntry>,
    objects: Vec<DataObject>,
    checks: Option<Arc<PageChecks>>,
    prev: Option<PgManifest>,
    server_manifest: Option<FileEntry>,
}

/// The previous backup (for block-incremental; none when `full`) and the
/// page checker, once the start position is known.
async fn prepare(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    cfg: &PgConfig,
    full: bool,
    start_lsn: Lsn,
    data_checksums: &str,
) -> (Option<PgManifest>, Option<Arc<PageChecks>>) {
    let mut prev = if full {
        None
    } else {
        load_previous(repo, cluster, system_id, cfg).await
    };
    if let (Some(p), Some(every)) = (&prev, cfg.full_every)
        && let Some(base) = p.base_time()
        && chrono::Duration::from_std(every).is_ok_and(|e| Utc::now() - base >= e)
    {
        tracing::info!(
            previous = %p.id,
            since = %base.format("%Y-%m-%d %H:%M:%SZ"),
            "taking a full backup: the previous backup references data older than full_every"
        );
        prev = None;
    }
    if let Some(p) = &prev {
        tracing::info!(previous = %p.id, "block-incremental against the previous backup");
    }
    let checks = (cfg.verify_checksums && data_checksums == "on")
        .then(|| Arc::new(PageChecks::new(start_lsn.0)));
    (prev, checks)
}

/// Writes the backup's running marker before any of its data: `dr expire`
/// keeps a manifest-less backup's objects while the marker is young.
async fn mark_started(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    id: &BackupId,
) -> Result<(), PgError> {
    let key = ObjectKey::PgStarted {
        cluster: cluster.to_string(),
        system_id,
        backup: id.clone(),
    };
    repo.mark_started(&key).await?;
    Ok(())
}

/// Waits until the stop segment is in the repository, then writes the
/// manifest (the backup exists from then on) and the local state.
async fn record(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    t0: Instant,
    t: Taken,
) -> Result<BackupReport, PgError> {
    wait_for_stop_segment(repo, cluster, t.system_id, &t.stop_segment, cfg).await?;
    check_objects_present(repo, cluster, t.system_id, &t.id, &t.objects).await?;
    let size: u64 = t.files.iter().map(|f| f.size).sum();
    let checksum_failures = t.checks.as_ref().map(|c| c.failures()).unwrap_or_default();
    let manifest = PgManifest {
        kind: "dr-pg-backup".into(),
        version: MANIFEST_VERSION,
        cluster: cluster.to_string(),
        system_id: t.system_id,
        id: t.id.to_string(),
        server_version: t.server_version,
        start_time: t.start_time,
        stop_time: t.stop_time,
        start_lsn: t.start_lsn,
        stop_lsn: t.stop_lsn,
        timeline: t.timeline,
        start_segment: t.start_segment,
        stop_segment: t.stop_segment,
        wal_segment_size: super::WAL_SEGMENT_SIZE,
        backup_label: t.backup_label,
        tablespace_map: t.tablespace_map,
        dirs: t.dirs,
        files: t.files,
        stored_size: t
            .objects
            .iter()
            .filter(|o| o.backup.is_none())
            .map(|o| o.encoded.stored_size)
            .sum(),
        objects: t.objects,
        size,
        duration_seconds: t0.elapsed().as_secs_f64(),
        checksum_failures,
        tablespaces: t.tablespaces,
        server_manifest: t.server_manifest,
    };
    let body = serde_json::to_vec(&manifest).map_err(|e| PgError::Other(e.to_string()))?;
    let key = ObjectKey::PgManifest {
        cluster: cluster.to_string(),
        system_id: t.system_id,
        backup: t.id.clone(),
    };
    let (_, put) = repo
        .put_buffer(&key, Bytes::from(body.clone()), None)
        .await?;
    write_summary(repo, &manifest).await;
    save_state(cfg, cluster, t.system_id, &body).await;
    let reused: u64 = manifest
        .files
        .iter()
        .flat_map(|f| &f.extents)
        .filter(|e| e.backup.is_some())
        .map(|e| e.len)
        .sum();
    Ok(BackupReport {
        checksum_failures: manifest.checksum_failures.clone(),
        checksums_verified: t.checks.is_some(),
        incremental_of: t.prev.map(|p| p.id),
        reused_bytes: reused,
        id: t.id.to_string(),
        cluster: cluster.to_string(),
        mode: match cfg.mode {
            BackupMode::Local => "local",
            BackupMode::Remote => "remote",
        },
        size,
        stored_size: manifest.stored_size,
        files: manifest.files.len(),
        objects: manifest.objects.len(),
        duration_seconds: t0.elapsed().as_secs_f64(),
        start_lsn: manifest.start_lsn.to_string(),
        stop_lsn: manifest.stop_lsn.to_string(),
        timeline: manifest.timeline,
        regions: put.ok,
    })
}

/// Checks, before the manifest makes the backup visible, that every data
/// object it references (its own and earlier backups' unchanged blocks) is
/// still in the repository: one listing per backup directory, not a request
/// per object. Data deleted behind the backup's back (an expire by an older
/// dr, a hand-made cleanup) would otherwise make every restore from it fail.
async fn check_objects_present(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    id: &BackupId,
    objects: &[DataObject],
) -> Result<(), PgError> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for o in objects {
        let owner: BackupId = match &o.backup {
            None => id.clone(),
            Some(b) => b.parse().map_err(|_| {
                PgError::Other(format!(
                    "data object {} references backup {b:?}, which is not a backup id",
                    o.n
                ))
            })?,
        };
        let key = ObjectKey::PgData {
            cluster: cluster.to_string(),
            system_id,
            backup: owner.clone(),
            n: o.n,
        };
        wanted
            .entry(format!("pg/{cluster}/{system_id}/backups/{owner}/data/"))
            .or_default()
            .push(key.to_string());
    }
    let mut missing = Vec::new();
    for (prefix, keys) in wanted {
        let (_, listed) = repo.regions.list(&prefix).await?;
        let have: BTreeSet<&str> = listed.iter().map(|o| o.key.as_str()).collect();
        missing.extend(keys.into_iter().filter(|k| !have.contains(k.as_str())));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = missing.iter().take(10).map(String::as_str).collect();
    Err(PgError::Other(format!(
        "{} data object(s) this backup references are gone from the repository ({}{}); \
         the backup was not recorded. Take a new one with --full (an expire by a dr \
         older than the running-backup markers, or a manual deletion, removed them)",
        missing.len(),
        shown.join(", "),
        if missing.len() > shown.len() {
            ", …"
        } else {
            ""
        }
    )))
}

/// The server ended backup mode without waiting for the archiver (its own
/// wait sleeps a whole second between checks); poll the repository for the
/// stop segment instead, quickly at first, until `cfg.stop_wal_timeout`.
async fn wait_for_stop_segment(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    stop_segment: &str,
    cfg: &PgConfig,
) -> Result<(), PgError> {
    use std::time::Duration;
    let seg = super::wal::WalFile::parse(stop_segment)
        .ok_or_else(|| PgError::Other(format!("unexpected stop segment name {stop_segment}")))?;
    let prefix = seg.key_prefix(cluster, system_id);
    let t0 = Instant::now();
    let mut pause = Duration::from_millis(10);
    let mut announced = false;
    while repo.regions.list(&prefix).await?.1.is_empty() {
        if t0.elapsed() >= cfg.stop_wal_timeout {
            let how = match cfg.wal {
                WalMode::Stream => {
                    format!("is `dr wal-stream {cluster}` (or the daemon) running and keeping up?")
                }
                WalMode::Archive => "is archive_command `dr wal-push %p` with this config, \
                                     and does pg_stat_archiver show failures?"
                    .to_string(),
            };
            return Err(PgError::Other(format!(
                "the stop WAL segment {stop_segment} did not reach the repository within {} \
                 (stop_wal_timeout); {how} The backup is incomplete and was not recorded",
                humantime::format_duration(cfg.stop_wal_timeout)
            )));
        }
        if !announced && t0.elapsed() >= Duration::from_secs(2) {
            tracing::info!(
                segment = stop_segment,
                "waiting for the stop WAL segment to reach the repository"
            );
            announced = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    Ok(())
}

fn state_file(cfg: &PgConfig, cluster: &str, system_id: u64) -> PathBuf {
    cfg.state_dir()
        .join(format!("{cluster}-{system_id}.last-backup.json"))
}

/// The previous backup's manifest, to reference unchanged blocks: from the
/// local state file (works on hosts with only public keys) if the repository
/// still has that backup, else decrypted from the repository if this host has
/// the identity, else none (a full backup).
async fn load_previous(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    cfg: &PgConfig,
) -> Option<PgManifest> {
    let path = state_file(cfg, cluster, system_id);
    if let Ok(bytes) = tokio::fs::read(&path).await {
        match serde_json::from_slice::<PgManifest>(&bytes) {
            Ok(m) if m.system_id == system_id && m.cluster == cluster => {
                let key = m.backup_id().map(|b| {
                    ObjectKey::PgManifest {
                        cluster: cluster.to_string(),
                        system_id,
                        backup: b,
                    }
                    .to_string()
                });
                if let Some(key) = key
                    && let Ok((_, found)) = repo.regions.list(&key).await
                    && !found.is_empty()
                {
                    return Some(m);
                }
                tracing::info!(state = %path.display(), "previous backup in the state file is gone from the repository");
            }
            _ => tracing::warn!(state = %path.display(), "ignoring an unreadable state file"),
        }
    }
    if !repo.codec.can_decrypt() {
        tracing::info!("no state file and no identity: taking a full backup");
        return None;
    }
    let prefix = format!("pg/{cluster}/{system_id}/backups/");
    let objs = match repo.regions.list(&prefix).await {
        Ok((_, objs)) => objs,
        Err(e) => {
            tracing::warn!(error = %e, prefix, "cannot list earlier backups: taking a full backup");
            return None;
        }
    };
    let newest = objs
        .iter()
        .filter(|o| o.key.ends_with("/manifest"))
        .max_by(|a, b| a.key.cmp(&b.key))?;
    match super::catalog::read_manifest(repo, &newest.key, newest.size).await {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the previous manifest: taking a full backup");
            None
        }
    }
}

/// Keeps a plaintext copy of the manifest for the next block-incremental
/// backup. Best effort: without it the next backup reads the repository or
/// is full, never wrong.
async fn save_state(cfg: &PgConfig, cluster: &str, system_id: u64, manifest: &[u8]) {
    let path = state_file(cfg, cluster, system_id);
    let tmp = path.with_extension("tmp");
    let res = async {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::write(&tmp, manifest).await?;
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(state = %path.display(), error = %e, "cannot save backup state; the next backup may be full");
    }
}

/// Writes the backup's summary, after its manifest and never before: a
/// summary vouches for a durable manifest. A crash or a failed put here
/// leaves a backup without one, which the catalog reads from its manifest
/// as it reads backups taken before summaries existed.
pub async fn write_summary(repo: &Repository, manifest: &PgManifest) {
    let Some(key) = manifest.summary_key() else {
        return;
    };
    if let Err(e) = repo.regions.put_bytes(&key.to_string(), Bytes::new()).await {
        tracing::warn!(backup = %manifest.id, error = %e,
            "backup summary not written; catalogs read this backup's manifest instead");
    }
}

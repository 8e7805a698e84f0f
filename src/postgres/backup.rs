//! Local-mode base backup: `pg_backup_start` on a held session, PGDATA packed
//! into encrypted data objects uploaded in parallel, `pg_backup_stop` (which
//! waits until the WAL the backup needs is archived), then the manifest.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;

use std::collections::HashMap;
use std::sync::Arc;

use super::manifest::{
    BLOCK_SIZE, DataObject, DirEntry, Extent, FileEntry, MANIFEST_VERSION, PgManifest, Tablespace,
};
use super::{Lsn, PgError, checksum};
use crate::config::PgConfig;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

/// Target plaintext size of one data object.
const PACK_SIZE: usize = 8 << 20;

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
    let (_, objs) = repo.regions.list(&prefix).await.ok()?;
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

struct Walked {
    dirs: Vec<DirEntry>,
    files: Vec<(String, u32)>,
}

fn walk(root: &Path) -> Result<Walked, PgError> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let rd = match std::fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PgError::io(&abs, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| PgError::io(&abs, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let rel_path = rel.join(name);
            let Some(rel_str) = rel_path.to_str().map(str::to_string) else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(PgError::io(&entry.path(), e)),
            };
            let mode = meta.permissions().mode() & 0o7777;
            if name.starts_with("pgsql_tmp") || name.starts_with("pg_internal.init") {
                continue;
            }
            if meta.is_dir() {
                dirs.push(DirEntry {
                    path: rel_str.clone(),
                    mode,
                });
                if !SKIP_CONTENTS.contains(&rel_str.as_str()) {
                    stack.push(rel_path);
                }
            } else if meta.is_file() {
                if rel.as_os_str().is_empty() && SKIP_FILES.contains(&name) {
                    continue;
                }
                files.push((rel_str, mode));
            } else if meta.file_type().is_symlink() && rel.as_os_str() == "pg_tblspc" {
                // A tablespace: its contents are backed up under this path
                // (reads follow the link); restore decides where they go.
                let target =
                    std::fs::metadata(entry.path()).map_err(|e| PgError::io(&entry.path(), e))?;
                if target.is_dir() {
                    dirs.push(DirEntry {
                        path: rel_str.clone(),
                        mode: target.permissions().mode() & 0o7777,
                    });
                    stack.push(rel_path);
                }
            }
        }
    }
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    files.sort();
    Ok(Walked { dirs, files })
}

/// A piece of a file: either bytes placed in the current pack, or a block
/// unchanged since the previous backup, referenced where it already is.
struct Piece {
    file: usize,
    file_off: u64,
    extent: Extent,
}

struct Pack {
    n: u32,
    data: Bytes,
    pieces: Vec<Piece>,
}

/// Page-checksum verification while files are read.
pub(crate) struct PageChecks {
    start_lsn: u64,
    bad: std::sync::Mutex<Vec<(String, u64)>>,
}

impl PageChecks {
    fn check(&self, rel: &str, file_off: u64, data: &[u8]) {
        let Some(seg) = checksum::relation_segment(rel) else {
            return;
        };
        for (i, page) in data.chunks(checksum::PAGE_SIZE).enumerate() {
            let blk = seg * checksum::PAGES_PER_SEGMENT
                + file_off / checksum::PAGE_SIZE as u64
                + i as u64;
            if checksum::check_page(page, blk as u32, self.start_lsn) == checksum::PageCheck::Bad {
                tracing::warn!(file = rel, block = blk, "page checksum mismatch");
                if let Ok(mut b) = self.bad.lock() {
                    b.push((rel.to_string(), blk));
                }
            }
        }
    }
}

/// Blocks of the previous backup, by (path, block index).
type PrevBlocks = HashMap<(String, u64), Extent>;

/// Builds the lookup of the previous backup's blocks, with owners made explicit.
fn prev_blocks(prev: Option<&PgManifest>) -> PrevBlocks {
    let mut out = HashMap::new();
    let Some(m) = prev else { return out };
    for f in &m.files {
        let mut off = 0u64;
        for e in &f.extents {
            let mut e = e.clone();
            e.backup = Some(e.backup.clone().unwrap_or_else(|| m.id.clone()));
            out.insert((f.path.clone(), off / BLOCK_SIZE as u64), e.clone());
            off += e.len;
        }
    }
    out
}

fn block_hash(b: &[u8]) -> String {
    hex::encode(&blake3::hash(b).as_bytes()[..16])
}

/// Reads files in order in page-aligned blocks; a block identical to the same
/// block of the previous backup is referenced, the rest is cut into packs of
/// about `PACK_SIZE`. Runs on one blocking thread with plain reads: per-read
/// hand-offs to the async runtime cost more than the reads themselves.
fn produce_packs(
    root: PathBuf,
    files: Vec<(String, u32)>,
    prev: Arc<PrevBlocks>,
    tx: tokio::sync::mpsc::Sender<Result<Pack, PgError>>,
    progress: Arc<Progress>,
    checks: Option<Arc<PageChecks>>,
) {
    let mut n = 0u32;
    let mut buf = BytesMut::with_capacity(PACK_SIZE);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut block = vec![0u8; BLOCK_SIZE];
    for (idx, (rel, _)) in files.iter().enumerate() {
        let path = root.join(rel);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Dropped while the backup ran: WAL replay recreates the truth.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(PgError::io(&path, e)));
                return;
            }
        };
        let mut file_off = 0u64;
        let mut any = false;
        loop {
            let read = match read_full(&mut f, &mut block) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(PgError::io(&path, e)));
                    return;
                }
            };
            if read == 0 {
                break;
            }
            any = true;
            progress.add(read as u64);
            let data = &block[..read];
            if let Some(c) = &checks {
                c.check(rel, file_off, data);
            }
            let hash = block_hash(data);
            let reused = prev
                .get(&(rel.clone(), file_off / BLOCK_SIZE as u64))
                .filter(|e| e.hash == hash && e.len == read as u64);
            let extent = match reused {
                Some(e) => e.clone(),
                None => {
                    let off = buf.len() as u64;
                    buf.extend_from_slice(data);
                    Extent {
                        backup: None,
                        object: n,
                        offset: off,
                        len: read as u64,
                        hash,
                    }
                }
            };
            pieces.push(Piece {
                file: idx,
                file_off,
                extent,
            });
            file_off += read as u64;
            if buf.len() >= PACK_SIZE {
                let pack = Pack {
                    n,
                    data: std::mem::replace(&mut buf, BytesMut::with_capacity(PACK_SIZE)).freeze(),
                    pieces: std::mem::take(&mut pieces),
                };
                n += 1;
                if tx.blocking_send(Ok(pack)).is_err() {
                    return;
                }
            }
            if read < BLOCK_SIZE {
                break; // end of file
            }
        }
        if !any {
            // An empty file still needs an entry; a zero-length piece marks it.
            pieces.push(Piece {
                file: idx,
                file_off: 0,
                extent: Extent {
                    backup: None,
                    object: n,
                    offset: 0,
                    len: 0,
                    hash: String::new(),
                },
            });
        }
    }
    if !buf.is_empty() || !pieces.is_empty() {
        let _ = tx.blocking_send(Ok(Pack {
            n,
            data: buf.freeze(),
            pieces,
        }));
    }
}

fn read_full(f: &mut std::fs::File, out: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut done = 0;
    while done < out.len() {
        let n = f.read(&mut out[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

async fn query_one_text(client: &tokio_postgres::Client, sql: &str) -> Result<String, PgError> {
    let row = client
        .query_one(sql, &[])
        .await
        .map_err(|source| PgError::Sql {
            what: sql.to_string(),
            source,
        })?;
    row.try_get::<_, String>(0).map_err(|source| PgError::Sql {
        what: sql.to_string(),
        source,
    })
}

/// Takes a full base backup of `cluster`.
pub async fn backup(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    progress: Arc<Progress>,
) -> Result<BackupReport, PgError> {
    let t0 = Instant::now();
    let client = super::connect(cfg).await?;
    let version: u32 = query_one_text(&client, "SELECT current_setting('server_version_num')")
        .await?
        .parse()
        .unwrap_or(0);
    if version < 150000 {
        return Err(PgError::Other(format!(
            "server version {version} is not supported; dr needs PostgreSQL 15 or newer"
        )));
    }
    let server_dir = query_one_text(&client, "SELECT current_setting('data_directory')").await?;
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(Path::new(&server_dir)) != canon(&cfg.data_dir) {
        return Err(PgError::Other(format!(
            "the server's data_directory is {server_dir} but [postgres.{cluster}] data_dir is {}; \
             local-mode backups run on the database host and read PGDATA directly",
            cfg.data_dir.display()
        )));
    }
    let archive_mode = query_one_text(&client, "SELECT current_setting('archive_mode')").await?;
    let data_checksums =
        query_one_text(&client, "SELECT current_setting('data_checksums')").await?;
    let streaming = cfg.wal == crate::config::WalMode::Stream;
    if archive_mode == "off" && !streaming {
        return Err(PgError::Other(
            "archive_mode is off, so the WAL this backup needs would never be archived; set \
             archive_mode = on and archive_command = 'dr wal-push %p' and restart PostgreSQL"
                .into(),
        ));
    }
    let system_id: u64 = query_one_text(
        &client,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await?
    .parse()
    .map_err(|_| PgError::Other("cannot parse system_identifier".into()))?;
    let seg_size: u64 = query_one_text(
        &client,
        "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'",
    )
    .await?
    .parse()
    .unwrap_or(super::WAL_SEGMENT_SIZE);
    if seg_size != super::WAL_SEGMENT_SIZE {
        return Err(PgError::Other(format!(
            "wal_segment_size is {seg_size} bytes; this version of dr supports the default 16 MiB"
        )));
    }

    let id = BackupId::new(Utc::now());
    let start_time = Utc::now();
    let label = format!("dr {id}");
    let row = client
        .query_one(
            "SELECT lsn::text, pg_walfile_name(lsn), (SELECT timeline_id FROM pg_control_checkpoint()) \
             FROM pg_backup_start($1, true) AS lsn",
            &[&label],
        )
        .await
        .map_err(|source| PgError::Sql {
            what: "pg_backup_start".into(),
            source,
        })?;
    let get = |i: usize| -> Result<String, PgError> {
        row.try_get::<_, String>(i).map_err(|source| PgError::Sql {
            what: "pg_backup_start".into(),
            source,
        })
    };
    let start_lsn: Lsn = get(0)?.parse().map_err(PgError::Other)?;
    let start_segment = get(1)?;
    let timeline: i32 = row.try_get(2).map_err(|source| PgError::Sql {
        what: "pg_control_checkpoint".into(),
        source,
    })?;
    tracing::info!(backup = %id, %start_lsn, "backup started");

    let tablespaces = client
        .query(
            "SELECT oid::int8, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace \
             WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid",
            &[],
        )
        .await
        .map_err(|source| PgError::Sql {
            what: "listing tablespaces".into(),
            source,
        })?
        .iter()
        .map(|r| {
            Ok(Tablespace {
                oid: u32::try_from(r.try_get::<_, i64>(0)?).unwrap_or(0),
                name: r.try_get(1)?,
                location: r.try_get(2)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|source| PgError::Sql {
            what: "listing tablespaces".into(),
            source,
        })?;
    let prev = load_previous(repo, cluster, system_id, cfg).await;
    if let Some(p) = &prev {
        tracing::info!(previous = %p.id, "block-incremental against the previous backup");
    }
    let checks = (cfg.verify_checksums && data_checksums == "on").then(|| {
        Arc::new(PageChecks {
            start_lsn: start_lsn.0,
            bad: std::sync::Mutex::new(Vec::new()),
        })
    });
    let copy = copy_files(CopyJob {
        repo,
        cluster,
        system_id,
        id: &id,
        cfg,
        prev: prev.as_ref(),
        progress,
        checks: checks.clone(),
    })
    .await;
    // Always end backup mode, even when copying failed.
    let stop = client
        .query_one(
            "SELECT lsn::text, pg_walfile_name(lsn), labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(true)",
            &[],
        )
        .await
        .map_err(|source| PgError::Sql {
            what: "pg_backup_stop (waits until the WAL the backup needs is archived; check archive_command)".into(),
            source,
        })?;
    let (dirs, files, objects) = copy?;
    let sget = |i: usize| -> Result<String, PgError> {
        stop.try_get::<_, String>(i).map_err(|source| PgError::Sql {
            what: "pg_backup_stop".into(),
            source,
        })
    };
    let stop_lsn: Lsn = sget(0)?.parse().map_err(PgError::Other)?;
    let stop_segment = sget(1)?;
    let stop_time = Utc::now();

    // pg_backup_stop waited for the archiver; confirm the repository has it.
    let seg = super::wal::WalFile::parse(&stop_segment)
        .ok_or_else(|| PgError::Other(format!("unexpected stop segment name {stop_segment}")))?;
    let prefix = seg.key_prefix(cluster, system_id);
    let (_, mut found) = repo.regions.list(&prefix).await?;
    // pg_backup_stop switched segments; the streamer stores the completed
    // one once it has received it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while streaming && found.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        found = repo.regions.list(&prefix).await?.1;
    }
    if found.is_empty() && streaming {
        return Err(PgError::Other(format!(
            "the stop WAL segment {stop_segment} did not reach the repository within 5 minutes; \
             is `dr wal-stream {cluster}` (or the daemon) running? \
             The backup is incomplete and was not recorded"
        )));
    }
    if found.is_empty() {
        return Err(PgError::Other(format!(
            "the stop WAL segment {stop_segment} is not in the repository although PostgreSQL \
             reports it archived; is archive_command `dr wal-push %p` with this config? \
             The backup is incomplete and was not recorded"
        )));
    }

    let size: u64 = files.iter().map(|f| f.size).sum();
    let mut manifest = PgManifest {
        kind: "dr-pg-backup".into(),
        version: MANIFEST_VERSION,
        cluster: cluster.to_string(),
        system_id,
        id: id.to_string(),
        server_version: version,
        start_time,
        stop_time,
        start_lsn,
        stop_lsn,
        timeline: timeline as u32,
        start_segment,
        stop_segment,
        wal_segment_size: seg_size,
        backup_label: sget(2)?,
        tablespace_map: sget(3)?,
        dirs,
        files,
        stored_size: objects
            .iter()
            .filter(|o| o.backup.is_none())
            .map(|o| o.encoded.stored_size)
            .sum(),
        objects,
        size,
        duration_seconds: 0.0,
        checksum_failures: checks
            .and_then(|c| c.bad.lock().ok().map(|b| b.clone()))
            .unwrap_or_default(),
        tablespaces,
    };
    manifest.duration_seconds = t0.elapsed().as_secs_f64();
    let body = serde_json::to_vec(&manifest).map_err(|e| PgError::Other(e.to_string()))?;
    let key = ObjectKey::PgManifest {
        cluster: cluster.to_string(),
        system_id,
        backup: id.clone(),
    };
    let (_, put) = repo
        .put_buffer(&key, Bytes::from(body.clone()), None)
        .await?;
    save_state(cfg, cluster, system_id, &body).await;
    let reused: u64 = manifest
        .files
        .iter()
        .flat_map(|f| &f.extents)
        .filter(|e| e.backup.is_some())
        .map(|e| e.len)
        .sum();
    Ok(BackupReport {
        checksum_failures: manifest.checksum_failures.clone(),
        checksums_verified: cfg.verify_checksums && data_checksums == "on",
        incremental_of: prev.map(|p| p.id),
        reused_bytes: reused,
        id: id.to_string(),
        cluster: cluster.to_string(),
        size,
        stored_size: manifest.stored_size,
        files: manifest.files.len(),
        objects: manifest.objects.len(),
        duration_seconds: t0.elapsed().as_secs_f64(),
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop_lsn.to_string(),
        timeline: timeline as u32,
        regions: put.ok,
    })
}

type Copied = (Vec<DirEntry>, Vec<FileEntry>, Vec<DataObject>);

/// Everything `copy_files` needs about the backup being taken.
struct CopyJob<'a> {
    repo: &'a Repository,
    cluster: &'a str,
    system_id: u64,
    id: &'a BackupId,
    cfg: &'a PgConfig,
    prev: Option<&'a PgManifest>,
    progress: Arc<Progress>,
    checks: Option<Arc<PageChecks>>,
}

async fn copy_files(job: CopyJob<'_>) -> Result<Copied, PgError> {
    let CopyJob {
        repo,
        cluster,
        system_id,
        id,
        cfg,
        prev,
        progress,
        checks,
    } = job;
    let root = cfg.data_dir.clone();
    let walked = {
        let r = root.clone();
        tokio::task::spawn_blocking(move || walk(&r))
            .await
            .map_err(|e| PgError::Other(e.to_string()))??
    };
    let prev_index = Arc::new(prev_blocks(prev));
    for (rel, _) in &walked.files {
        if let Ok(m) = std::fs::metadata(root.join(rel)) {
            progress.add_total(m.len());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(cfg.parallel);
    let files_for_producer = walked.files.clone();
    let producer = tokio::task::spawn_blocking(move || {
        produce_packs(root, files_for_producer, prev_index, tx, progress, checks)
    });
    let uploads =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
            .map(|pack: Result<Pack, PgError>| async move {
                let pack = pack?;
                if pack.data.is_empty() {
                    return Ok::<_, PgError>((pack.pieces, None));
                }
                let key = ObjectKey::PgData {
                    cluster: cluster.to_string(),
                    system_id,
                    backup: id.clone(),
                    n: pack.n,
                };
                let (enc, _) = repo.put_buffer(&key, pack.data, None).await?;
                Ok((
                    pack.pieces,
                    Some(DataObject {
                        backup: None,
                        n: pack.n,
                        encoded: enc,
                    }),
                ))
            })
            .buffer_unordered(cfg.parallel);
    let done: Vec<Result<_, PgError>> = uploads.collect().await;
    let _ = producer.await;
    let mut files: Vec<FileEntry> = walked
        .files
        .iter()
        .map(|(path, mode)| FileEntry {
            path: path.clone(),
            size: 0,
            mode: *mode,
            extents: Vec::new(),
        })
        .collect();
    let mut present = vec![false; files.len()];
    let mut objects = Vec::new();
    let mut pieces_all = Vec::new();
    for r in done {
        let (pieces, obj) = r?;
        objects.extend(obj);
        pieces_all.extend(pieces);
    }
    // Objects of earlier backups that reused blocks live in.
    let mut referenced: HashMap<(String, u32), DataObject> = HashMap::new();
    if let Some(p) = prev {
        for o in &p.objects {
            let owner = o.backup.clone().unwrap_or_else(|| p.id.clone());
            referenced.insert(
                (owner.clone(), o.n),
                DataObject {
                    backup: Some(owner),
                    ..o.clone()
                },
            );
        }
    }
    let mut used = std::collections::BTreeMap::new();
    pieces_all.sort_by_key(|p| (p.file, p.file_off));
    for piece in pieces_all {
        present[piece.file] = true;
        if piece.extent.len == 0 {
            continue;
        }
        if let Some(owner) = &piece.extent.backup {
            let k = (owner.clone(), piece.extent.object);
            let Some(o) = referenced.get(&k) else {
                return Err(PgError::Other(format!(
                    "previous backup {owner} does not list data object {}; taking a full backup is safe: \
                     remove the state file and retry",
                    piece.extent.object
                )));
            };
            used.insert(k, o.clone());
        }
        files[piece.file].size += piece.extent.len;
        files[piece.file].extents.push(piece.extent);
    }
    objects.sort_by_key(|o| o.n);
    objects.extend(used.into_values());
    let files = files
        .into_iter()
        .zip(present)
        .filter_map(|(f, p)| p.then_some(f))
        .collect();
    Ok((walked.dirs, files, objects))
}

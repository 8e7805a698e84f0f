//! Local-mode base backup: `pg_backup_start` on a held session, PGDATA packed
//! into encrypted data objects uploaded in parallel, `pg_backup_stop` (which
//! waits until the WAL the backup needs is archived), then the manifest.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::manifest::{DataObject, DirEntry, Extent, FileEntry, MANIFEST_VERSION, PgManifest};
use super::{Lsn, PgError};
use crate::config::PgConfig;
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
            } else if meta.file_type().is_symlink() && rel_str.starts_with("pg_tblspc/") {
                return Err(PgError::Other(format!(
                    "{rel_str}: tablespaces are not supported by this version of dr's local-mode backup"
                )));
            }
        }
    }
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    files.sort();
    Ok(Walked { dirs, files })
}

struct Pack {
    n: u32,
    data: Bytes,
    /// (file index, offset in file, offset in pack, len)
    pieces: Vec<(usize, u64, u64, u64)>,
}

/// Reads files in order and cuts them into packs of about `PACK_SIZE`.
async fn produce_packs(
    root: PathBuf,
    files: Vec<(String, u32)>,
    tx: tokio::sync::mpsc::Sender<Result<Pack, PgError>>,
) {
    let mut n = 0u32;
    let mut buf = BytesMut::with_capacity(PACK_SIZE);
    let mut pieces = Vec::new();
    for (idx, (rel, _)) in files.iter().enumerate() {
        let path = root.join(rel);
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            // Dropped while the backup ran: WAL replay recreates the truth.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = tx.send(Err(PgError::io(&path, e))).await;
                return;
            }
        };
        let mut file_off = 0u64;
        loop {
            let room = PACK_SIZE - buf.len();
            let start = buf.len();
            buf.resize(PACK_SIZE, 0);
            let read = match read_full(&mut f, &mut buf[start..start + room]).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(PgError::io(&path, e))).await;
                    return;
                }
            };
            buf.truncate(start + read);
            if read > 0 {
                pieces.push((idx, file_off, start as u64, read as u64));
                file_off += read as u64;
            }
            if buf.len() >= PACK_SIZE {
                let pack = Pack {
                    n,
                    data: std::mem::replace(&mut buf, BytesMut::with_capacity(PACK_SIZE)).freeze(),
                    pieces: std::mem::take(&mut pieces),
                };
                n += 1;
                if tx.send(Ok(pack)).await.is_err() {
                    return;
                }
            }
            if read < room {
                break; // end of file
            }
        }
        if pieces.iter().all(|p| p.0 != idx) && file_off == 0 {
            // Empty file: an extent-less entry, recorded below.
            pieces.push((idx, 0, buf.len() as u64, 0));
        }
    }
    if !buf.is_empty() || !pieces.is_empty() {
        let _ = tx
            .send(Ok(Pack {
                n,
                data: buf.freeze(),
                pieces,
            }))
            .await;
    }
}

async fn read_full(f: &mut tokio::fs::File, out: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < out.len() {
        let n = f.read(&mut out[done..]).await?;
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
    if archive_mode == "off" {
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

    let copy = copy_files(repo, cluster, system_id, &id, cfg).await;
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
    let (_, found) = repo.regions.list(&prefix).await?;
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
        stored_size: objects.iter().map(|o| o.encoded.stored_size).sum(),
        objects,
        size,
        duration_seconds: 0.0,
        checksum_failures: Vec::new(),
    };
    manifest.duration_seconds = t0.elapsed().as_secs_f64();
    let body = serde_json::to_vec(&manifest).map_err(|e| PgError::Other(e.to_string()))?;
    let key = ObjectKey::PgManifest {
        cluster: cluster.to_string(),
        system_id,
        backup: id.clone(),
    };
    let n = body.len() as u64;
    let (_, put) = repo
        .put_encoded(&key, crate::store::once(Bytes::from(body)), Some(n))
        .await?;
    Ok(BackupReport {
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

async fn copy_files(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    id: &BackupId,
    cfg: &PgConfig,
) -> Result<Copied, PgError> {
    let root = cfg.data_dir.clone();
    let walked = {
        let r = root.clone();
        tokio::task::spawn_blocking(move || walk(&r))
            .await
            .map_err(|e| PgError::Other(e.to_string()))??
    };
    let (tx, rx) = tokio::sync::mpsc::channel(cfg.parallel);
    let producer = tokio::spawn(produce_packs(root, walked.files.clone(), tx));
    let uploads =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
            .map(|pack: Result<Pack, PgError>| async move {
                let pack = pack?;
                let key = ObjectKey::PgData {
                    cluster: cluster.to_string(),
                    system_id,
                    backup: id.clone(),
                    n: pack.n,
                };
                let len = pack.data.len() as u64;
                let (enc, _) = repo
                    .put_encoded(&key, crate::store::once(pack.data), Some(len))
                    .await?;
                Ok::<_, PgError>((pack.n, pack.pieces, enc))
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
        let (n, pieces, enc) = r?;
        objects.push(DataObject { n, encoded: enc });
        for (idx, file_off, pack_off, len) in pieces {
            pieces_all.push((idx, file_off, n, pack_off, len));
        }
    }
    pieces_all.sort_by_key(|p| (p.0, p.1));
    for (idx, _file_off, n, pack_off, len) in pieces_all {
        present[idx] = true;
        if len > 0 {
            files[idx].extents.push(Extent {
                object: n,
                offset: pack_off,
                len,
            });
            files[idx].size += len;
        }
    }
    objects.sort_by_key(|o| o.n);
    let files = files
        .into_iter()
        .zip(present)
        .filter_map(|(f, p)| p.then_some(f))
        .collect();
    Ok((walked.dirs, files, objects))
}

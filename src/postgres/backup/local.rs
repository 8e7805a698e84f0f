//! Local mode: `pg_backup_start` on a held session, PGDATA walked and read
//! directly, `pg_backup_stop`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;

use super::super::manifest::{BLOCK_SIZE, DirEntry, Tablespace};
use super::super::{Lsn, PgError};
use super::pack::{self, Packer, PrevBlocks};
use super::{SKIP_CONTENTS, SKIP_FILES, ServerFacts, Taken};
use crate::config::PgConfig;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::BackupId;

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

/// Reads files in order in page-aligned blocks into the packer. Runs on one
/// blocking thread with plain reads: per-read hand-offs to the async runtime
/// cost more than the reads themselves.
fn read_files(root: PathBuf, files: Vec<(String, u32)>, mut packer: Packer) {
    let mut block = vec![0u8; BLOCK_SIZE];
    for (idx, (rel, _)) in files.iter().enumerate() {
        let path = root.join(rel);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Dropped while the backup ran: WAL replay recreates the truth.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return packer.fail(PgError::io(&path, e)),
        };
        let mut file_off = 0u64;
        loop {
            let read = match read_full(&mut f, &mut block) {
                Ok(r) => r,
                Err(e) => return packer.fail(PgError::io(&path, e)),
            };
            if read == 0 {
                break;
            }
            if packer.block(idx, rel, file_off, &block[..read]).is_err() {
                return;
            }
            file_off += read as u64;
            if read < BLOCK_SIZE {
                break; // end of file
            }
        }
        if file_off == 0 {
            packer.empty(idx);
        }
    }
    packer.finish();
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

/// Local mode reads PGDATA, so `data_dir` must be the directory the server
/// reports (`dr check` asks the same).
pub(crate) fn check_data_dir(
    cluster: &str,
    server_dir: &str,
    cfg: &PgConfig,
) -> Result<(), String> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(Path::new(server_dir)) == canon(&cfg.data_dir) {
        return Ok(());
    }
    Err(format!(
        "the server keeps its data in {server_dir} but [postgres.{cluster}] data_dir is {}; \
         local-mode backups run on the database host and read PGDATA directly \
         (mode = \"remote\" backs up from anywhere over the replication protocol)",
        cfg.data_dir.display()
    ))
}

/// The server settings a local backup depends on.
async fn server_facts(client: &tokio_postgres::Client) -> Result<ServerFacts, PgError> {
    Ok(ServerFacts {
        version: query_one_text(client, "SELECT current_setting('server_version_num')")
            .await?
            .parse()
            .unwrap_or(0),
        archive_mode: query_one_text(client, "SELECT current_setting('archive_mode')").await?,
        wal_segment_size: query_one_text(
            client,
            "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'",
        )
        .await?
        .parse()
        .unwrap_or(super::super::WAL_SEGMENT_SIZE),
    })
}

/// Takes the backup; the caller records it.
pub(super) async fn take(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    full: bool,
    progress: Arc<Progress>,
) -> Result<Taken, PgError> {
    if cfg.data_dir.as_os_str().is_empty() {
        return Err(PgError::Other(format!(
            "[postgres.{cluster}] has no data_dir; local-mode backups read PGDATA on the \
             database host (set data_dir), or set mode = \"remote\" to back up over the \
             replication protocol"
        )));
    }
    let client = super::super::connect(cfg).await?;
    let facts = server_facts(&client).await?;
    super::check_server(&facts, cfg)?;
    let server_dir = query_one_text(&client, "SELECT current_setting('data_directory')").await?;
    check_data_dir(cluster, &server_dir, cfg).map_err(PgError::Other)?;
    let data_checksums =
        query_one_text(&client, "SELECT current_setting('data_checksums')").await?;
    let system_id: u64 = query_one_text(
        &client,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await?
    .parse()
    .map_err(|_| PgError::Other("cannot parse system_identifier".into()))?;

    let id = BackupId::new(Utc::now());
    super::mark_started(repo, cluster, system_id, &id).await?;
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
    let (prev, checks) = super::prepare(
        repo,
        cluster,
        system_id,
        cfg,
        full,
        start_lsn,
        &data_checksums,
    )
    .await;
    let target = pack::Target {
        repo,
        cluster,
        system_id,
        id: &id,
        parallel: cfg.parallel,
    };
    let copy = copy_files(&target, cfg, prev.as_ref(), progress, checks.clone()).await;
    // Always end backup mode, even when copying failed.
    let stop = client
        .query_one(
            "SELECT lsn::text, pg_walfile_name(lsn), labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .map_err(|source| PgError::Sql {
            what: "pg_backup_stop".into(),
            source,
        })?;
    let (dirs, files, objects) = copy?;
    let sget = |i: usize| -> Result<String, PgError> {
        stop.try_get::<_, String>(i).map_err(|source| PgError::Sql {
            what: "pg_backup_stop".into(),
            source,
        })
    };
    Ok(Taken {
        id,
        system_id,
        server_version: facts.version,
        start_time,
        stop_time: Utc::now(),
        start_lsn,
        stop_lsn: sget(0)?.parse().map_err(PgError::Other)?,
        timeline: timeline as u32,
        start_segment,
        stop_segment: sget(1)?,
        backup_label: sget(2)?,
        tablespace_map: sget(3)?,
        tablespaces,
        dirs,
        files,
        objects,
        checks,
        prev,
        server_manifest: None,
    })
}

type Copied = (
    Vec<DirEntry>,
    Vec<super::super::manifest::FileEntry>,
    Vec<super::super::manifest::DataObject>,
);

async fn copy_files(
    target: &pack::Target<'_>,
    cfg: &PgConfig,
    prev: Option<&super::super::manifest::PgManifest>,
    progress: Arc<Progress>,
    checks: Option<Arc<pack::PageChecks>>,
) -> Result<Copied, PgError> {
    let root = cfg.data_dir.clone();
    let walked = {
        let r = root.clone();
        tokio::task::spawn_blocking(move || walk(&r))
            .await
            .map_err(|e| PgError::Other(e.to_string()))??
    };
    let prev_index: Arc<PrevBlocks> = Arc::new(pack::prev_blocks(prev));
    for (rel, _) in &walked.files {
        if let Ok(m) = std::fs::metadata(root.join(rel)) {
            progress.add_total(m.len());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(cfg.parallel);
    let files_for_reader = walked.files.clone();
    let packer = Packer::new(prev_index, tx, progress, checks);
    let reader = tokio::task::spawn_blocking(move || read_files(root, files_for_reader, packer));
    let done = pack::upload(target, rx).await;
    let _ = reader.await;
    let (files, objects) = pack::assemble(&walked.files, done, prev)?;
    Ok((walked.dirs, files, objects))
}
